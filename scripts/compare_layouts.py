"""Memory layouts compared with the same training budget: continue a trained model in each layout.

Each layout in `--layouts` (see `latentmem.positions`) starts from the same trained weights and
trains the same steps on the same episodes (full pools, reads of older writes, `--retention` of the
episodes re-asking a target up to `--depth` writes back); each result is a model folder under
`--out/LAYOUT/final`, measured afterwards in a memory in use with `scripts/warm_retention.py`:

    python scripts/compare_layouts.py --model tiny --steps 400 --out runs/layouts
    python scripts/warm_retention.py --model runs/layouts/per_write/final --ways memoryllm --checkpoints 0,2,5,10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latentmem.data.filler import filler_paragraphs
from latentmem.models import load_model
from latentmem.training.tasks import FactTask
from latentmem.training.trainer import Stage, Trainer, TrainingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a trained model that trains every weight: preset or folder")
    parser.add_argument("--layouts", default="pool,per_write")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--blocks", type=int, default=8, help="training pools hold this many blocks of K slots")
    parser.add_argument("--retention", type=float, default=0.3)
    parser.add_argument("--depth", type=int, default=8, help="re-asked targets were written up to this many writes back")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    filler = filler_paragraphs(source="stdlib")
    for layout in args.layouts.split(","):
        model, tokenizer = load_model(args.model)
        model.config.memory_positions = layout
        stage = Stage(args.steps, num_blocks=args.blocks, max_contexts=4, retention=args.retention,
                      retention_depth=(1, args.depth), in_context=0.2)  # fmt: skip
        config = TrainingConfig(stages=[stage], batch_size=args.batch, lr=args.lr, warmup_steps=20, train_all=True,
                                seed=args.seed, log_every=25, final_eval=False, progress=False)  # fmt: skip
        task = lambda rank: FactTask(tokenizer, filler, seed=args.seed * 1000 + rank, facts_per_document=(1, 2),  # noqa: E731
                                     score_question=True, copy_fraction=0.4, notes_fraction=0.3)  # fmt: skip
        start = time.perf_counter()
        Trainer(model, task, config, args.out / layout, tokenizer=tokenizer).train()
        seconds = round(time.perf_counter() - start, 1)
        (args.out / layout / "run.json").write_text(json.dumps({**vars(args), "out": str(args.out), "layout": layout,
                                                                "train_seconds": seconds}, indent=2))  # fmt: skip
        print(f"{layout}: {args.steps} steps in {seconds} s -> {args.out / layout / 'final'}", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Retention with int8 slots against float slots, on the same streams (issue #20, part 4).

Runs the retention harness (`latentmem eval retention`: the same samples, distractors, seed and
warm-up for every method) with two memory methods on one model: `float` (the state as written)
and `int8` (after every write the pool is replaced by its int8 round trip, `quantize.round_trip_`:
exactly what a state saved with `slot_dtype="int8"` and reloaded after every write would hold).
Both reset to the same seed, so they drop the same slots; only the slots' precision differs.

    python benchmarks/bench_int8_retention.py                       # tiny, 20 samples, 0/10/50 writes
    python benchmarks/bench_int8_retention.py --samples 5 --checkpoints 0,2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from latentmem.evaluation import run_retention
from latentmem.evaluation.methods import LM, MemoryMethod
from latentmem.models import load_model
from latentmem.quantize import round_trip_


class Int8MemoryMethod(MemoryMethod):
    """MemoryMethod whose pool is kept at its int8 round trip after every write."""

    def observe(self, text: str) -> None:
        super().observe(text)
        round_trip_(self.memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--checkpoints", default="0,10,50")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", default=None, help="folder for the harness's results files (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, tokenizer = load_model(args.model)
    lm = LM(model, tokenizer, max_new_tokens=args.max_new_tokens)
    methods = [MemoryMethod(lm, name="float"), Int8MemoryMethod(lm, name="int8")]
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    start = time.perf_counter()
    result = run_retention(
        model, tokenizer, methods, n_samples=args.samples, checkpoints=checkpoints, out_dir=args.out,
        dataset=args.dataset, seed=args.seed, warmup=args.warmup, max_new_tokens=args.max_new_tokens, progress=False,
    )  # fmt: skip
    print(f"model {args.model}, {args.samples} samples, warm-up {args.warmup}, seed {args.seed}, "
          f"pool {model.config.memory_size} x {model.backbone.config.hidden_size}, {model.dtype}; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    summary = result.summary()
    print("| slots | " + " | ".join(f"acc@{c}" for c in checkpoints) + " |")
    print("|---|" + "---|" * len(checkpoints))
    for name in ("float", "int8"):
        print(f"| {name} | " + " | ".join(f"{summary[name][c]['exact']:.2f}" for c in checkpoints) + " |")
    diffs = [abs(summary["float"][c]["exact"] - summary["int8"][c]["exact"]) for c in checkpoints]
    print(f"largest |float - int8|: {max(diffs):.2f}")
    print(json.dumps({n: {c: summary[n][c]["exact"] for c in checkpoints} for n in ("float", "int8")}))


if __name__ == "__main__":
    main()

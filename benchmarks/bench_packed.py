#!/usr/bin/env python
"""Benchmark the inference copies of a weight (src/latentmem/inference_weights.py) against `F.linear`.

For each weight shape and row count, times `F.linear(x, W)` (PyTorch's default CPU matmul) and
`InferenceWeight.linear`, which computes from a oneDNN-packed copy (several rows) or a transposed
contiguous copy (one row), and prints the ratio. Each shape rotates through 2-8 distinct weights;
the last rows time a whole decoder stack (8 layers of d512, 101 MB), whose weights come from
memory rather than from a cache, as in a decoding step.

    python benchmarks/bench_packed.py                # output heads and decoder-layer shapes
    python benchmarks/bench_packed.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from latentmem.inference_weights import InferenceWeight, packing_available

SHAPES = {
    "head 32000x512 (bench_first_read)": (32000, 512),
    "head 49152x576 (SmolLM2-135M)": (49152, 576),
    "q/k/v/o 512x512": (512, 512),
    "gate/up 1376x512": (1376, 512),
    "down 512x1376": (512, 1376),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,8,32,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not packing_available():
        print("oneDNN packing is not available in this PyTorch build: the copies are plain weights")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {args.reps} calls")
    print(f"{'weight':36s} {'rows':>4s} {'F.linear ms':>12s} {'copies ms':>10s} {'ratio':>6s} {'max |diff|':>10s}")
    for label, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k) * k**-0.5 for _ in range(8 if n * k < 1 << 22 else 2)]
        copies = [InferenceWeight(lambda w=w: w, lambda w=w: (w,)) for w in weights]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(1, rows, k)
            with torch.no_grad():
                diff = max((c.linear(x, None) - F.linear(x, w)).abs().max().item() for c, w in zip(copies, weights))
                plain = timed(lambda: [F.linear(x, w) for w in weights], args.reps) / len(weights)
                fast = timed(lambda: [c.linear(x, None) for c in copies], args.reps) / len(weights)
            print(f"{label:36s} {rows:4d} {plain * 1e3:12.3f} {fast * 1e3:10.3f} {plain / fast:5.2f}x {diff:10.1e}")
    # A decoding step reads every weight of the model once: 8 layers of d512 are 101 MB, more than
    # a CPU cache holds, so each weight comes from memory as in a model
    layer = [(512, 512)] * 4 + [(1376, 512), (1376, 512), (512, 1376)]
    stack = [torch.randn(n, k) * k**-0.5 for _ in range(8) for n, k in layer]
    copies = [InferenceWeight(lambda w=w: w, lambda w=w: (w,)) for w in stack]
    for rows in (1, 32):
        xs = {k: torch.randn(1, rows, k) for k in (512, 1376)}
        with torch.no_grad():
            plain = timed(lambda: [F.linear(xs[w.shape[1]], w) for w in stack], args.reps)
            fast = timed(lambda: [c.linear(xs[w.shape[1]], None) for c, w in zip(copies, stack)], args.reps)
        label = "8 layers of d512 (every weight once)"
        print(f"{label:36s} {rows:4d} {plain * 1e3:12.3f} {fast * 1e3:10.3f} {plain / fast:5.2f}x")


def timed(fn, reps: int) -> float:
    fn()  # builds the copies, warms up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    main()

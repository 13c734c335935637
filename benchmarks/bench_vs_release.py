#!/usr/bin/env python
"""Benchmark latentmem side by side with the official MemoryLLM code on the same model shape.

The release's code needs its own environment (transformers 4.48.2 and peft 0.10.0, as its
requirements pin), so each side runs in its own process, one after the other, rounds alternating:

    git clone https://github.com/wangyu-ustc/MemoryLLM /tmp/MemoryLLM
    python -m venv /tmp/release-env && /tmp/release-env/bin/pip install torch==2.13.0 \\
        transformers==4.48.2 peft==0.10.0 accelerate==1.2.0
    python benchmarks/bench_vs_release.py --release-code /tmp/MemoryLLM --release-python /tmp/release-env/bin/python

Both sides build a random Llama of issue 20's shape (default 8 layers x d512, N = 4096 slots per
layer, K = 256, LoRA r=8 on every projection, fp32, one torch thread) with a full pool of random
slots, and time: a 32-token read (the release recomputes every slot's keys/values on each read; for
latentmem the first read after a write and a repeated read on unchanged memory), greedy generation
of 16 tokens on unchanged memory, and a 256-token write. latentmem runs twice: its default (fast
inference) and `set_fast_inference(False)` (the release's arithmetic). Ratios are release / latentmem
per round, medians of `--reps` calls each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SHAPE = dict(layers=8, hidden=512, heads=8, intermediate=1376, vocab=32000, num_tokens=256, blocks=16)


def timed(calls: dict, reps: int) -> dict[str, float]:
    """Median seconds of each call over `reps` rounds, after one warm-up round, calls interleaved."""
    times: dict[str, list[float]] = {}
    for r in range(reps + 1):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times.setdefault(name, []).append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def release_worker(code: str, reps: int) -> dict:
    import torch

    sys.path.insert(0, code)
    from configuration_memoryllm import MemoryLLMConfig  # the release's own files
    from modeling_memoryllm import MemoryLLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = MemoryLLMConfig(
        vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["heads"],
        max_position_embeddings=10240, num_tokens=SHAPE["num_tokens"], num_blocks=SHAPE["blocks"],
        add_bos_embedding=True, add_decoder_lora=True,
        lora_config={"inference_mode": True, "r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": targets},
    )  # fmt: skip
    model = MemoryLLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # untrained LoRA B is zero; make the adapters count
        model.memory.data = torch.randn(model.memory.shape)
        model.initialized += 1
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, SHAPE["vocab"], (1, 32), generator=g)
    ctx = torch.randint(0, SHAPE["vocab"], (1, 256), generator=g)

    @torch.no_grad()
    def read():
        model(input_ids=q)

    @torch.no_grad()
    def greedy():
        model.generate(q, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def inject():
        model.inject_memory(ctx, update_memory=True)

    return timed({"inject": inject, "read": read, "greedy": greedy}, reps)


def latentmem_worker(exact: bool, reps: int) -> dict:
    import torch
    from bench_first_read import build_model, parse_args  # a sibling script: benchmarks/ is on sys.path

    torch.set_num_threads(1)
    shape = ["--layers", SHAPE["layers"], "--hidden", SHAPE["hidden"], "--heads", SHAPE["heads"],
             "--kv-heads", SHAPE["heads"], "--intermediate", SHAPE["intermediate"], "--vocab", SHAPE["vocab"],
             "--num-tokens", SHAPE["num_tokens"], "--blocks", SHAPE["blocks"]]  # fmt: skip
    model = build_model(parse_args([str(a) for a in shape] + (["--exact"] if exact else [])))
    g = torch.Generator().manual_seed(1)
    state = model.new_memory(seed=1)
    state.stm = torch.randn(state.shape, generator=g)
    q = torch.randint(0, SHAPE["vocab"], (1, 32), generator=g)
    ctx = torch.randint(0, SHAPE["vocab"], (256,), generator=g)

    @torch.no_grad()
    def read():
        model(q, memory=state)

    def greedy():
        model.generate(q, memory=state, max_new_tokens=16, min_new_tokens=16, do_sample=False)

    def inject():
        model.inject(state, ctx)

    # after each write: the first read (the prefix follows the write), then a repeated one
    return timed({"inject": inject, "first read": read, "read": read, "greedy": greedy}, reps)


def run_worker(python: str, args: list[str]) -> dict:
    out = subprocess.run([python, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release-code", help="a checkout of github.com/wangyu-ustc/MemoryLLM (main branch)")
    p.add_argument("--release-python", help="a Python whose environment runs the release (transformers 4.48.2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--worker", choices=["release", "fast", "exact"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = release_worker(args.release_code, args.reps) if args.worker == "release" else (
            latentmem_worker(args.worker == "exact", args.reps))  # fmt: skip
        print(json.dumps(result))
        return
    if not (args.release_code and args.release_python):
        p.error("--release-code and --release-python are required (see the instructions above)")
    reps = ["--reps", str(args.reps)]
    print(f"shape {SHAPE}, fp32, 1 thread per process; medians of {args.reps} per round, ms")
    print(f"{'round':>5s} {'side':>8s} {'read':>8s} {'first read':>11s} {'greedy 16':>10s} {'inject':>8s}")
    ratios: dict[str, list[float]] = {}
    for r in range(1, args.rounds + 1):
        rel = run_worker(args.release_python, ["--worker", "release", "--release-code", args.release_code, *reps])
        sides = {"release": rel}
        for side in ("fast", "exact"):
            sides[side] = run_worker(sys.executable, ["--worker", side, *reps])
        for side, t in sides.items():
            first = t.get("first read", t["read"])
            print(f"{r:5d} {side:>8s} {t['read'] * 1e3:8.1f} {first * 1e3:11.1f} {t['greedy'] * 1e3:10.1f} "
                  f"{t['inject'] * 1e3:8.1f}")  # fmt: skip
            if side != "release":
                for what in ("read", "first read", "greedy", "inject"):
                    ratios.setdefault(f"{what} ({side})", []).append(rel["read" if what == "first read" else what]
                                                                      / t[what])  # fmt: skip
    print("release / latentmem, per round:")
    for label, rs in ratios.items():
        print(f"  {label:20s} " + "  ".join(f"{x:5.2f}x" for x in rs))


if __name__ == "__main__":
    main()

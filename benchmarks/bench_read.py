#!/usr/bin/env python
"""Benchmark reading from and writing into a MemoryLLM memory pool (fp32, CPU by default).

Two measurements, in one process, on a Llama backbone built from a random config:

1. Reads: repeated queries against one memory state.
   - cached:     `model(q, memory=state)`, the prefix cache hit on every call;
   - recomputed: the same call with an empty, throwaway prefix cache, so the memory keys/values
                 of all N slots are recomputed through the same code path every call.
   Also shown for reference: computing the prefix alone, and the same forward without memory
   (backbone with the read adapter active).

2. Writes: `model.inject(state, input_ids=ctx)` into an already initialized state, against the
   lower bound, a plain forward of the decoder stack (`model.backbone.model`, no lm_head) over
   K + n input embeddings. The pure compute part (`latentmem.writing.compute_new_slots`) is timed
   on its own as well, so the pool-update overhead is visible.

Every time is the median (and min) of --reps rounds after --warmup untimed rounds (time.perf_counter);
the functions compared run interleaved, one call each per round, so background load hits them alike.

    python benchmarks/bench_read.py                 # SmolLM2-135M shape, N = 16 * 256 = 4096 slots/layer
    python benchmarks/bench_read.py --shape dev     # a 4-layer d=256 Llama (about 10 s)
    python benchmarks/bench_read.py --num-blocks 4  # a smaller pool
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig

import latentmem
from latentmem import MemoryLLM, MemoryLLMConfig
from latentmem.writing import compute_new_slots

SHAPES = {
    "smollm2": dict(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    "dev": dict(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688, vocab=1000),
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("backbone (random Llama config; --shape picks defaults, flags override)")
    g.add_argument("--shape", choices=sorted(SHAPES), default="smollm2",
                   help="smollm2: SmolLM2-135M's architecture (the default model); dev: a 4-layer d=256 Llama")
    for name in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab"):
        g.add_argument(f"--{name}", type=int, default=None)
    g = p.add_argument_group("memory")
    g.add_argument("--num-tokens", type=int, default=256, help="K, slots written per injection")
    g.add_argument("--num-blocks", type=int, default=16, help="N = num_blocks * K slots per layer")
    g.add_argument("--lora-r", type=int, default=8)
    g = p.add_argument_group("workload")
    g.add_argument("--query-len", type=int, default=16, help="tokens per query (batch 1)")
    g.add_argument("--logits-to-keep", type=int, default=1,
                   help="positions whose logits a read computes (1, as generate's prefill; 0 = all)")
    g.add_argument("--context-lens", type=int, nargs="+", default=[256, 64], help="n, tokens per injected context")
    g.add_argument("--warmup", type=int, default=2, help="untimed rounds before each measurement")
    g.add_argument("--reps", type=int, default=5, help="timed rounds per measurement (median and min reported)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--profile", action="store_true", help="also print torch.profiler tables of a read, a prefix and an inject"
    )
    args = p.parse_args()
    for name, value in SHAPES[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def build_model(args: argparse.Namespace) -> MemoryLLM:
    torch.manual_seed(args.seed)
    N = args.num_blocks * args.num_tokens
    backbone = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        # Reads place 1 + N memory positions in front of the query.
        max_position_embeddings=max(8192, 2 * (N + args.num_tokens + max(args.context_lens) + args.query_len)),
    )
    config = MemoryLLMConfig(
        backbone_config=backbone,
        num_tokens=args.num_tokens,
        num_blocks=args.num_blocks,
        lora=dict(r=args.lora_r, lora_alpha=4 * args.lora_r, lora_dropout=0.0, target_modules=TARGET_MODULES),
        add_decoder_lora=True,  # two adapters: `default` writes, `decoder_adapter` reads
        min_context_tokens=1,
    )
    return randomize_memory_weights(MemoryLLM(config).to(torch.float32).eval(), args.seed)


def randomize_memory_weights(model: MemoryLLM, seed: int) -> MemoryLLM:
    """LoRA B starts at zero; give adapters and memory embeddings non-trivial values (as tests do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "bos_embedding" in name or "new_memory_positional_emb" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def timeit(fns: dict, warmup: int, reps: int) -> dict[str, tuple[float, float]]:
    """{name: (median, min)} wall time in seconds of each `fn()`, over `reps` rounds after `warmup`.

    The functions run interleaved (one call of each per round), so load from other processes on a
    shared machine hits all of them alike and their ratios stay meaningful.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0] * 1e3:9.2f} ms (min {t[1] * 1e3:8.2f})"


def random_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def check_prefix_cache(model: MemoryLLM, state, q: torch.Tensor) -> float:
    """The cached path must compute the prefix once for many reads and match a recomputed read."""
    calls = 0
    original = latentmem.reading.compute_memory_prefix

    def counting(*a, **k):
        nonlocal calls
        calls += 1
        return original(*a, **k)

    latentmem.reading.compute_memory_prefix = counting  # PrefixCache.get looks it up here
    try:
        model.prefix_cache.clear()
        for _ in range(4):
            cached = model(q, memory=state, use_cache=False).logits
        hits = calls == 1
        model.prefix_cache.clear()
        fresh = model(q, memory=state, use_cache=False).logits
        recomputes = calls == 2
    finally:
        latentmem.reading.compute_memory_prefix = original
    if not (hits and recomputes):
        raise RuntimeError(f"prefix cache did not behave as expected ({calls} prefix computations)")
    return (cached - fresh).abs().max().item()


def bench_reads(model: MemoryLLM, state, args: argparse.Namespace) -> dict:
    q = random_ids(args.query_len, args.vocab, args.seed + 1)
    prefix_cache = model.prefix_cache

    keep = args.logits_to_keep

    def cached():
        return model(q, memory=state, use_cache=False, logits_to_keep=keep).logits

    def recomputed():
        # An empty, throwaway prefix cache: this read recomputes all memory keys/values. A reader
        # without a prefix cache keeps no spare room behind the prefix, so don't charge it for one.
        model.prefix_cache = latentmem.reading.PrefixCache()
        spare, latentmem.reading.SPARE_POSITIONS = latentmem.reading.SPARE_POSITIONS, 0
        try:
            return model(q, memory=state, use_cache=False, logits_to_keep=keep).logits
        finally:
            model.prefix_cache = prefix_cache
            latentmem.reading.SPARE_POSITIONS = spare

    def prefix_only():
        model.adapters.activate("read")
        return latentmem.reading.compute_memory_prefix(model, state.stm)

    def no_memory():
        model.adapters.activate("read")  # the same LoRA work as a read; model(q) would turn adapters off
        return model.backbone(q, use_cache=False, logits_to_keep=keep).logits

    max_diff = check_prefix_cache(model, state, q)
    prefix_len = prefix_cache.get(model, state).length
    fns = dict(cached=cached, recomputed=recomputed, prefix=prefix_only, no_memory=no_memory)
    return dict(prefix_len=prefix_len, max_diff=max_diff, **timeit(fns, args.warmup, args.reps))


def bench_inject(model: MemoryLLM, state, n: int, args: argparse.Namespace) -> dict:
    K, d = args.num_tokens, args.hidden
    ctx = random_ids(n, args.vocab, args.seed + 100 + n)
    embeds = torch.randn(1, K + n, d, generator=torch.Generator().manual_seed(args.seed + n))
    decoder = model.backbone.model

    def inject():
        model.inject(state, input_ids=ctx, allow_short=True)

    def compute():
        model.adapters.activate("write")
        return compute_new_slots(model, state, ctx[0])

    def plain_forward():
        model.adapters.activate("write")  # the same LoRA work as a write
        return decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state

    writes_before = state.write_count
    times = timeit(dict(inject=inject, compute=compute, plain=plain_forward), args.warmup, args.reps)
    assert state.write_count == writes_before + args.warmup + args.reps, "inject did not write"
    return times


def profile(fn, label: str, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            fn()
    print(f"\n-- profile: {label} (3 calls) --")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows))


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    N = args.num_blocks * args.num_tokens
    cores = os.cpu_count() or 1

    print("== config ==")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, latentmem {latentmem.__version__}, "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"device cpu ({cores} cores), dtype float32, torch threads {torch.get_num_threads()}, "
          f"load average at start {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"backbone: Llama, layers {args.layers}, hidden {args.hidden}, heads {args.heads}, "
          f"kv heads {args.kv_heads}, intermediate {args.intermediate}, vocab {args.vocab}")  # fmt: skip
    print(f"memory: K = num_tokens {args.num_tokens}, num_blocks {args.num_blocks}, N = {N} slots/layer; "
          f"LoRA r={args.lora_r} on {','.join(TARGET_MODULES)}, two adapters")  # fmt: skip
    print(f"workload: query {args.query_len} tokens (batch 1, logits for {args.logits_to_keep or 'all'} positions), "
          f"contexts n = {args.context_lens}; "
          f"median (and min) of {args.reps} interleaved rounds after {args.warmup} warm-up rounds")  # fmt: skip

    model = build_model(args)
    state = model.new_memory(seed=args.seed)
    with torch.inference_mode():
        # Fill the pool: the first write tiles its slots; the second exercises random forgetting.
        for i in range(2):
            model.inject(state, input_ids=random_ids(args.num_tokens, args.vocab, args.seed + 10 + i), allow_short=True)

        print("\n== 1. reads: repeated queries against one memory ==")
        r = bench_reads(model, state, args)
        print(f"memory prefix: {r['prefix_len']} positions/layer (bos + N); "
              f"max |cached - recomputed| logits = {r['max_diff']:.2e}")  # fmt: skip
        print(f"cached read      (prefix cache hit)       {fmt(r['cached'])}")
        print(f"recomputed read  (cache cleared per call) {fmt(r['recomputed'])}")
        print(f"  compute_memory_prefix alone             {fmt(r['prefix'])}")
        print(f"backbone + read adapter, no memory (ref.) {fmt(r['no_memory'])}")
        speedup = r["recomputed"][0] / r["cached"][0]
        print(f"speedup recomputed / cached = {speedup:.2f}x (by min {r['recomputed'][1] / r['cached'][1]:.2f}x)  "
              f"target >= 5x: {verdict(speedup >= 5)}")  # fmt: skip
        overhead = r["cached"][0] - r["no_memory"][0]
        print(f"  cached = no-memory forward {r['no_memory'][0] * 1e3:.2f} ms + {overhead * 1e3:.2f} ms to read the "
              f"{r['prefix_len']}-position prefix (copy into the Cache, GQA expansion, attention)")  # fmt: skip
        print(f"  recomputed = cached + prefix compute; >= 5x needs cached <= prefix / 4 = "
              f"{r['prefix'][0] / 4 * 1e3:.2f} ms")  # fmt: skip

        print("\n== 2. writes: inject into an initialized state vs a plain forward over K + n tokens ==")
        for n in args.context_lens:
            w = bench_inject(model, state, n, args)
            ratio = w["inject"][0] / w["plain"][0]
            print(f"n = {n:4d}: plain decoder forward, K+n = {args.num_tokens + n:4d} tokens  {fmt(w['plain'])}")
            print(f"          inject (full: compute + pool update) {fmt(w['inject'])}  ratio {ratio:.2f}x "
                  f"(by min {w['inject'][1] / w['plain'][1]:.2f}x)  "
                  f"target <= 1.2x: {verdict(ratio <= 1.2)}")  # fmt: skip
            print(f"          compute_new_slots only               {fmt(w['compute'])}  "
                  f"ratio {w['compute'][0] / w['plain'][0]:.2f}x")  # fmt: skip
            print(f"          pool update + overhead (difference)  {(w['inject'][0] - w['compute'][0]) * 1e3:9.2f} ms")

        if args.profile:
            q = random_ids(args.query_len, args.vocab, args.seed + 1)
            profile(lambda: model(q, memory=state, use_cache=False), "cached read")
            profile(lambda: latentmem.reading.compute_memory_prefix(model, state.stm), "compute_memory_prefix")
            ctx = random_ids(args.context_lens[0], args.vocab, args.seed + 7)
            profile(lambda: model.inject(state, input_ids=ctx, allow_short=True), f"inject n={args.context_lens[0]}")

    load = os.getloadavg()[0]
    print(f"\nload average at end {load:.2f}" + (
        f"  (WARNING: more runnable processes than the {cores} cores; other work skews these times)"
        if load > cores else ""))  # fmt: skip
    print(f"total wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark reading from and writing into a MemoryLLM memory pool (fp32, CPU by default).

Two measurements, in one process, on a Llama backbone built from a random config:

1. Reads: repeated queries against one memory state.
   - cached:     `model(q, memory=state)`, the prefix cache hit on every call;
   - recomputed: the same call after `model.prefix_cache.clear()`, so the memory keys/values
                 of all N slots are recomputed through the same code path every call.
   Also shown for reference: computing the prefix alone, and the plain backbone without memory.

2. Writes: `model.inject(state, input_ids=ctx)` into an already initialized state, against the
   lower bound, a plain forward of the decoder stack (`model.backbone.model`, no lm_head) over
   K + n input embeddings. The pure compute part (`latentmem.writing.compute_new_slots`) is timed
   on its own as well, so the pool-update overhead is visible.

Every time is the median of --reps repetitions after --warmup untimed calls (time.perf_counter).

    python benchmarks/bench_read.py                 # defaults: N = 16 * 256 = 4096 slots/layer
    python benchmarks/bench_read.py --num-blocks 4  # a smaller pool
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig

import latentmem
from latentmem import MemoryLLM, MemoryLLMConfig
from latentmem.writing import compute_new_slots

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("backbone (random Llama config)")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate", type=int, default=688)
    g.add_argument("--vocab", type=int, default=1000)
    g = p.add_argument_group("memory")
    g.add_argument("--num-tokens", type=int, default=256, help="K, slots written per injection")
    g.add_argument("--num-blocks", type=int, default=16, help="N = num_blocks * K slots per layer")
    g.add_argument("--lora-r", type=int, default=8)
    g = p.add_argument_group("workload")
    g.add_argument("--query-len", type=int, default=32, help="tokens per query (batch 1)")
    g.add_argument("--context-lens", type=int, nargs="+", default=[256, 64], help="n, tokens per injected context")
    g.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    g.add_argument("--reps", type=int, default=7, help="timed calls per measurement (median reported)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    g.add_argument("--seed", type=int, default=0)
    return p.parse_args()


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
    model = MemoryLLM(config).to(torch.float32).eval()
    # LoRA B starts at zero; give adapters and memory embeddings non-trivial values (as tests do).
    g = torch.Generator().manual_seed(args.seed)
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


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def random_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def bench_reads(model: MemoryLLM, state, args: argparse.Namespace) -> dict:
    q = random_ids(args.query_len, args.vocab, args.seed + 1)
    prefix_cache = model.prefix_cache

    def cached():
        return model(q, memory=state, use_cache=False).logits

    def recomputed():
        prefix_cache.clear()  # next read misses: all memory keys/values are recomputed
        return model(q, memory=state, use_cache=False).logits

    def prefix_only():
        model.adapters.activate("read")
        return latentmem.reading.compute_memory_prefix(model, state)

    def no_memory():
        return model(q).logits

    # Sanity: the cached path must hit (one prefix computation for many reads) and agree with
    # a recomputed read.
    calls = 0
    original = latentmem.reading.compute_memory_prefix

    def counting(*a, **k):
        nonlocal calls
        calls += 1
        return original(*a, **k)

    latentmem.reading.compute_memory_prefix = counting
    try:
        prefix_cache.clear()
        first = cached()
        for _ in range(3):
            again = cached()
        hits_ok = calls == 1
        fresh = recomputed()
        recompute_ok = calls == 2
    finally:
        latentmem.reading.compute_memory_prefix = original
    max_diff = (again - fresh).abs().max().item()
    if not (hits_ok and recompute_ok):
        raise RuntimeError(f"prefix cache did not behave as expected ({calls} prefix computations)")
    prefix_len = prefix_cache.get(model, state).length

    cached_s = timeit(cached, args.warmup, args.reps)
    recomputed_s = timeit(recomputed, args.warmup, args.reps)
    prefix_s = timeit(prefix_only, args.warmup, args.reps)
    no_memory_s = timeit(no_memory, args.warmup, args.reps)
    return dict(
        prefix_len=prefix_len, max_diff=max_diff, first=first,
        cached=cached_s, recomputed=recomputed_s, prefix=prefix_s, no_memory=no_memory_s,
    )  # fmt: skip


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
        model.adapters.activate("write")  # same LoRA work as a write
        return decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state

    writes_before = state.write_count
    inject_s = timeit(inject, args.warmup, args.reps)
    assert state.write_count == writes_before + args.warmup + args.reps
    compute_s = timeit(compute, args.warmup, args.reps)
    plain_s = timeit(plain_forward, args.warmup, args.reps)
    return dict(n=n, inject=inject_s, compute=compute_s, plain=plain_s)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    N = args.num_blocks * args.num_tokens

    print("== config ==")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, latentmem {latentmem.__version__}, "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"device cpu, dtype float32, torch threads {torch.get_num_threads()}")
    print(f"backbone: Llama, layers {args.layers}, hidden {args.hidden}, heads {args.heads}, "
          f"kv heads {args.kv_heads}, intermediate {args.intermediate}, vocab {args.vocab}")  # fmt: skip
    print(f"memory: K = num_tokens {args.num_tokens}, num_blocks {args.num_blocks}, N = {N} slots/layer; "
          f"LoRA r={args.lora_r} on {','.join(TARGET_MODULES)}, two adapters")  # fmt: skip
    print(f"workload: query {args.query_len} tokens (batch 1), contexts n = {args.context_lens}; "
          f"median of {args.reps} reps after {args.warmup} warm-up calls")  # fmt: skip

    model = build_model(args)
    state = model.new_memory(seed=args.seed)
    with torch.inference_mode():
        # Fill the pool: the first write tiles its slots; a second one exercises random forgetting.
        model.inject(state, input_ids=random_ids(args.num_tokens, args.vocab, args.seed + 10), allow_short=True)
        model.inject(state, input_ids=random_ids(args.num_tokens, args.vocab, args.seed + 11), allow_short=True)

        print("\n== 1. reads: repeated queries against one memory ==")
        r = bench_reads(model, state, args)
        print(f"memory prefix: {r['prefix_len']} positions/layer (bos + N); "
              f"max |cached - recomputed| logits = {r['max_diff']:.2e}")  # fmt: skip
        print(f"cached read      (prefix cache hit)      {ms(r['cached'])}")
        print(f"recomputed read  (cache cleared per call) {ms(r['recomputed'])}")
        print(f"  of which compute_memory_prefix alone    {ms(r['prefix'])}")
        print(f"plain backbone, no memory (reference)     {ms(r['no_memory'])}")
        speedup = r["recomputed"] / r["cached"]
        print(f"speedup recomputed / cached = {speedup:.2f}x  (target >= 5x: {'MET' if speedup >= 5 else 'MISSED'})")

        print("\n== 2. writes: inject into an initialized state vs a plain forward over K + n tokens ==")
        ratios = []
        for n in args.context_lens:
            w = bench_inject(model, state, n, args)
            ratio = w["inject"] / w["plain"]
            ratios.append(ratio)
            print(f"n = {n:4d}: plain decoder forward over K+n = {args.num_tokens + n} tokens {ms(w['plain'])}")
            print(f"          inject (full: compute + pool update)         {ms(w['inject'])}  "
                  f"ratio {ratio:.2f}x  (target <= 1.2x: {'MET' if ratio <= 1.2 else 'MISSED'})")  # fmt: skip
            print(f"          compute_new_slots only                       {ms(w['compute'])}  "
                  f"ratio {w['compute'] / w['plain']:.2f}x")  # fmt: skip
            print(f"          pool update + overhead (inject - compute)    {ms(w['inject'] - w['compute'])}")

    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

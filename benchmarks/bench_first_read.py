#!/usr/bin/env python
"""Benchmark reads that follow a write: the incremental memory prefix against recomputing it.

After a write only K of a layer's N slots are new. The prefix cache (`latentmem/reading.py`) then
projects those K, reuses every kept slot's key (before RoPE) and value, rotates the keys to their
new positions and overwrites the stale buffers in place. The baseline is the recomputing path the
cache had before (kept here as `RecomputingCache`: every slot of every layer projected again, the
stale prefix kept until the new one is built, then copied into buffers with spare room).

Measured in one process on a random Llama (default: the issue's 8 layers x d512, N = 4096, K = 256,
fp32, one torch thread), functions interleaved round by round so background load hits them alike:

- first read after a write: `model(q, memory=state)` right after `model.inject(state, ...)`;
- repeated read: the same call on unchanged memory (cached), and a forward without memory (the limit);
- greedy generation of 16 tokens, first after a write and on unchanged memory;
- peak RSS of a first read above the RSS before it (Linux: /proc/self/clear_refs resets the peak).

Both paths read the same memory: a full pool of random slots, then the same writes (each write's
slots computed once, stored into both states, which drop the same slots).

    python benchmarks/bench_first_read.py                  # the issue's configuration (a few minutes)
    python benchmarks/bench_first_read.py --blocks 4 --layers 2 --reps 2   # a quick check
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import time

import torch
import transformers
from bench_read import randomize_memory_weights  # a sibling script: benchmarks/ is on sys.path when run
from transformers import LlamaConfig

from latentmem import MemoryLLM, MemoryLLMConfig
from latentmem.reading import SPARE_POSITIONS, MemoryPrefix, PrefixCache, compute_memory_prefix
from latentmem.writing import compute_new_slots, store_slots

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RecomputingCache(PrefixCache):
    """The cache as it was before incremental prefixes: any change recomputes all N slots of every layer."""

    def get(self, model, state, start=0, with_bos=True, gap=None):
        key = (state.version, model.adapters.adapter_for("read"), model.dtype, start, with_bos, gap)
        with self._lock:
            entry = self._entries.get(state)
        if entry is not None and entry[0] == key:
            return entry[1]
        with torch.no_grad(), model.adapters.use("read"):
            slots = state.stm if state.initialized else None
            # all layers' keys/values first, then copies with spare room, as the cache did
            whole = compute_memory_prefix(model, slots, 0, start, with_bos, gap, state.sources)
            prefix = MemoryPrefix(whole.keys_values, spare=SPARE_POSITIONS, prompt_start=whole.prompt_start)
            del whole
        with self._lock:
            self._entries[state] = (key, prefix)  # the stale entry lived until here
        return prefix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--num-tokens", type=int, default=256, help="K, slots per write")
    p.add_argument("--blocks", type=int, default=16, help="N = blocks * K")
    p.add_argument("--positions", default="pool", choices=["pool", "per_write", "fixed"])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", action="store_true",
                   help="compute with both LoRA adapters merged into weight copies, as the server does")  # fmt: skip
    p.add_argument("--exact", action="store_true",
                   help="compute as the release does (set_fast_inference(False)), not the default")  # fmt: skip
    return p.parse_args(argv)


def build_model(args) -> MemoryLLM:
    torch.manual_seed(args.seed)
    N = args.blocks * args.num_tokens
    backbone = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(8192, 2 * (N + 1024)),
    )  # fmt: skip
    config = MemoryLLMConfig(
        backbone_config=backbone, num_tokens=args.num_tokens, num_blocks=args.blocks, min_context_tokens=1,
        lora={"r": args.lora_r, "lora_alpha": 4 * args.lora_r, "lora_dropout": 0.0, "target_modules": TARGET_MODULES},
        add_decoder_lora=True, memory_positions=args.positions,
    )  # fmt: skip
    model = randomize_memory_weights(MemoryLLM(config).to(torch.float32).eval(), args.seed)
    if args.exact:
        model.set_fast_inference(False)
    if args.merge:
        model.adapters.merge()
    return model


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def extra_peak_mib(fn) -> float | None:
    """Peak RSS during `fn()` above the RSS right before it (None where the peak cannot be reset).

    Freed memory is first handed back to the system (glibc's malloc_trim), so memory that the
    allocator kept from earlier rounds does not hide what this call needs.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak ("hiwater") RSS to the current RSS
    except OSError:
        return None
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) / 1024


def median(ts: list[float]) -> float:
    return statistics.median(ts)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args)
    K, N = args.num_tokens, args.blocks * args.num_tokens
    vocab = args.vocab
    gen = torch.Generator().manual_seed(args.seed + 1)

    def ids(n):
        return torch.randint(0, vocab, (1, n), generator=gen)

    incremental, recomputing = model.prefix_cache, RecomputingCache()
    caches = {"incremental": incremental, "recompute": recomputing}
    states = {name: model.new_memory(seed=1) for name in caches}
    # both paths read the same memory: one full pool (random slots of a hidden state's scale), then
    # the same writes; a write's slots are computed once and stored into both (same drops: same seed)
    pool = torch.randn(states["incremental"].shape, generator=gen)
    for state in states.values():
        state.stm = pool
    q = ids(args.query_len)

    def read(name):
        model.prefix_cache = caches[name]
        with torch.no_grad():
            return model(q, memory=states[name]).logits

    def generate(name):
        model.prefix_cache = caches[name]
        return model.generate(
            q, memory=states[name], max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens
        )

    def write():
        first = states["incremental"]
        new = compute_new_slots(model, first, ids(args.context_len)[0])
        for state in states.values():
            injection = state.record_injection("bench", args.context_len)
            store_slots(model, state, new, injection.id, args.context_len)
        assert torch.equal(states["incremental"].stm, states["recompute"].stm)

    def no_memory():
        with torch.no_grad():
            return model(q).logits

    # the two paths agree
    write()
    diff = (read("incremental") - read("recompute")).abs().max().item()
    tokens_equal = torch.equal(generate("incremental"), generate("recompute"))

    times: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}

    def timed(label, fn):
        t0 = time.perf_counter()
        fn()
        times.setdefault(label, []).append(time.perf_counter() - t0)

    order = list(caches)
    for r in range(args.warmup + args.reps):
        if r == args.warmup:
            times.clear()
            peaks.clear()
        order.reverse()  # alternate which path goes first
        write()
        for name in order:
            peak = extra_peak_mib(lambda name=name: timed(f"first read, {name}", lambda name=name: read(name)))
            if peak is not None:
                peaks.setdefault(name, []).append(peak)
        for name in order:
            timed(f"repeated read, {name}", lambda name=name: read(name))
        timed("read without memory", no_memory)
        write()
        for name in order:
            timed(f"greedy {args.new_tokens}, first after a write, {name}", lambda name=name: generate(name))
        for name in order:
            timed(f"greedy {args.new_tokens}, unchanged memory, {name}", lambda name=name: generate(name))

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs")  # fmt: skip
    print(f"shape: {args.layers} layers x d{args.hidden}, {args.heads}/{args.kv_heads} heads, N={N}, K={K}, fp32, "
          f"LoRA r={args.lora_r}{' merged' if args.merge else ''}{', exact' if args.exact else ''}, "
          f"positions={args.positions}, "
          f"query {args.query_len} tokens, "
          f"{args.reps} rounds (medians)")  # fmt: skip
    print(f"incremental vs recompute: max |logit diff| {diff:.2e}, greedy tokens equal: {tokens_equal}")
    for label, ts in times.items():
        print(f"  {label:48s} {median(ts) * 1e3:9.1f} ms (min {min(ts) * 1e3:8.1f})")

    def ratio(a: str, b: str) -> float:
        return median(times[b]) / median(times[a])

    print("ratios (recompute / incremental):")
    print(f"  first read after a write   {ratio('first read, incremental', 'first read, recompute'):.2f}x")
    print(f"  repeated read              {ratio('repeated read, incremental', 'repeated read, recompute'):.2f}x"
          "  (both cached: the paths differ only after a change)")  # fmt: skip
    g = f"greedy {args.new_tokens}"
    print(
        f"  {g}, first after a write {ratio(f'{g}, first after a write, incremental', f'{g}, first after a write, recompute'):.2f}x"
    )
    print(f"repeated read / read without memory: "
          f"{median(times['repeated read, incremental']) / median(times['read without memory']):.2f}x"
          f"; first read (incremental) / read without memory: "
          f"{median(times['first read, incremental']) / median(times['read without memory']):.2f}x")  # fmt: skip
    for name, ps in peaks.items():
        print(f"  extra peak RSS of a first read, {name:12s} {median(ps):8.1f} MiB (max {max(ps):.1f})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark M+ long-term-memory retrieval (`latentmem.ltm.LongTermStore`) on the CPU.

For each size (slots per layer), in a fresh worker process so memory numbers do not mix:

- full scan: what the official release does on every query: sigmoid(Q @ K^T).mean(0) over all
  keys (one torch matmul), then top-k. The baseline every ratio is against, measured in the same run;
- exact:    `LongTermStore(index="exact").search`: the same scores, computed in cache-sized chunks;
- ivf/hnsw: the approximate indexes: candidates from FAISS (mean query, 4 x k), rescored exactly.
  Recall@k is against the exact top-k. Below `SearchSettings.min_size` (20k slots) they search
  exactly by design, which the table shows.
- whole writes (`retrieval_unit="write"`): the best writes by their best slot, read whole;
- token writes (`write_ranking="first_layer"`): every prompt row's own top 256 slots propose writes
  (`search_each`, one pass), the best 16 x (k / 256) scored by late interaction, read whole;
- by tokens (`write_ranking="tokens"`): each write's tokens indexed (80 distinct tokens per write from
  a Zipf vocabulary, random unit keys), a prompt of 6 of its target write's tokens and 10 common ones,
  writes ranked by the IDF of the prompt tokens they hold. "write found" is the share of prompts
  whose target write is in the read.

Each search is one prompt of --queries query rows (the prompt tokens), k = --k slots (M+-8B
retrieves 2,560 per layer), keys --key-dim wide. Times are medians over --reps rounds x --prompts
prompts; the methods run interleaved, one call each per round, so background load hits them alike.
Memory: "resident" is what building the store added to the process (RSS), "search peak" the extra
peak during one search (VmHWM, reset before it), "worker peak" the whole worker's maximum RSS.

Then the largest size's store (approximate index included) is saved and opened in a fresh process:
time to open, resident memory it added, and the first search (which reads the index file).

Data (--data): "clustered" (default) mimics LTM: slots arrive 256 at a time from one context, so
keys are a random context centre plus noise, and a prompt's queries point at one context;
"iso" is isotropic Gaussian keys and queries, the worst case for any vector index. Query scale is
set so that logits over random slots have std --logit-std.

    python benchmarks/bench_ltm.py                           # 10k, 100k, 1M slots/layer (~5 min on 2 cores)
    python benchmarks/bench_ltm.py --sizes 10000 100000      # smaller
    python benchmarks/bench_ltm.py --data iso --sizes 100000 # the hard case
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from latentmem.ltm import LongTermStore
from latentmem.ltm.matching import TOKEN_COMMON, rank_writes, rank_writes_by_tokens
from latentmem.ltm.recall import FULLY_SCORED, collect_writes, top_writes


# --- memory probes (Linux /proc) ------------------------------------------------------------------
def rss_mb() -> float:
    return _status("VmRSS")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (Linux >= 4.0)
        f.write("5")


def peak_mb() -> float:
    return _status("VmHWM")


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- data -------------------------------------------------------------------------------------
def make_data(args, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Keys `[n, h]` and --prompts prompts of queries `[q, h]` (see the module doc); `make_data.targets`
    holds the context (write of 256 slots) each clustered prompt points at."""
    g = torch.Generator().manual_seed(args.seed)
    h = args.key_dim
    if args.data == "iso":
        keys = torch.randn(n, h, generator=g) / h**0.5
        prompts = [torch.randn(args.queries, h, generator=g) / h**0.5 for _ in range(args.prompts)]
    else:
        centres = torch.randn((n + 255) // 256, h, generator=g) / h**0.5
        keys = torch.empty(n, h)
        for start in range(0, n, 2**16):  # chunked: no [n, h] temporaries beyond `keys`
            stop = min(n, start + 2**16)
            keys[start:stop] = centres[torch.arange(start, stop) // 256]
            keys[start:stop] += 0.5 * torch.randn(stop - start, h, generator=g) / h**0.5
        picks = torch.randint(0, len(centres), (args.prompts,), generator=g)
        prompts = [centres[j] + 0.7 * torch.randn(args.queries, h, generator=g) / h**0.5 for j in picks]
        make_data.targets = picks.tolist()
    sample = keys[torch.randint(0, n, (min(n, 20_000),), generator=g)]
    scale = args.logit_std / (prompts[0] @ sample.T).std().item()
    make_data.prompts = [p * scale for p in prompts]
    return keys, make_data.prompts


def add_write_tokens(store: LongTermStore, n: int, args) -> dict[int, torch.Tensor]:
    """Index every write's tokens (as `write_ranking="tokens"` does) and make each prompt's token
    queries: 80 distinct tokens per write drawn from a Zipf vocabulary of 49,152 (SmolLM2's), each
    token a fixed random unit key; a prompt holds 6 of its target write's tokens and 10 common ones.
    Returns the queries keyed by id() of the prompt they stand for."""
    rng = np.random.default_rng(args.seed)
    vocab = torch.nn.functional.normalize(torch.randn(49_152, args.key_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    tokens_of = []
    for write in range((n + 255) // 256):
        tokens = np.unique(np.minimum(rng.zipf(1.3, 200), 49_151))[:80]
        tokens_of.append(tokens)
        store.add_write_tokens(write, vocab[tokens])
    queries = {}
    for prompt, target in zip(make_data.prompts, make_data.targets):
        own = rng.choice(tokens_of[target], min(6, len(tokens_of[target])), replace=False)
        queries[id(prompt)] = vocab[np.concatenate([own, np.arange(10)])]
    return queries


# --- one size -----------------------------------------------------------------------------------
def worker(args, n: int) -> dict:
    torch.manual_seed(args.seed)
    keys, prompts = make_data(args, n)
    k = min(args.k, n)
    result = {"size": n, "methods": {}}

    def full_scan(queries: torch.Tensor) -> torch.Tensor:
        return torch.topk(torch.sigmoid(queries @ keys.T).mean(0), k).indices

    searches = {"full scan": full_scan}
    stores = {}
    kinds = ["exact"] + [kind for kind in args.indexes if kind != "hnsw" or n <= args.hnsw_max_size]
    for kind in kinds:
        before = rss_mb()
        store = LongTermStore(1, args.hidden, args.key_dim, index=kind)
        for start in range(0, n, 2**16):  # arrives in pieces, as evicted slots do
            stop = min(n, start + 2**16)
            slots = torch.zeros(stop - start, args.hidden, dtype=torch.float16)
            store.add(0, slots, keys[start:stop], torch.arange(start, stop) // 256)
        t0 = time.perf_counter()
        store.search(0, prompts[0], k)  # an approximate index is built (or read) at the first search
        build_s = time.perf_counter() - t0
        indexed = kind != "exact" and store._layers[0].index.index is not None
        stores[kind] = store
        searches[kind] = lambda queries, store=store: store.search(0, queries, k)[0]
        result["methods"][kind] = {
            "build_s": build_s if kind != "exact" else None,
            "resident_mb": rss_mb() - before,
            "note": "" if kind == "exact" or indexed else "searched exactly: below min_size",
        }
        print(f"  [{n:,}] built {kind} store ({build_s:.1f} s)", file=sys.stderr, flush=True)
    # M+'s retrieval of whole writes (retrieval_unit="write"): candidates from the index, grouped by write
    writes_from = "ivf" if "ivf" in stores else "exact"
    searches[f"{writes_from}, whole writes"] = lambda queries: top_writes(stores[writes_from], 0, queries, k, 1)
    result["methods"][f"{writes_from}, whole writes"] = {"build_s": None, "resident_mb": 0.0, "note": "writes"}
    # write_ranking="first_layer": every prompt token's own top K slots propose writes (one per-row
    # search), the candidates are scored by late interaction and read whole (K slots each)
    searches[f"{writes_from}, token writes"] = lambda queries: collect_writes(
        stores[writes_from], 0, rank_writes(stores[writes_from], 0, queries, 256, max_writes=FULLY_SCORED * k // 256),
        k, per_write=256)  # fmt: skip
    result["methods"][f"{writes_from}, token writes"] = {"build_s": None, "resident_mb": 0.0, "note": "first_layer"}
    if args.data != "iso":  # write_ranking="tokens": writes indexed by their tokens, ranked by the prompt's rare ones
        prompt_tokens = add_write_tokens(stores[writes_from], n, args)
        searches[f"{writes_from}, by tokens"] = lambda queries: collect_writes(
            stores[writes_from], 0, rank_writes_by_tokens(stores[writes_from], prompt_tokens[id(queries)], TOKEN_COMMON),
            k, per_write=256)  # fmt: skip
        result["methods"][f"{writes_from}, by tokens"] = {"build_s": None, "resident_mb": 0.0, "note": "tokens"}

    times = {name: [] for name in searches}
    found = {name: [] for name in searches}
    for _ in range(args.reps):
        for p, queries in enumerate(prompts):
            for name, search in searches.items():
                t0 = time.perf_counter()
                indices = search(queries)
                times[name].append(time.perf_counter() - t0)
                if len(found[name]) < len(prompts):
                    found[name].append(set(indices.tolist()))
    result["methods"]["full scan"] = {"build_s": None, "resident_mb": keys.numel() * 4 / 2**20, "note": ""}
    for name, search in searches.items():
        reset_peak()
        base = rss_mb()
        search(prompts[0])
        entry = result["methods"][name]
        entry["search_peak_mb"] = peak_mb() - base
        entry["median_ms"] = statistics.median(times[name]) * 1e3
        entry["recall"] = statistics.mean(len(f & e) / k for f, e in zip(found[name], found["exact"]))
        if args.data != "iso":  # how often the write the prompt asks about is among the retrieved slots
            writes = [{i // 256 for i in f} for f in found[name]]
            entry["write_found"] = statistics.mean(t in w for t, w in zip(make_data.targets, writes))
    result["worker_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.save_to:
        kind = next((kind for kind in reversed(kinds) if kind != "exact"), "exact")
        t0 = time.perf_counter()
        stores[kind].save(args.save_to)
        result["saved"] = {"kind": kind, "save_s": time.perf_counter() - t0}
    return result


def open_worker(args) -> dict:
    path = Path(args.open_path)
    queries = make_data(args, 1000)[1][0]  # any prompt: this times the first search, not its result
    before = rss_mb()
    t0 = time.perf_counter()
    store = LongTermStore.open(path)
    open_s = time.perf_counter() - t0
    after = rss_mb()
    layer = store._layers[0]
    mapped = isinstance(layer.slots.base, np.memmap) and isinstance(layer.keys.base, np.memmap)
    t0 = time.perf_counter()
    store.search(0, queries, args.k)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.search(0, queries, args.k)
    second_s = time.perf_counter() - t0
    arrays = sum(f.stat().st_size for f in path.rglob("*.npy"))
    index = sum(f.stat().st_size for f in path.rglob("*.faiss"))
    return {
        "size": store.size(0), "hidden": store.hidden_size, "index": store.index_kind, "open_s": open_s,
        "open_rss_mb": after - before, "mapped": mapped, "arrays_mb": arrays / 2**20, "index_mb": index / 2**20,
        "first_search_s": first_s, "second_search_s": second_s, "rss_after_search_mb": rss_mb() - before,
    }  # fmt: skip


# --- driver -------------------------------------------------------------------------------------
def run_worker(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_size(r: dict) -> None:
    full = r["methods"]["full scan"]["median_ms"]
    print(f"\n{r['size']:,} slots/layer (worker peak RSS {r['worker_peak_mb']:,.0f} MB)")
    print(f"  {'method':<20} {'search ms':>10} {'speed-up':>9} {'recall@k':>9} {'write found':>11} {'build s':>8} "
          f"{'resident MB':>12} {'search peak MB':>15}  note")  # fmt: skip
    for name, m in r["methods"].items():
        build = f"{m['build_s']:.1f}" if m["build_s"] is not None else "-"
        found = f"{m['write_found']:.2f}" if "write_found" in m else "-"
        print(f"  {name:<20} {m['median_ms']:>10.2f} {full / m['median_ms']:>8.1f}x {m['recall']:>9.3f} {found:>11} "
              f"{build:>8} {m['resident_mb']:>12,.0f} {m['search_peak_mb']:>15,.1f}  {m['note']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="slots per layer")
    parser.add_argument("--indexes", nargs="+", default=["ivf", "hnsw"], choices=["ivf", "hnsw"])
    parser.add_argument("--hnsw-max-size", type=int, default=100_000,
                        help="skip HNSW above this size (building 1M keys takes >5 min on 2 cores)")  # fmt: skip
    parser.add_argument("--key-dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256, help="slot width (small for disk; search never reads slots)")
    parser.add_argument("--k", type=int, default=2560, help="slots retrieved per layer (num_ltm_blocks * K)")
    parser.add_argument("--queries", type=int, default=32, help="query rows per prompt (prompt tokens)")
    parser.add_argument("--data", choices=["clustered", "iso"], default="clustered")
    parser.add_argument("--logit-std", type=float, default=3.0)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the saved store goes (default: a temp folder)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-to", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--open-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(worker(args, args.worker)))
        return
    if args.open_path is not None:
        print(json.dumps(open_worker(args)))
        return

    passthrough = _strip_option(sys.argv[1:], "--sizes")
    print(f"latentmem LTM retrieval benchmark  python {platform.python_version()}  torch {torch.__version__}  "
          f"numpy {np.__version__}  cpus {os.cpu_count()}  torch threads {torch.get_num_threads()}  "
          f"load avg {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"config: sizes {args.sizes}, key_dim {args.key_dim}, k {args.k}, queries/prompt {args.queries}, "
          f"data {args.data} (logit std {args.logit_std}), approximate {args.indexes} (hnsw up to "
          f"{args.hnsw_max_size:,}), prompts {args.prompts} x reps {args.reps}, slot hidden {args.hidden} float16")  # fmt: skip
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ltm_"))
    saved = workdir / "ltm"
    results = []
    for n in args.sizes:
        extra = ["--save-to", str(saved)] if n == max(args.sizes) else []
        results.append(run_worker([*passthrough, "--worker", str(n), *extra]))
        report_size(results[-1])
    opened = run_worker([*passthrough, "--open-path", str(saved)])
    largest = results[-1] if results[-1]["size"] == max(args.sizes) else max(results, key=lambda r: r["size"])
    print(f"\nopen a saved store ({opened['size']:,} slots, slots {opened['hidden']}-wide float16 - small for disk, "
          f"index {opened['index']}; page cache warm: the files were just written)")  # fmt: skip
    print(f"  save {largest['saved']['save_s']:.1f} s; arrays {opened['arrays_mb']:,.0f} MB + index "
          f"{opened['index_mb']:,.0f} MB on disk")  # fmt: skip
    print(f"  open {opened['open_s'] * 1e3:.1f} ms, resident +{opened['open_rss_mb']:.1f} MB, "
          f"memory-mapped: {opened['mapped']}")  # fmt: skip
    print(
        f"  first search {opened['first_search_s']:.2f} s (reads the index file), then "
        f"{opened['second_search_s'] * 1e3:.1f} ms; resident after searching +{opened['rss_after_search_mb']:,.0f} MB"
    )

    print("\nacceptance")
    for kind in [*args.indexes, *(name for name in largest["methods"] if name.endswith(("token writes", "by tokens")))]:
        m = largest["methods"].get(kind)
        if m is None:
            print(f"  {kind}: not run at {largest['size']:,} (see --hnsw-max-size)")
            continue
        speed = largest["methods"]["full scan"]["median_ms"] / m["median_ms"]
        # slot searches answer to the exact top k; whole-write ranking to finding the write asked about
        metric, value = ("write found", m.get("write_found", 0.0)) if m["note"] in ("first_layer", "tokens") else (
            f"recall@{args.k}", m["recall"])  # fmt: skip
        print(f"  {kind} at {largest['size']:,} slots/layer: {speed:.1f}x faster than the full scan (target >= 20x: "
              f"{'PASS' if speed >= 20 else 'FAIL'}), {metric} {value:.3f} (target >= 0.9: "
              f"{'PASS' if value >= 0.9 else 'FAIL'})")  # fmt: skip
    small = opened["open_rss_mb"] < 0.05 * opened["arrays_mb"]
    print(f"  open {opened['size']:,}-slot store: {opened['open_s'] * 1e3:.1f} ms (target < 1 s: "
          f"{'PASS' if opened['open_s'] < 1 else 'FAIL'}), +{opened['open_rss_mb']:.1f} MB resident vs "
          f"{opened['arrays_mb']:,.0f} MB of arrays (target well below: {'PASS' if small else 'FAIL'})")  # fmt: skip
    print(f"  load avg at the end {os.getloadavg()[0]:.1f} (other processes share these cores)")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


def _strip_option(argv: list[str], option: str) -> list[str]:
    """argv without `option` and its values (the driver passes one size per worker)."""
    out, skipping = [], False
    for arg in argv:
        if arg == option or arg.startswith(option + "="):
            skipping = arg == option
            continue
        if skipping and not arg.startswith("--"):
            continue
        skipping = False
        out.append(arg)
    return out


if __name__ == "__main__":
    main()

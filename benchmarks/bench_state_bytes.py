#!/usr/bin/env python
"""Bytes written per write and bytes per user, for journaled and whole saves (issue #20, part 4).

A state is written (K random new slots per layer, random drops, as `pool.write_slots` does) and saved
after every write, by actually saving to disk, three ways in the same run:

- whole: `save_state(state, path)` rewrites the file every time (the format before);
- journal: `save_state(..., journal=True)` appends the change to `<file>.journal`, folding it into a
  new base file when it would pass `JOURNAL_LIMIT` x the base (compaction, counted when it happens);
- journal int8: the same with `slot_dtype="int8"` (int8 codes + a float32 scale per slot).

Bytes written per save are the bytes the process sent to storage (`/proc/self/io` write_bytes, which
also counts memory-mapped writes of the long-term store), read after each save's fsync. "Per write"
is the mean over one whole compaction cycle (every append and the compaction that ends it), and
also the append alone. Bytes per user are the files on disk after each save (base + journal +
long-term store), mean and largest over the cycle. The reference is the K new slots themselves,
L x K x d in the state's dtype.

Shapes: `small` runs as given. `memoryllm-8b` (32 layers, N = 12800, K = 256, d = 4096, bfloat16)
and `mplus-8b` (N = 10240 short-term slots, 10 of 50 blocks retrieved; ~150k long-term slots per
layer) are measured with fewer layers (and, for M+, fewer long-term slots) than the real ones, so
they fit this machine, and scaled: everything but a few kB of manifest is per layer, and the
long-term store's bytes are per slot. The output says which numbers are scaled.

    python benchmarks/bench_state_bytes.py                      # small, memoryllm-8b, mplus-8b
    python benchmarks/bench_state_bytes.py --shapes small       # a quick check
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from latentmem.persistence import JOURNAL_LIMIT, save_state
from latentmem.pool import write_slots
from latentmem.state import MemoryState

MiB = 2**20
SHAPES = {
    # name: layers measured, real layers, N, K, d, dtype, long-term slots per layer (measured, real), key dim
    "small": {"layers": 4, "real_layers": 4, "N": 512, "K": 64, "d": 128, "dtype": torch.float32, "ltm": None},
    "small-mplus": {
        "layers": 4,
        "real_layers": 4,
        "N": 512,
        "K": 64,
        "d": 128,
        "dtype": torch.float32,
        "ltm": (2000, 2000),
        "h": 32,
    },
    "memoryllm-8b": {
        "layers": 2,
        "real_layers": 32,
        "N": 12800,
        "K": 256,
        "d": 4096,
        "dtype": torch.bfloat16,
        "ltm": None,
    },
    "mplus-8b": {
        "layers": 1,
        "real_layers": 32,
        "N": 10240,
        "K": 256,
        "d": 4096,
        "dtype": torch.bfloat16,
        "ltm": (10000, 150000),
        "h": 256,
    },
}


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("write_bytes")).split()[1])


def disk_bytes(folder: Path) -> int:
    seen, total = set(), 0
    for file in folder.rglob("*"):
        if file.is_file():
            st = file.stat()
            if (st.st_dev, st.st_ino) not in seen:  # hard links of one long-term file count once
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def new_state(shape: dict, seed: int = 0) -> MemoryState:
    L, N, d = shape["layers"], shape["N"], shape["d"]
    state = MemoryState(L, N, d, dtype=shape["dtype"], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    write(state, shape, generator, first=True)  # a first write tiles: a full pool of slots
    if shape["ltm"]:
        from latentmem.ltm import LongTermStore

        state.ltm = LongTermStore(L, d, shape["h"], dtype=shape["dtype"])
        M, step = shape["ltm"][0], 4096
        for layer in range(L):
            for start in range(0, M, step):
                n = min(step, M - start)
                slots = torch.randn(n, d, generator=generator).to(shape["dtype"])
                state.ltm.add(layer, slots, torch.randn(n, shape["h"], generator=generator), torch.full((n,), -1))
    return state


def write(state: MemoryState, shape: dict, generator: torch.Generator, first: bool = False) -> None:
    K, d = shape["K"], shape["d"]
    injection = state.record_injection("bench", K)
    slots = torch.randn(state.num_layers, K, d, generator=generator).to(state.dtype)
    evicted = write_slots(state, slots, injection.id, per_layer=True)
    if state.ltm is not None and evicted is not None:  # as M+'s after_write: evicted slots into long-term memory
        state.ltm.advance_ages(K)
        for layer in range(state.num_layers):
            keys = torch.randn(K, shape["h"], generator=generator)
            state.ltm.add(layer, evicted.slots[layer], keys, evicted.sources[layer])


def run(shape: dict, mode: str, folder: Path, writes: int | None) -> dict:
    """Saves after each write until one compaction cycle is complete (journal) or `writes` saves (whole)."""
    path = folder / "state.safetensors"
    generator = torch.Generator().manual_seed(1)
    state = new_state(shape)
    options = {"whole": {}, "journal": {"journal": True}, "journal int8": {"journal": True, "slot_dtype": "int8"}}[mode]
    save_state(state, path, **options)
    per_save, appends, on_disk, seconds, short_term, state_files = [], [], [], [], [], []
    journal = path.parent / f"{path.name}.journal"
    while True:
        write(state, shape, generator)
        identity = path.stat().st_ino
        journal_before = journal.stat().st_size if journal.exists() else 0
        before, start = written_bytes(), time.perf_counter()
        save_state(state, path, **options)
        seconds.append(time.perf_counter() - start)
        per_save.append(written_bytes() - before)
        on_disk.append(disk_bytes(folder))
        state_files.append(sum(p.stat().st_size for p in (path, journal) if p.exists()))
        replaced = path.stat().st_ino != identity
        journal_now = journal.stat().st_size if journal.exists() else 0
        short_term.append(path.stat().st_size if replaced else journal_now - journal_before)  # the file's share
        if mode == "whole" or shape["ltm"]:  # M+: a few saves (each rewrites the long-term store)
            if len(per_save) >= writes:
                break
        elif replaced:  # a new base: the compaction that ends the cycle
            break
        if not replaced:
            appends.append(per_save[-1])
    return {
        "per_write": sum(per_save) / len(per_save),
        "append": (sum(appends) / len(appends)) if appends else None,
        "short_term": sum(short_term) / len(short_term),
        "saves": len(per_save),
        "disk_mean": sum(on_disk) / len(on_disk),
        "state_files_mean": sum(state_files) / len(state_files),
        "disk_max": max(on_disk),
        "seconds": sum(seconds) / len(seconds),
        "ltm_slots": state.ltm.size(0) if state.ltm is not None else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="small,memoryllm-8b,mplus-8b")
    parser.add_argument("--dir", default=None, help="where to save (default: a temporary folder)")
    parser.add_argument("--writes", type=int, default=4, help="saves measured for whole files and for M+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"journal limit {JOURNAL_LIMIT} x base; bytes from /proc/self/io write_bytes")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        L, real = shape["layers"], shape["real_layers"]
        item = torch.empty(0, dtype=shape["dtype"]).element_size()
        new_slots = L * shape["K"] * shape["d"] * item
        print(
            f"\n## {name}: {L} of {real} layers measured, N={shape['N']}, K={shape['K']}, d={shape['d']}, "
            f"{str(shape['dtype']).removeprefix('torch.')}"
            + (f", {shape['ltm'][0]} of {shape['ltm'][1]} long-term slots per layer measured" if shape["ltm"] else "")
        )
        print(f"K new slots: {new_slots / MiB:.2f} MiB measured, {new_slots * real / L / MiB:.1f} MiB at {real} layers")
        results = {}
        for mode in ("whole", "journal", "journal int8"):
            folder = Path(tempfile.mkdtemp(prefix="bench-state-", dir=args.dir))
            try:
                results[mode] = run(shape, mode, folder, writes=args.writes)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        whole = results["whole"]["per_write"]
        print(
            "| save | per write (MiB, measured) | x K new slots | x whole rewrite | append only (x K new) | "
            "per user mean / max (MiB, measured) | per write at full shape (MiB) | per user mean at full shape (MiB) | s per save |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for mode, r in results.items():
            scale = real / L  # per layer; the long-term store's share is scaled by its slots below
            append = f"{r['append'] / new_slots:.2f}" if r["append"] else "-"
            full_write, full_user = (
                ("see below", "see below")
                if shape["ltm"]
                else (f"{r['per_write'] * scale / MiB:.0f}", f"{r['disk_mean'] * scale / MiB:.0f}")
            )
            print(
                f"| {mode} | {r['per_write'] / MiB:.2f} | {r['per_write'] / new_slots:.2f} | {r['per_write'] / whole:.3f} | "
                f"{append} | {r['disk_mean'] / MiB:.1f} / {r['disk_max'] / MiB:.1f} | {full_write} | "
                f"{full_user} | {r['seconds']:.3f} |"
            )
        if shape["ltm"]:
            full = shape["ltm"][1]
            scale = real / L
            print(
                f"M+: {args.writes} saves each, so no compaction cycle: the journal rows' 'per write' is appends only. "
                f"Split per write (measured): the state file's share (journal record or whole file) and the long-term "
                f"store's (the rest); at full shape the long-term share is scaled by {full}/{results['journal']['ltm_slots']} "
                f"slots and {real}/{L} layers."
            )
            print(
                "| save | state file per write (MiB) | long-term store per write (MiB) | state file per write at full "
                "shape (MiB) | long-term per write at full shape (GiB) | per user at full shape (GiB) |"
            )
            print("|---|---|---|---|---|---|")
            for mode, r in results.items():
                ltm_share = r["per_write"] - r["short_term"]
                grow = scale * full / r["ltm_slots"]
                user = r["state_files_mean"] * scale + (r["disk_mean"] - r["state_files_mean"]) * grow
                print(
                    f"| {mode} | {r['short_term'] / MiB:.2f} | {ltm_share / MiB:.1f} | {r['short_term'] * scale / MiB:.0f} | "
                    f"{ltm_share * grow / 2**30:.1f} | {user / 2**30:.1f} |"
                )


if __name__ == "__main__":
    main()

"""An official M+ folder's long-term memory streams into a memory-mapped store (issue 18).

mplus-8b ships ~40 GB of long-term memory; loading must not need that much RAM. The folder here is
built as the release saves it (tests/test_official_mplus.py), with a long-term memory hundreds of
times the size of the model, sharded; a fresh process loads it, starts a memory from it and reads a
prompt, and its peak resident memory must grow by a small fraction of that size. (Peak = VmHWM of
/proc/self/status: getrusage's ru_maxrss would start at the pytest parent's peak, which Linux
carries over fork and exec.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from test_official_mplus import build_release_folder

SLOTS_PER_LAYER = 100_000
WIDE = {"hidden_size": 256}  # 1 KB per slot, so the slots dominate as in mplus-8b (8 KB per slot)

CHILD = """
import json, sys, torch
import latentmem

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

torch.set_num_threads(1)
warm = latentmem.MPlus.from_pretrained(sys.argv[2])  # everything imported and run once, on a tiny memory
with torch.no_grad():
    warm(torch.tensor([[1, 2, 3]]), memory=warm.initial_memory())
start = peak()
model = latentmem.MPlus.from_pretrained(sys.argv[1])
loaded = peak()
state = model.initial_memory()
ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(ids, memory=state).logits
print(json.dumps({"start": start, "loaded": loaded, "read": peak(), "finite": bool(torch.isfinite(logits).all()),
                  "size": state.ltm.size(0)}))
"""


def test_loading_a_large_long_term_memory_keeps_peak_memory_far_below_its_size(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    build_release_folder(tmp_path / "small", backbone=WIDE)
    model = build_release_folder(tmp_path / "big", ltm_size=SLOTS_PER_LAYER, max_shard_size="100MB", backbone=WIDE)
    ltm_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name.startswith("ltm"))
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("ltm"))
    del model
    assert len(list((tmp_path / "big").glob("model-*.safetensors"))) >= 3 and ltm_bytes > 50 * weight_bytes
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "small")], capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **_python_env()},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    assert numbers["finite"] and numbers["size"] == SLOTS_PER_LAYER
    grown_loading, grown_reading = numbers["loaded"] - numbers["start"], numbers["read"] - numbers["start"]
    print(f"long-term memory {ltm_bytes / 2**20:.0f} MiB; peak RSS {numbers['start'] / 2**20:.0f} MiB after imports, "
          f"+{grown_loading / 2**20:.0f} MiB after loading, +{grown_reading / 2**20:.0f} MiB after a read")  # fmt: skip
    # loading holds per-slot records (40 bytes a slot: 4% here, 0.5% in mplus-8b) and chunks in flight
    assert grown_loading < ltm_bytes / 5
    # a read also maps the pages of the keys file it scores (clean file pages, which the kernel may
    # drop) and those around the R slots it reads
    assert grown_reading < ltm_bytes / 4


def _python_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "VIRTUAL_ENV", "TMPDIR")}


def test_streamed_long_term_memory_is_memory_mapped_not_copied_into_ram(tmp_path):
    build_release_folder(tmp_path, ltm_size=64)
    from latentmem import MPlus

    state = MPlus.from_pretrained(tmp_path).initial_memory()
    memory = state.ltm._layers[0]
    assert memory.slots.tail_len == 0 and memory.slots.base.filename is not None  # np.memmap of a file
    assert torch.equal(state.ltm.get(0, [63])["slots"], state.ltm.get(0, torch.arange(64))["slots"][63:])

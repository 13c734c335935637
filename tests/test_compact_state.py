"""Compact per-user state (issue #20, part 4): int8 slots, and saves that append only what changed."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from latentmem import MemoryFileError, MemoryState
from latentmem.journal import journal_path
from latentmem.persistence import compact_state, load_state, read_manifest, save_state
from latentmem.pool import write_slots
from latentmem.quantize import dequantize_rows, quantize_rows, round_trip_

from conftest import make_model, random_ids

SHAPE = (3, 32, 16)  # layers, slots, hidden
K = 8


def write(state: MemoryState, seed: int, per_layer: bool = True) -> None:
    """One write of K random slots (a fresh injection record), as `inject` stores them."""
    injection = state.record_injection(f"doc-{seed}", 20)
    slots = torch.randn(state.num_layers, K, state.shape[2], generator=torch.Generator().manual_seed(seed))
    write_slots(state, slots, injection.id, per_layer)


def written(writes: int = 3, seed: int = 5, **kwargs) -> MemoryState:
    state = MemoryState(*SHAPE, seed=seed)
    for i in range(writes):
        write(state, 100 + i, **kwargs)
    return state


def assert_same(a: MemoryState, b: MemoryState, timestamps: bool = True) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.stm, b.stm)  # bit for bit
    assert torch.equal(a.ages, b.ages) and torch.equal(a.sources, b.sources)
    assert a.write_count == b.write_count and a.initialized == b.initialized
    strip = (lambda i: (i.id, i.source, i.tokens, i.importance)) if not timestamps else (lambda i: i)
    assert [strip(i) for i in a.injections.values()] == [strip(i) for i in b.injections.values()]
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


# --- int8 -----------------------------------------------------------------------------------
def test_int8_round_trip_error_is_at_most_half_a_step():
    x = torch.randn(4, 50, 64) * torch.rand(4, 50, 1) * 10
    x[0, 0] = 0  # an all-zero slot stays zero
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.shape == (4, 50)
    back = dequantize_rows(codes, scale, torch.float32)
    bound = x.abs().amax(-1, keepdim=True) / 254  # half a step of max|x| / 127
    assert ((back - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(back[0, 0], torch.zeros(64))
    again, _ = quantize_rows(back)
    assert torch.equal(again, codes)  # float32: a slot loses precision once


def test_int8_save_loads_as_the_round_trip(tmp_path):
    state = written()
    save_state(state, tmp_path / "m.safetensors", slot_dtype="int8")
    manifest = read_manifest(tmp_path / "m.safetensors")
    assert manifest["slots"] == "int8" and manifest["format_version"] == 2
    loaded = load_state(tmp_path / "m.safetensors")
    assert loaded.dtype == state.dtype
    round_trip_(state)
    assert_same(loaded, state)
    full = tmp_path / "f.safetensors"
    save_state(state, full)
    L, N, d = SHAPE  # slots: d + 4 bytes (codes, scale) instead of 4 d
    saved = full.stat().st_size - (tmp_path / "m.safetensors").stat().st_size
    assert abs(saved - L * N * (4 * d - d - 4)) < 256  # up to the headers


def test_int8_bfloat16_pool(tmp_path):
    state = MemoryState(*SHAPE, dtype=torch.bfloat16, seed=1)
    write(state, 1)
    save_state(state, tmp_path / "m.safetensors", slot_dtype="int8")
    loaded = load_state(tmp_path / "m.safetensors")
    assert loaded.dtype == torch.bfloat16
    err = (loaded.stm.float() - state.stm.float()).abs().amax(-1) / state.stm.float().abs().amax(-1)
    assert err.max() < 1 / 127  # half a step plus bfloat16 rounding


# --- the journal ----------------------------------------------------------------------------
@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("slot_dtype", [None, "int8"])
def test_journal_replay_equals_a_whole_save(tmp_path, per_layer, slot_dtype):
    state = written(per_layer=per_layer)
    path = tmp_path / "m.safetensors"
    save_state(state, path, journal=True, slot_dtype=slot_dtype, journal_limit=100)
    base_size = path.stat().st_size
    for i in range(4):
        write(state, i, per_layer=per_layer)
        if i != 2:  # two writes between saves: one record
            save_state(state, path, journal=True, slot_dtype=slot_dtype, journal_limit=100)
            assert path.stat().st_size == base_size  # the base is not rewritten
    save_state(state, tmp_path / "whole.safetensors", slot_dtype=slot_dtype)
    journaled, whole = load_state(path), load_state(tmp_path / "whole.safetensors")
    assert_same(journaled, whole)
    if slot_dtype is None:
        assert_same(journaled, state)
    record = (journal_path(path).stat().st_size - 200) / 3  # three records (and a start record)
    assert record < 0.9 * base_size  # at this small shape the generator state (6.7 kB) is most of it
    manifest = read_manifest(path)
    assert manifest["write_count"] == state.write_count and len(manifest["injections"]) == len(state.injections)


def test_loaded_state_keeps_appending(tmp_path):
    state, path = written(), tmp_path / "m.safetensors"
    save_state(state, path, journal=True)
    write(state, 1)
    save_state(state, path, journal=True)
    loaded = load_state(path)
    write(loaded, 2)
    write(state, 2)
    save_state(loaded, path, journal=True)
    assert read_manifest(path)["journal"] and journal_path(path).exists()
    assert_same(load_state(path), state, timestamps=False)  # the same writes, made at other times


def test_a_state_written_otherwise_is_saved_whole(tmp_path):
    state, path = written(), tmp_path / "m.safetensors"
    save_state(state, path, journal=True)
    state.stm = torch.randn(SHAPE)  # not a write: no record can express it
    write(state, 3)
    save_state(state, path, journal=True)
    assert not journal_path(path).exists()  # a new base, no journal yet
    assert_same(load_state(path), state)


def test_torn_last_record_is_ignored(tmp_path):
    state, path = written(), tmp_path / "m.safetensors"
    save_state(state, path, journal=True)
    write(state, 1)
    save_state(state, path, journal=True)
    acknowledged = load_state(path)
    good = journal_path(path).stat().st_size
    write(state, 2)
    save_state(state, path, journal=True)
    full = journal_path(path).read_bytes()
    for cut in (good + 3, good + 60, len(full) - 1):  # inside the header, the meta, the body
        journal_path(path).write_bytes(full[:cut])
        assert_same(load_state(path), acknowledged)
        assert read_manifest(path)["write_count"] == acknowledged.write_count
    journal_path(path).write_bytes(full[:good] + bytes(len(full) - good))  # allocated, never written
    assert_same(load_state(path), acknowledged)
    # Appending after a torn record: the state saves whole (never behind the torn bytes).
    loaded = load_state(path)
    write(loaded, 7)
    save_state(loaded, path, journal=True)
    assert_same(load_state(path), loaded)


def test_damaged_record_before_the_end_raises(tmp_path):
    state, path = written(), tmp_path / "m.safetensors"
    save_state(state, path, journal=True)
    for i in range(2):
        write(state, i)
        save_state(state, path, journal=True)
    data = bytearray(journal_path(path).read_bytes())
    data[300] ^= 0xFF  # inside the first record, a second follows
    journal_path(path).write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match="journal"):
        load_state(path)


def test_stale_journal_is_ignored(tmp_path):
    state, path = written(), tmp_path / "m.safetensors"
    save_state(state, path, journal=True)
    write(state, 1)
    save_state(state, path, journal=True)
    stale = journal_path(path).read_bytes()
    other = written(seed=9)
    save_state(other, path, journal=True)  # a whole save of another state: a new journal id
    journal_path(path).write_bytes(stale)  # as if a crash left the old journal behind
    assert_same(load_state(path), other)


def test_compaction_folds_the_journal_into_a_new_base(tmp_path):
    state, path = written(), tmp_path / "m.safetensors"
    save_state(state, path, journal=True, journal_limit=0.6)
    sizes = []
    for i in range(8):
        write(state, i)
        save_state(state, path, journal=True, journal_limit=0.6)
        sizes.append(journal_path(path).stat().st_size if journal_path(path).exists() else 0)
        assert journal_path(path).exists() is False or sizes[-1] <= 0.6 * path.stat().st_size
        assert_same(load_state(path), state)
    assert 0 in sizes  # compacted at least once
    compact_state(path)
    assert not journal_path(path).exists()
    assert_same(load_state(path), state)


# --- a first write saved as one copy ------------------------------------------------------
WIDE = (2, 512, 64)  # enough slots that the pool, not the generator state (6.7 kB), is most of a file


def first_write(slots: int = 5, seed: int = 7) -> MemoryState:
    """A state after one write of `slots` slots: the pool is that write tiled (512 = 102 copies + 2)."""
    state = MemoryState(*WIDE, seed=seed)
    injection = state.record_injection("first", 20)
    write_slots(state, torch.randn(WIDE[0], slots, WIDE[2], generator=torch.Generator().manual_seed(seed)),
                injection.id, per_layer=True)  # fmt: skip
    return state


@pytest.mark.parametrize("slot_dtype", [None, "int8"])
def test_a_first_write_is_saved_as_one_copy(tmp_path, slot_dtype):
    state, path = first_write(), tmp_path / "m.safetensors"
    save_state(state, path, slot_dtype=slot_dtype)
    whole = first_write()
    write(whole, 1)  # no longer one write tiled
    save_state(whole, tmp_path / "full.safetensors", slot_dtype=slot_dtype)
    manifest = read_manifest(path)
    assert manifest["tiled"] == 5 and manifest["format_version"] == 3
    assert path.stat().st_size < (tmp_path / "full.safetensors").stat().st_size / 5
    loaded = load_state(path)
    if slot_dtype is None:
        assert_same(loaded, state)
    else:
        round_trip_(state)
        assert_same(loaded, state)
    assert loaded.tile_period == 5  # saved again, still one copy
    save_state(loaded, tmp_path / "again.safetensors", slot_dtype=slot_dtype)
    assert read_manifest(tmp_path / "again.safetensors")["tiled"] == 5


def test_an_empty_state_is_saved_as_one_slot(tmp_path):
    state, path = MemoryState(*WIDE, seed=3), tmp_path / "m.safetensors"
    state.record_injection("recorded, never written", 4)
    save_state(state, path)
    assert read_manifest(path)["tiled"] == 1
    loaded = load_state(path)
    assert not loaded.initialized
    assert_same(loaded, state)


def test_a_pool_changed_in_place_is_not_trusted_to_be_tiled(tmp_path):
    state, path = first_write(), tmp_path / "m.safetensors"
    state.stm[1, 20, 3] += 1.0  # behind the state's back: tile_period still says 5
    save_state(state, path)
    assert "tiled" not in read_manifest(path)
    assert_same(load_state(path), state)


def test_writes_after_a_tiled_base_append_to_its_journal(tmp_path):
    state, path = first_write(), tmp_path / "m.safetensors"
    save_state(state, path, journal=True)  # journal_limit as served: measured against the untiled pool
    base = path.stat()
    assert base.st_size < 30_000  # a 2.0 limit against this file would compact at the second record
    for i in range(3):
        write(state, 50 + i)
        save_state(state, path, journal=True)
        assert path.stat().st_ino == base.st_ino and path.stat().st_mtime_ns == base.st_mtime_ns
    assert journal_path(path).exists()
    assert_same(load_state(path), state)


@pytest.mark.parametrize("period", [0, 512, 4, "5"])
def test_a_malformed_tile_period_is_refused(tmp_path, period):
    from test_persistence import resave_with_manifest
    from latentmem.persistence import _manifest_checksum

    path = tmp_path / "m.safetensors"
    save_state(first_write(), path)
    manifest = {**read_manifest(path), "tiled": period}
    manifest["manifest_checksum"] = _manifest_checksum(manifest)
    resave_with_manifest(path.read_bytes(), path, **manifest)
    with pytest.raises(MemoryFileError, match="tiled"):
        load_state(path)


def test_old_files_load_as_before(tmp_path):
    state, path = written(), tmp_path / "m.safetensors"
    save_state(state, path)  # no int8, no journal: the version-1 file of before
    manifest = read_manifest(path)
    assert manifest["format_version"] == 1 and "journal" not in manifest and "slots" not in manifest
    assert_same(load_state(path), state)
    journal_path(path).write_bytes(b"junk")  # a file without a journal id reads no journal
    assert_same(load_state(path), state)


def test_model_writes_and_mplus_long_term_memory(tmp_path):
    from test_mplus import make_mplus

    for model in (make_model(), make_mplus()):
        state, path = model.new_memory(seed=3), tmp_path / f"{type(model).__name__}.safetensors"
        model.inject(state, random_ids(20, seed=1), source="a")
        save_state(state, path, journal=True)
        for i in range(3):
            model.inject(state, random_ids(20, seed=10 + i), source=f"b{i}")
            save_state(state, path, journal=True)
        loaded = load_state(path, model)
        assert_same(loaded, state)
        if state.ltm is not None:
            assert loaded.ltm.size(0) == state.ltm.size(0) > 0
            assert len(list(tmp_path.glob(f"{path.name}.ltm-*"))) == 1  # the journal's generation only
        question = random_ids(6, seed=99)
        assert torch.equal(model(question, memory=loaded).logits, model(question, memory=state).logits)


def test_server_registry_saves_into_a_journal(tmp_path):
    from latentmem.server.states import StateRegistry

    model = make_model()
    registry = StateRegistry(model, tmp_path, journal=True, slot_dtype=None)
    for i in range(3):
        with registry.write("ada", "default") as slot:
            model.inject(slot.state, random_ids(20, seed=i), source=f"s{i}")
        expected = slot.state
    file = registry.path("ada", "default")
    assert journal_path(file).exists()
    assert registry.sessions("ada")[0]["writes"] == 3
    assert registry.sessions("ada")[0]["bytes"] == file.stat().st_size + journal_path(file).stat().st_size
    registry.close()
    again = StateRegistry(model, tmp_path)  # the index rebuilt from the files and journals
    assert again.sessions("ada")[0]["writes"] == 3
    assert again.sessions("ada")[0]["bytes"] == file.stat().st_size + journal_path(file).stat().st_size
    with again.read("ada", "default") as state:
        assert_same(state, expected)


# --- kill -9 while saving -------------------------------------------------------------------
# Writes and journaled saves in a loop; after each save returns, prints the write count (an
# acknowledged write). Imports without latentmem/__init__ (transformers) to start fast.
WRITER = r"""
import importlib.util, sys, types
import torch
torch.set_num_threads(1)
package = types.ModuleType("latentmem")
package.__path__ = list(importlib.util.find_spec("latentmem").submodule_search_locations)
sys.modules["latentmem"] = package
from latentmem.persistence import load_state, save_state
from latentmem.pool import write_slots
path = sys.argv[1]
state = load_state(path)
while True:
    injection = state.record_injection("w", 20)
    slots = torch.randn(state.num_layers, 256, state.shape[2], generator=torch.Generator().manual_seed(state.write_count))
    write_slots(state, slots, injection.id, True)
    save_state(state, path, journal=True)
    print(state.write_count, flush=True)
"""


def replayed(writes: int, shape) -> MemoryState:
    """What WRITER's state is after `writes` writes (each write's slots seeded by the count before it)."""
    state = MemoryState(*shape, seed=0)
    for _ in range(writes):
        injection = state.record_injection("w", 20)
        slots = torch.randn(shape[0], 256, shape[2], generator=torch.Generator().manual_seed(state.write_count))
        write_slots(state, slots, injection.id, True)
    return state


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_loses_no_acknowledged_write(tmp_path):
    shape = (2, 2048, 64)  # records of 130 kB: appends take long enough to be cut
    path = tmp_path / "m.safetensors"
    save_state(replayed(1, shape), path, journal=True)
    rng, acknowledged = random.Random(0), 1
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        watchdog = threading.Timer(60, writer.kill)
        watchdog.start()
        try:
            acknowledged = int(writer.stdout.readline())  # running: at least one save done
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(writer.pid, signal.SIGKILL)
            for line in writer.stdout:  # saves acknowledged before the kill
                acknowledged = int(line)
            writer.wait()
        finally:
            watchdog.cancel()
        loaded = load_state(path)
        assert loaded.write_count >= acknowledged
        assert_same(loaded, replayed(loaded.write_count, shape), timestamps=False)

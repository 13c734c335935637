"""Persistence: MemoryState.save / MemoryState.load, one atomic, checksummed .safetensors file."""

import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentmem import EXTERNAL, MemoryFileError, MemoryState
from latentmem.persistence import FORMAT_VERSION, read_manifest

from conftest import make_model, random_ids

# (tokens, seed) of the contexts written before saving; 12 < min_context_tokens (16) needs allow_short.
CONTEXTS = [(20, 1), (33, 2), (12, 3), (40, 4), (25, 5)]
SEED = 7


@pytest.fixture(scope="module")
def tiny():
    return make_model()  # K = 8, N = 32, 3 layers, hidden 64


def written_state(model, seed=SEED):
    state = model.new_memory(seed=seed)
    for i, (n, ids_seed) in enumerate(CONTEXTS):
        model.inject(state, random_ids(n, seed=ids_seed), allow_short=n < 16, source=f"doc-{i}")
    return state


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """A written state and the bytes of its file (tests corrupt copies of them)."""
    state = written_state(tiny)
    path = tmp_path_factory.mktemp("saved") / "memory.safetensors"
    state.save(path)
    return state, path.read_bytes()


def header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def assert_same_state(a: MemoryState, b: MemoryState, timestamps: bool = True):
    assert a.shape == b.shape
    assert a.stm.dtype == b.stm.dtype
    assert torch.equal(a.stm, b.stm)
    assert torch.equal(a.ages, b.ages)
    assert torch.equal(a.sources, b.sources)
    assert a.write_count == b.write_count
    assert a.initialized == b.initialized
    if timestamps:
        assert a.injections == b.injections
    else:  # injected again, separately: same records, later timestamps
        assert [(i.id, i.source, i.tokens) for i in a.injections.values()] == [
            (i.id, i.source, i.tokens) for i in b.injections.values()
        ]
    assert a.seed == b.seed
    assert a.fingerprint == b.fingerprint
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


# --- 1. round trip -----------------------------------------------------------------------------
def test_round_trip_is_bit_exact_and_generator_continues(tiny, tmp_path):
    state = written_state(tiny)
    assert state.write_count == 5 and state.initialized
    assert state.ages.max() > 0 and len(state.surviving_slots()) > 1  # forgetting happened: non-trivial ages
    path = tmp_path / "memory.safetensors"
    state.save(path)

    loaded = MemoryState.load(path, tiny)

    assert_same_state(loaded, state)
    assert loaded.write_count == 5 and loaded.seed == SEED and loaded.fingerprint == tiny.fingerprint
    assert [(i.id, i.source, i.tokens) for i in loaded.injections.values()] == [
        (i, f"doc-{i}", n) for i, (n, _) in enumerate(CONTEXTS)
    ]
    assert [i.timestamp for i in loaded.injections.values()] == [i.timestamp for i in state.injections.values()]
    assert loaded.surviving_slots() == state.surviving_slots()

    # The generator continues where it stopped: the same write forgets the same slots in both.
    context = random_ids(30, seed=99)
    tiny.inject(state, context, source="after")
    tiny.inject(loaded, context, source="after")
    assert_same_state(loaded, state, timestamps=False)
    assert loaded.write_count == 6

    # Control: a generator merely re-seeded (state not restored) forgets other slots.
    reseeded = MemoryState.load(path, tiny)
    reseeded.generator.manual_seed(SEED)
    tiny.inject(reseeded, context, source="after")
    assert not torch.equal(reseeded.sources, state.sources)


def test_loaded_state_reads_like_the_original(tiny, tmp_path):
    state = written_state(tiny)
    path = tmp_path / "memory.safetensors"
    state.save(path)
    prompt = random_ids(10, seed=42)
    with torch.no_grad():
        expected = tiny(prompt, memory=state).logits
        loaded = MemoryState.load(path, tiny)
        assert loaded.version >= 1  # installing the pool counted as a change
        got = tiny(prompt, memory=loaded).logits
        assert torch.allclose(got, expected, atol=1e-6)
        assert not torch.allclose(got, tiny(prompt, memory=tiny.new_memory()).logits, atol=1e-3)  # memory matters

        # A write into the loaded state invalidates its cached prefix, exactly as for the original.
        version = loaded.version
        tiny.inject(state, random_ids(30, seed=8))
        tiny.inject(loaded, random_ids(30, seed=8))
        assert loaded.version > version
        after = tiny(prompt, memory=loaded).logits
        assert not torch.allclose(after, got, atol=1e-4)
        assert torch.allclose(after, tiny(prompt, memory=state).logits, atol=1e-6)


def test_loaded_state_does_not_alias_the_file(saved, tmp_path):
    state, data = saved
    path = write(tmp_path / "memory.safetensors", data)
    loaded = MemoryState.load(path)
    with open(path, "r+b") as f:  # rewrite the tensor bytes in place (not the way save does it)
        f.seek(8 + header_length(data))
        f.write(b"\x7f" * (len(data) - 8 - header_length(data)))
    assert torch.equal(loaded.stm, state.stm)
    assert torch.equal(loaded.sources, state.sources)


# --- 2. empty state ----------------------------------------------------------------------------
def test_empty_state_round_trips_uninitialized(tiny, tmp_path):
    state = tiny.new_memory(seed=11)
    path = tmp_path / "empty.safetensors"
    state.save(path)

    loaded = MemoryState.load(path, tiny)

    assert loaded.initialized is False
    assert loaded.write_count == 0 and loaded.injections == {} and loaded.seed == 11
    assert torch.equal(loaded.stm, torch.zeros(3, 32, 64))
    assert torch.equal(loaded.ages, torch.zeros(3, 32, dtype=torch.long))
    assert torch.equal(loaded.sources, torch.full((3, 32), EXTERNAL))
    assert_same_state(loaded, state)
    # Its first write tiles the pool like a fresh state's would, and the next forgets alike.
    for n, seed in [(20, 1), (30, 2)]:
        tiny.inject(state, random_ids(n, seed=seed))
        tiny.inject(loaded, random_ids(n, seed=seed))
    assert_same_state(loaded, state, timestamps=False)


# --- 3. interrupted saves ----------------------------------------------------------------------
class HalfWriter:
    """A file whose write puts half the bytes on disk, then fails as a full disk would."""

    def __init__(self, file):
        self.file, self.written = file, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.written = self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("failure", ["write", "fsync", "rename"])
def test_failed_save_keeps_previous_file_and_leaves_no_temp_file(saved, tiny, tmp_path, monkeypatch, failure):
    old, data = saved
    path = write(tmp_path / "memory.safetensors", data)
    new = MemoryState.load(path, tiny)
    tiny.inject(new, random_ids(30, seed=9))
    assert not torch.equal(new.stm, old.stm)

    writers = []
    real_fdopen = os.fdopen

    def half_writer(*args, **kwargs):
        writers.append(HalfWriter(real_fdopen(*args, **kwargs)))
        return writers[-1]

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    if failure == "write":
        monkeypatch.setattr(os, "fdopen", half_writer)
    else:
        monkeypatch.setattr(os, {"fsync": "fsync", "rename": "replace"}[failure], fail)
    with pytest.raises(OSError):
        new.save(path)
    monkeypatch.undo()
    if failure == "write":
        assert 0 < writers[0].written < path.stat().st_size  # part of the new file did reach the disk

    assert [p.name for p in tmp_path.iterdir()] == ["memory.safetensors"]
    assert_same_state(MemoryState.load(path, tiny), old)


# Saves in a loop, in processes the test SIGKILLs. The state/persistence modules are imported
# without latentmem/__init__ (which pulls in transformers) so the process starts in ~2 s; one
# launcher forks a fresh saver for every kill. Each save i writes stm filled with i and write_count i.
SAVER = r"""
import importlib.util, os, sys, types
import torch
torch.set_num_threads(1)  # no OpenMP pool: forking stays safe
package = types.ModuleType("latentmem")
package.__path__ = list(importlib.util.find_spec("latentmem").submodule_search_locations)
sys.modules["latentmem"] = package
from latentmem.persistence import load_state
path = sys.argv[1]
print("ready", flush=True)
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        state = load_state(path)
        first = True
        while True:
            state.write_count += 1
            state.stm.fill_(float(state.write_count))
            state.save(path)
            if first:
                print("saving", flush=True)
                first = False
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_save_killed_mid_write_keeps_a_valid_file(tmp_path):
    model = make_model(num_tokens=64, num_blocks=64)  # 4096 slots: a 3.3 MB file, several ms to write
    state = model.new_memory()
    state.stm = torch.zeros(state.shape)
    path = tmp_path / "memory.safetensors"
    state.save(path)
    assert path.stat().st_size > 3_000_000

    rng = random.Random(0)
    launcher = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(60, launcher.kill)  # a hung launcher ends its pipe: readline returns ""
    watchdog.start()
    pid = None
    try:
        assert launcher.stdout.readline().strip() == "ready"
        last = 0
        for _ in range(6):
            launcher.stdin.write("go\n")
            launcher.stdin.flush()
            # The saver's pid (from the launcher) and "saving" (from the saver, after its first save).
            lines = sorted(launcher.stdout.readline().strip() for _ in range(2))
            assert lines[1] == "saving"
            pid = int(lines[0])
            time.sleep(rng.uniform(0.0, 0.06))
            os.kill(pid, signal.SIGKILL)
            assert launcher.stdout.readline().strip() == "reaped"

            loaded = MemoryState.load(path, model)  # checksums verified: old or new content, never a mix
            assert loaded.write_count > last  # each saver completed at least its first save
            assert torch.equal(loaded.stm, torch.full(state.shape, float(loaded.write_count)))
            last = loaded.write_count
            pid = None
    finally:
        watchdog.cancel()
        if pid is not None:  # a failed check left a saver running
            os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()


# --- 4, 5. truncated and corrupted files -------------------------------------------------------
CUTS = {
    "empty": lambda n, size: 0,
    "inside length prefix": lambda n, size: 5,
    "length prefix only": lambda n, size: 8,
    "inside header": lambda n, size: 8 + n // 2,
    "header only": lambda n, size: 8 + n,
    "one data byte": lambda n, size: 8 + n + 1,
    "inside data": lambda n, size: (8 + n + size) // 2,
    "last byte missing": lambda n, size: size - 1,
}


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_file_raises(saved, tmp_path, cut):
    _, data = saved
    length = CUTS[cut](header_length(data), len(data))
    path = write(tmp_path / "memory.safetensors", data[:length])
    with pytest.raises(MemoryFileError):
        MemoryState.load(path)


@pytest.mark.parametrize("where", ["first data byte", "middle", "last byte"])
def test_corrupted_tensor_data_raises_checksum_error(saved, tiny, tmp_path, where):
    _, data = saved
    start = 8 + header_length(data)
    offset = {"first data byte": start, "middle": (start + len(data)) // 2, "last byte": len(data) - 1}[where]
    corrupted = bytearray(data)
    corrupted[offset] ^= 0x10
    path = write(tmp_path / "memory.safetensors", bytes(corrupted))
    with pytest.raises(MemoryFileError, match="checksum"):
        MemoryState.load(path, tiny)


@pytest.mark.parametrize(
    "field, old, new",
    [("write_count", b'write_count\\": 5', b'write_count\\": 6'), ("seed", b'seed\\": 7', b'seed\\": 8')],
)
def test_corrupted_manifest_that_still_parses_raises_checksum_error(saved, tmp_path, field, old, new):
    _, data = saved
    assert data.count(old) == 1  # the manifest is JSON inside the header's JSON, so quotes are escaped
    path = write(tmp_path / "memory.safetensors", data.replace(old, new))
    with pytest.raises(MemoryFileError, match="checksum"):
        MemoryState.load(path)


def test_corrupted_generator_state_raises_checksum_error(saved, tmp_path):
    _, data = saved
    key = b'generator_state\\": \\"'
    offset = data.index(key) + len(key) + 100  # a base64 character inside the generator state
    corrupted = bytearray(data)
    corrupted[offset] = ord("A") if corrupted[offset] != ord("A") else ord("B")
    path = write(tmp_path / "memory.safetensors", bytes(corrupted))
    with pytest.raises(MemoryFileError, match="checksum"):
        MemoryState.load(path)


# --- 6. another model --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "other",
    [
        dict(num_blocks=8),  # 64 slots instead of 32
        dict(num_tokens=4, num_blocks=8),  # also 32 slots, but K = 4
        dict(family="qwen2"),  # same shape, other architecture
    ],
)
def test_loading_into_another_model_raises(saved, tmp_path, other):
    _, data = saved
    path = write(tmp_path / "memory.safetensors", data)
    with pytest.raises(MemoryFileError, match="another model"):
        MemoryState.load(path, make_model(**other))


def test_loading_without_model_works(saved, tiny, tmp_path):
    state, data = saved
    path = write(tmp_path / "memory.safetensors", data)
    loaded = MemoryState.load(path)
    assert_same_state(loaded, state)
    assert loaded.device == torch.device("cpu")
    tiny.check_state(loaded)  # usable with the model it was saved from


# --- 7, 8. foreign files and newer versions ----------------------------------------------------
def test_foreign_files_raise(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"stm": torch.zeros(3, 32, 64)}, plain)
    other_format = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, other_format, metadata={"manifest": json.dumps({"format": "someone.else"})})
    not_json = tmp_path / "not_json.safetensors"
    save_file({"x": torch.zeros(2)}, not_json, metadata={"manifest": "{not json"})
    noise = write(tmp_path / "noise.safetensors", random.Random(0).randbytes(4096))
    text = write(tmp_path / "text.safetensors", b"hello, I am not a memory file\n")
    for path in [plain, other_format, not_json, noise, text]:
        with pytest.raises(MemoryFileError):
            MemoryState.load(path)
        with pytest.raises(MemoryFileError):
            read_manifest(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        MemoryState.load(tmp_path / "absent.safetensors")


def resave_with_manifest(data: bytes, path, **changes):
    """Rewrite a memory file with manifest fields changed (tensors unchanged)."""
    tensors = load_file(write(path, data))
    header = json.loads(data[8 : 8 + header_length(data)])
    manifest = {**json.loads(header["__metadata__"]["manifest"]), **changes}
    manifest = {key: value for key, value in manifest.items() if value is not None}
    save_file(tensors, path, metadata={"manifest": json.dumps(manifest)})
    return path


def test_newer_format_version_raises_clear_error(saved, tmp_path):
    _, data = saved
    path = resave_with_manifest(data, tmp_path / "memory.safetensors", format_version=FORMAT_VERSION + 1)
    message = f"format version {FORMAT_VERSION + 1}.*upgrade latentmem"
    with pytest.raises(MemoryFileError, match=message):
        MemoryState.load(path)
    with pytest.raises(MemoryFileError, match=message):
        read_manifest(path)


@pytest.mark.parametrize(
    "changes",
    [
        dict(write_count=None, manifest_checksum=None),
        dict(shape=[3, 32], manifest_checksum=None),
        dict(generator_state="not base64!", manifest_checksum=None),
        dict(injections=[{"id": 0, "unknown": 1}], manifest_checksum=None),
        dict(format_version="1"),
    ],
    ids=["missing field", "bad shape", "bad generator state", "bad injection", "version not int"],
)
def test_malformed_manifest_raises(saved, tmp_path, changes):
    _, data = saved
    path = resave_with_manifest(data, tmp_path / "memory.safetensors", **changes)
    with pytest.raises(MemoryFileError):
        MemoryState.load(path)


def test_file_without_manifest_checksum_raises(saved, tmp_path):
    _, data = saved  # without it, an edited write counter or injection record would go unnoticed
    path = resave_with_manifest(data, tmp_path / "memory.safetensors", manifest_checksum=None, write_count=99)
    with pytest.raises(MemoryFileError, match="manifest checksum mismatch or missing"):
        MemoryState.load(path)


# --- forged files: checksums are right, the content is not -------------------------------------
def forge(data: bytes, path, tensors: dict | None = None, **changes):
    """A memory file as a forger would make it: fields or tensors changed, both checksums recomputed
    (SHA-256 detects damage, not intent), so only the reader's own checks stand in the way."""
    header = json.loads(data[8 : 8 + header_length(data)])
    manifest = {**json.loads(header["__metadata__"]["manifest"]), **changes}
    manifest = {key: value for key, value in manifest.items() if value is not None and key != "manifest_checksum"}
    tensors = {**load_file(write(path, data)), **(tensors or {})}
    digest = hashlib.sha256()
    for name in ("stm", "ages", "sources"):
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    manifest["checksum"] = digest.hexdigest()
    manifest["manifest_checksum"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    save_file(tensors, path, metadata={"manifest": json.dumps(manifest)})
    return path


def test_forge_helper_makes_files_that_load(saved, tmp_path):
    state, data = saved  # the control for the tests below: forging alone is not what they refuse
    assert_same_state(MemoryState.load(forge(data, tmp_path / "m.safetensors")), state)


def record(**changes):
    return [{"id": 0, "source": "a", "tokens": 20, "timestamp": 1.5, "importance": 1.0, **changes}]


FORGED = {
    "write count negative": dict(write_count=-5),
    "write count a bool": dict(write_count=True),
    "write count over int64": dict(write_count=2**63),
    "seed negative": dict(seed=-1),
    "timestamp NaN": dict(injections=record(timestamp=float("nan"))),
    "timestamp infinite": dict(injections=record(timestamp=float("inf"))),
    "timestamp a string": dict(injections=record(timestamp="noon")),
    "tokens negative": dict(injections=record(tokens=-1)),
    "importance NaN": dict(injections=record(importance=float("nan"))),
    "importance zero": dict(injections=record(importance=0)),
    "record with an unknown field": dict(injections=record(unknown=1)),
    "record not an object": dict(injections=["a"]),
    "two records with one id": dict(injections=record() + record()),
    "dtype not a float dtype": dict(dtype="int64"),
    "ltm an absolute path": dict(ltm="/etc"),
    "ltm outside the folder": dict(ltm="../../other/states.safetensors.ltm-0123456789ab"),
    "ltm a generation of another file": dict(ltm="other.safetensors.ltm-0123456789ab"),
    "ltm not a string": dict(ltm=["0123456789ab"]),
}


@pytest.mark.parametrize("changes", FORGED.values(), ids=FORGED.keys())
def test_forged_manifest_raises(saved, tmp_path, changes):
    _, data = saved
    with pytest.raises(MemoryFileError, match="malformed|two injection records"):
        MemoryState.load(forge(data, tmp_path / "memory.safetensors", **changes))


def test_forged_tensors_raise(saved, tmp_path):
    state, data = saved
    nan_pool = state.stm.clone()
    nan_pool[0, 0, 0] = float("nan")
    unknown_source = state.sources.clone()
    unknown_source[1, 2] = 99
    for tensors, message in [
        ({"stm": nan_pool}, "NaN or infinite"),
        ({"ages": -state.ages - 1}, "ages must be >= 0"),
        ({"sources": unknown_source}, "no record"),
        ({"stm": state.stm[:, :16].contiguous()}, r"stm is \[3, 16, 64\]"),
    ]:
        with pytest.raises(MemoryFileError, match=message):
            MemoryState.load(forge(data, tmp_path / "memory.safetensors", tensors=tensors))


def test_a_file_of_another_shape_or_dtype_with_this_models_fingerprint_raises(saved, tiny, tmp_path):
    state, data = saved
    wide = forge(data, tmp_path / "wide.safetensors", tensors={"stm": torch.zeros(3, 32, 65)}, shape=[3, 32, 65])
    half = forge(data, tmp_path / "half.safetensors", tensors={"stm": state.stm.half()}, dtype="float16")
    for path in (wide, half):
        assert MemoryState.load(path).fingerprint == tiny.fingerprint  # loads on its own
        with pytest.raises(MemoryFileError, match="this model's is \\[3, 32, 64\\] torch.float32"):
            MemoryState.load(path, tiny)


def test_a_short_term_model_refuses_a_state_naming_long_term_memory(saved, tiny, tmp_path):
    _, data = saved
    path = forge(data, tmp_path / "memory.safetensors", ltm="0123456789ab")
    with pytest.raises(MemoryFileError, match="kind of memory"):
        MemoryState.load(path, tiny)
    with pytest.raises(MemoryFileError, match="generation 0123456789ab, which is missing"):
        MemoryState.load(path)


def test_long_term_memory_is_named_by_generation_id_and_found_only_next_to_the_file(tmp_path):
    from test_mplus import make_mplus

    model = make_mplus()
    state = model.new_memory()
    model.inject(state, random_ids(40, seed=1))
    path = tmp_path / "m.safetensors"
    state.save(path)
    generation = read_manifest(path)["ltm"]
    assert len(generation) == 12 and (tmp_path / f"m.safetensors.ltm-{generation}").is_dir()
    assert MemoryState.load(path, model).ltm is not None

    data = path.read_bytes()  # a file saved before ids were bare names its folder in full: still read
    legacy = forge(data, tmp_path / "m.safetensors", ltm=f"m.safetensors.ltm-{generation}")
    assert MemoryState.load(legacy, model).ltm is not None
    renamed = forge(data, tmp_path / "other.safetensors", ltm=f"m.safetensors.ltm-{generation}")
    with pytest.raises(MemoryFileError, match="generation id"):  # not another file's folder
        MemoryState.load(renamed, model)


# --- file permissions --------------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_saved_file_gets_umask_mode_and_keeps_existing_mode(tmp_path):
    state = MemoryState(2, 4, 8)
    path = tmp_path / "memory.safetensors"
    previous = os.umask(0o027)
    try:
        state.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600
        os.umask(0o077)
        path.chmod(0o644)
        state.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the replaced file's mode is kept
    finally:
        os.umask(previous)

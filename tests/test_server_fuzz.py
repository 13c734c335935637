"""Fuzzing the memory server: requests made from its own OpenAPI schema (schemathesis), and state
files damaged or forged by hypothesis, for the state reader and for the import endpoint.

What must hold for every request, valid or not:
  - no 5xx, and every error is OpenAI-shaped JSON;
  - nothing outside the user's own folder is touched (another user's memory, a long-term store
    elsewhere on the disk);
  - a rejected request (4xx) leaves the user's memory on disk byte for byte as it was.
The fast suite runs a bounded, derandomized number of examples (a few seconds); `-m slow` runs
many more, randomized. Run with `-s` to see the requests made and their status codes.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from starlette.testclient import TestClient
from test_persistence import forge
from test_server import ALICE, BOB, FACT, KEYS, TINY

from latentmem import MemoryFileError, MemoryState
from latentmem.ltm.store import LongTermStore
from latentmem.models import untrained_model
from latentmem.server import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
AUTH = {"Authorization": f"Bearer {ALICE}"}


@pytest.fixture(scope="module")
def tiny():
    return untrained_model(**TINY)


class Disk:
    """The data directory and a folder outside it, with what a request may and may not change."""

    def __init__(self, root: Path):
        self.root, self.data = root, root / "data"
        self.alice = self.data / "states" / "alice"
        LongTermStore(2, 64, 16).save(root / "outside" / "store.ltm")  # what a forged manifest might name
        (root / "outside" / "secret.txt").write_text("not for uploads")

    def files(self, under: Path, skip: Path | None = None) -> dict[str, bytes]:
        found = (p for p in under.rglob("*") if p.is_file() and not p.name.startswith("index.sqlite3"))
        return {str(p): p.read_bytes() for p in sorted(found) if skip is None or skip not in p.parents}

    def others(self) -> dict[str, bytes]:
        """Everything but alice's own states (and the index, derived, and uploads being checked)."""
        return {k: v for k, v in self.files(self.root, skip=self.alice).items() if "/data/tmp/" not in k}


@pytest.fixture
def served(tmp_path, tiny):
    """An app on a tiny model (4-token replies, 600-token injects: fast), alice and bob with a memory each."""
    disk = Disk(tmp_path)
    app = create_app(
        *tiny, data_dir=disk.data, api_keys=KEYS, model_name="tiny", max_new_tokens=4, default_max_tokens=4,
        max_inject_tokens=600,
    )  # fmt: skip
    seeding = TestClient(app)  # no `with`: the app's lifespan stays for schemathesis's client
    for key, session in ((ALICE, "default"), (ALICE, "work"), (BOB, "default")):
        r = seeding.post("/v1/memory/inject", json={"text": FACT, "session": session, "source": "seed"},
                         headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert r.status_code == 200
    return app, disk


STATUSES: Counter = Counter()


def check_response(disk: Disk, response, alice_before: dict, others_before: dict, what: str) -> None:
    STATUSES[(what, response.status_code)] += 1
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"], response.text
        assert disk.files(disk.alice) == alice_before, f"{what}: rejected ({response.status_code}) but changed"
    assert disk.others() == others_before, f"{what}: touched a file outside alice's folder"


def fuzz_schema(app, disk: Disk, examples: int, derandomize: bool) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:  # data the schema allows, and data it does not
            if mode is GenerationMode.NEGATIVE and not operation.body and not list(operation.iter_parameters()):
                continue  # nothing to get wrong: an operation without parameters or body

            @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                      suppress_health_check=list(HealthCheck), print_blob=True)  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def request(case):
                alice_before, others_before = disk.files(disk.alice), disk.others()
                response = case.call(headers={**(case.headers or {}), **AUTH})
                check_response(disk, response, alice_before, others_before, f"{case.method} {case.path}")

            request()


def report(title: str) -> None:
    total = sum(STATUSES.values())
    by_status = Counter()
    for (_, status), n in STATUSES.items():
        by_status[status] += n
    print(f"\n{title}: {total} requests; by status {dict(sorted(by_status.items()))}")
    for (what, status), n in sorted(STATUSES.items()):
        print(f"  {what:<32} {status}: {n}")
    STATUSES.clear()


def test_requests_from_the_openapi_schema_never_5xx_nor_touch_other_files(served):
    app, disk = served
    fuzz_schema(app, disk, examples=4, derandomize=True)
    report("schema fuzz (fast)")


@pytest.mark.slow
def test_requests_from_the_openapi_schema_never_5xx_nor_touch_other_files_long_run(served):
    app, disk = served
    fuzz_schema(app, disk, examples=150, derandomize=False)
    report("schema fuzz (slow)")


# --- damaged and forged state files -------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["../../outside/store.ltm", "/etc", "0123456789ab", "float32", "bfloat16"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
FIELDS = ["fingerprint", "shape", "dtype", "seed", "generator_state", "initialized", "write_count", "injections",
          "ltm", "format", "format_version", "checksum"]  # fmt: skip


@st.composite
def damaged_files(draw, folder: Path):
    """`folder/valid.safetensors` truncated, with flipped bytes, or forged (a field or a value
    replaced, checksums recomputed), as `folder/candidate.safetensors`."""
    data = (folder / "valid.safetensors").read_bytes()
    kind = draw(st.sampled_from(["truncated", "flipped", "forged field", "forged record", "forged tensor"]))
    path = folder / "candidate.safetensors"
    if kind == "truncated":
        path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
    elif kind == "flipped":
        damaged = bytearray(data)
        for offset in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4)):
            damaged[offset] ^= draw(st.integers(1, 255))
        path.write_bytes(bytes(damaged))
    elif kind == "forged field":
        forge(data, path, **{draw(st.sampled_from(FIELDS)): draw(JSON_VALUES)})
    elif kind == "forged record":
        record = {"id": 0, "source": "ada", "tokens": 80, "timestamp": 1.0, "importance": 1.0}
        record[draw(st.sampled_from([*record, "extra"]))] = draw(JSON_VALUES)
        forge(data, path, injections=[record])
    else:
        name = draw(st.sampled_from(["stm", "ages", "sources"]))
        original = MemoryState.load(folder / "valid.safetensors")
        tensor = {"stm": original.stm, "ages": original.ages, "sources": original.sources}[name].clone()
        index = tuple(draw(st.integers(0, n - 1)) for n in tensor.shape)
        values = [float("nan"), float("inf"), -1e30] if name == "stm" else [-1, 99, 2**40]
        tensor[index] = draw(st.sampled_from(values))
        forge(data, path, tensors={name: tensor})
    return kind, path


@contextmanager
def stores_opened():
    """Every long-term store folder the reader tries to open (none exists for these files)."""
    opened: list[Path] = []

    def record(cls, path, **kwargs):
        opened.append(Path(path))
        raise FileNotFoundError(path)

    with mock.patch.object(LongTermStore, "open", classmethod(record)):
        yield opened


def saved_state(model, folder: Path) -> None:
    state = model.new_memory(seed=5)
    model.inject(state, input_ids=torch.arange(40) % 200, source="ada")
    state.save(folder / "valid.safetensors")


def test_the_state_reader_refuses_damaged_and_forged_files_with_memory_file_error_only(tiny, tmp_path):
    model = tiny[0]
    saved_state(model, tmp_path)
    kinds: Counter = Counter()

    @settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(candidate=damaged_files(tmp_path))
    def read(candidate):
        kind, path = candidate
        with stores_opened() as opened:
            try:
                state = MemoryState.load(path, model)
            except MemoryFileError:
                kinds[(kind, "refused")] += 1
            else:  # accepted: then it is a state this model can use
                kinds[(kind, "loaded")] += 1
                model.check_state(state)
                assert state.shape == (2, 32, 64) and state.stm.dtype == model.dtype
                assert torch.isfinite(state.stm).all() and (state.ages >= 0).all()
                assert set(state.surviving_slots()) <= set(state.injections)
                assert all(isinstance(i.timestamp, float | int) for i in state.injections.values())
        assert all(p.parent == tmp_path for p in opened), opened  # never outside the file's folder

    read()
    print(f"\nstate reader: {sum(kinds.values())} files; {dict(sorted(kinds.items()))}")
    assert sum(n for (_, outcome), n in kinds.items() if outcome == "refused") > 0


def test_importing_damaged_and_forged_files_is_a_200_or_a_400_that_changes_nothing(served, tiny, tmp_path):
    app, disk = served
    saved_state(tiny[0], tmp_path)
    client = TestClient(app, headers=AUTH)

    @settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(candidate=damaged_files(tmp_path), session=st.sampled_from(["default", "work", "new"]))
    def upload(candidate, session):
        kind, path = candidate
        alice_before, others_before = disk.files(disk.alice), disk.others()
        r = client.post(f"/v1/memory/import?session={session}", content=path.read_bytes())
        check_response(disk, r, alice_before, others_before, f"import ({kind})")
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:  # an accepted state must then serve every call
            for follow in (
                client.get(f"/v1/memory?session={session}"),
                client.post(
                    "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "session": session}
                ),
            ):
                assert follow.status_code == 200, follow.text

    upload()
    report("imports of damaged and forged files")
    assert json.loads(client.get("/v1/sessions").content)["data"]  # the server still answers

"""The memory server, started for real on a loopback port and called with real HTTP clients.

Most tests run uvicorn in a thread of this process (a fresh data directory each); restart and
kill -9 run the server in a child process. The model is a tiny random one (the same weights in
every process: `untrained_model` is deterministic).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from latentmem import MemoryState
from latentmem.models import untrained_model
from latentmem.server import create_app
from latentmem.server.auth import AuthConfigError, load_keys
from latentmem.server.gate import ModelGate
from latentmem.server.states import StateRegistry

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"
KEYS = {ALICE: "alice", BOB: "bob"}
FACT = "Ada's locker code is 4711; she keeps it in the green notebook on the second shelf."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {"hidden_size": 64, "num_layers": 2, "num_tokens": 8, "num_blocks": 4}


@pytest.fixture(scope="module")
def tiny():
    return untrained_model(**TINY)


class ThreadServer:
    """uvicorn in a background thread, on a socket bound here (so the port is known and ours)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture
def server(tmp_path, tiny):
    srv = ThreadServer(create_app(*tiny, data_dir=tmp_path / "data", api_keys=KEYS, model_name="tiny"))
    srv.data_dir = tmp_path / "data"
    yield srv
    srv.stop()


def client(server, key=ALICE, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kwargs)


def chat(c: httpx.Client, text: str = "What is Ada's code?", **extra) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0}
    return c.post("/v1/chat/completions", json={**body, **extra})


# --- authentication and isolation ---------------------------------------------------------------
def test_requests_without_a_valid_key_get_401_before_the_body_is_read(server):
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}, {"Authorization": f"Basic {ALICE}"}):
        for method, path in (("GET", "/v1/memory"), ("POST", "/v1/memory/inject"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, server.url + path, headers=headers, content=b"{not json")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    assert httpx.get(server.url + "/health").status_code == 200  # outside /v1: no key needed


def test_a_user_cannot_read_write_or_detect_another_users_memory(server):
    alice, bob = client(server), client(server, BOB)
    assert alice.post("/v1/memory/inject", json={"text": FACT, "source": "ada"}).status_code == 200
    assert alice.post("/v1/memory/inject", json={"text": FACT, "session": "private"}).status_code == 200

    assert bob.get("/v1/memory").json()["injections"] == 0  # bob's own, empty default memory
    assert bob.get("/v1/sessions").json()["data"] == []
    taken, never_used = bob.get("/v1/memory?session=private"), bob.get("/v1/memory?session=zzzzzzz")
    assert taken.status_code == never_used.status_code == 404
    assert taken.json()["error"]["message"].replace("private", "X") == never_used.json()["error"]["message"].replace(
        "zzzzzzz", "X"
    )
    for request in (bob.delete("/v1/memory?session=private"), bob.post("/v1/memory/forget", json={"source": "ada"})):
        assert request.status_code == 404
    empty = MemoryState.load(_save_bytes(server.data_dir / "bob.safetensors", bob.get("/v1/memory/export").content))
    assert empty.injections == {}

    assert bob.post("/v1/memory/inject", json={"text": FACT, "session": "private"}).status_code == 200  # bob's own
    assert alice.get("/v1/memory?session=private").json()["injections"] == 1
    assert bob.get("/v1/memory?session=private").json()["injections"] == 1
    assert sorted(s["session"] for s in alice.get("/v1/sessions").json()["data"]) == ["default", "private"]


def _save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- OpenAI compatibility -----------------------------------------------------------------------
def test_openai_client_completes_streams_and_reads_the_chosen_sessions_memory(server):
    httpx_client = client(server)
    httpx_client.post("/v1/memory/inject", json={"text": FACT, "session": "ada"})
    httpx_client.post("/v1/memory/inject", json={"text": "The harbour archive opens at nine and closes at five."})
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "What is Ada's code?"}], max_tokens=8, temperature=0)

    ada = oa.chat.completions.create(**ask, extra_body={"session": "ada"})
    assert ada.object == "chat.completion" and ada.model == "tiny"
    assert ada.choices[0].finish_reason in ("stop", "length") and ada.usage.completion_tokens <= 8
    assert ada.usage.total_tokens == ada.usage.prompt_tokens + ada.usage.completion_tokens
    default = oa.chat.completions.create(**ask)
    assert default.choices[0].message.content != ada.choices[0].message.content  # another memory, another answer

    chunks = list(oa.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True},
                                             extra_headers={"X-Latentmem-Session": "ada"}))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == ada.choices[0].message.content  # greedy: the stream is the same reply
    assert chunks[-1].usage.completion_tokens == ada.usage.completion_tokens
    assert [m.id for m in oa.models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope-0123456789abcdef").chat.completions.create(**ask)
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(**ask, extra_body={"session": "never-written"})


# --- memory management --------------------------------------------------------------------------
def test_inject_records_provenance_and_forget_removes_only_that_source(server):
    c = client(server)
    first = c.post("/v1/memory/inject", json={"text": FACT, "source": "ada"}).json()
    assert first["id"] == 0 and first["source"] == "ada" and first["slots_written"] == 8 and first["timestamp"] > 0
    c.post("/v1/memory/inject", json={"text": FACT.replace("Ada", "Bea"), "source": "bea"})
    sources = {s["source"]: s for s in c.get("/v1/memory").json()["sources"]}
    assert sources["ada"]["surviving_slots"] > 0 and sources["bea"]["surviving_slots"] == 2 * 8  # 2 layers x K

    forgotten = c.post("/v1/memory/forget", json={"source": "ada"}).json()
    assert forgotten["removed_slots"] == sources["ada"]["surviving_slots"]
    after = {s["source"]: s["surviving_slots"] for s in forgotten["sources"]}
    assert after["ada"] == 0 and after["bea"] >= 16
    reset = c.delete("/v1/memory").json()
    assert reset["injections"] == 0 and reset["initialized"] is False
    assert c.get("/v1/memory").json()["injections"] == 0


def test_export_then_import_installs_an_identical_state_in_a_new_session(server, tmp_path):
    c = client(server)
    c.post("/v1/memory/inject", json={"text": FACT, "source": "ada"})
    exported = c.get("/v1/memory/export").content
    imported = c.post("/v1/memory/import?session=copy", content=exported)
    assert imported.status_code == 200 and imported.json()["sources"] == c.get("/v1/memory").json()["sources"]
    original = MemoryState.load(_save_bytes(tmp_path / "a.safetensors", exported))
    copy = MemoryState.load(_save_bytes(tmp_path / "b.safetensors", c.get("/v1/memory/export?session=copy").content))
    assert torch.equal(original.stm, copy.stm) and original.write_count == copy.write_count == 1


def test_a_journaled_session_exports_every_write(tmp_path, tiny):
    from latentmem.journal import journal_path

    srv = ThreadServer(create_app(*tiny, data_dir=tmp_path / "data", api_keys=KEYS, model_name="tiny", journal=True))
    try:
        c = client(srv)
        for i in range(3):
            assert c.post("/v1/memory/inject", json={"text": f"{FACT} ({i})", "source": f"s{i}"}).status_code == 200
        files = list((tmp_path / "data").rglob("*.safetensors"))
        assert len(files) == 1 and journal_path(files[0]).exists()  # the later writes are in the journal
        exported = MemoryState.load(_save_bytes(tmp_path / "e.safetensors", c.get("/v1/memory/export").content))
        assert exported.write_count == 3 and sorted(exported.injections_from("s2")) != []
    finally:
        srv.stop()


# --- bad input ----------------------------------------------------------------------------------
def test_malformed_requests_get_a_clear_4xx_and_change_nothing(server, tmp_path):
    c = client(server)
    c.post("/v1/memory/inject", json={"text": FACT, "source": "ada"})
    before = (c.get("/v1/memory").json(), c.get("/v1/sessions").json())
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    other_model, _ = untrained_model(hidden_size=32, num_layers=2, num_tokens=8, num_blocks=4)
    other_model.new_memory().save(tmp_path / "other.safetensors")

    def chunked():  # a body without Content-Length that grows past the limit
        for _ in range(40):
            yield b"x" * 65536

    cases = [
        (400, c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})),
        (400, c.post("/v1/chat/completions", json={"model": "tiny"})),
        (400, c.post("/v1/chat/completions", json={"messages": "hi"})),
        (400, c.post("/v1/chat/completions", json={"messages": []})),
        (400, c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})),
        (400, c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 42}]})),
        (
            400,
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ),
        (400, c.post("/v1/chat/completions", json={**ask, "max_tokens": 0})),
        (400, c.post("/v1/chat/completions", json={**ask, "max_tokens": 10**6})),
        (400, c.post("/v1/chat/completions", json={**ask, "n": 2})),
        (400, c.post("/v1/chat/completions", json={**ask, "temperature": 9})),
        (400, c.post("/v1/chat/completions", json={**ask, "messages": [{"role": "user", "content": "x" * 5000}]})),
        (400, c.post("/v1/chat/completions", json={**ask, "session": "../etc"})),
        (400, c.post("/v1/chat/completions", json={**ask, "session": "a"}, headers={"X-Latentmem-Session": "b"})),
        (404, c.post("/v1/chat/completions", json={**ask, "session": "nope"})),
        (400, c.post("/v1/memory/inject", json={"text": ""})),
        (400, c.post("/v1/memory/inject", json={"text": "   \n "})),
        (400, c.post("/v1/memory/inject", json={"text": "too short"})),
        (400, c.post("/v1/memory/inject", json={"text": ["a list"]})),
        (400, c.post("/v1/memory/inject", json={"text": FACT, "allow_short": "maybe"})),
        (400, c.post("/v1/memory/inject", json={"text": FACT, "unknown_field": 1})),
        (413, c.post("/v1/memory/inject", json={"text": "x" * (2 << 20)})),
        (413, c.post("/v1/memory/inject", content=chunked(), headers={"content-type": "application/json"})),
        (400, c.post("/v1/memory/forget", json={})),
        (404, c.post("/v1/memory/forget", json={"source": "never"})),
        (404, c.delete("/v1/memory?session=nope")),
        (404, c.get("/v1/memory/export?session=nope")),
        (400, c.post("/v1/memory/import?session=new", content=b"not a memory file")),
        (400, c.post("/v1/memory/import?session=new", content=(tmp_path / "other.safetensors").read_bytes())),
        (404, c.get("/v1/no-such-endpoint")),
    ]
    for i, (expected, response) in enumerate(cases):
        assert response.status_code == expected, (i, response.status_code, response.text)
        assert response.json()["error"]["message"], i
    assert (c.get("/v1/memory").json(), c.get("/v1/sessions").json()) == before


# --- concurrency --------------------------------------------------------------------------------
def test_twenty_concurrent_clients_lose_no_writes(server):
    clients, writes_each = 20, 3
    acked: list[int] = []
    errors: list[str] = []

    def work(i: int):
        with client(server) as c:
            for w in range(writes_each):
                r = c.post("/v1/memory/inject", json={"text": f"{FACT} (client {i}, note {w})", "source": f"c{i}"})
                acked.append(r.json()["id"]) if r.status_code == 200 else errors.append(r.text)
            own = c.post("/v1/memory/inject", json={"text": FACT, "session": f"own-{i}"})
            read = chat(c)
            if own.status_code != 200 or read.status_code != 200:
                errors.append(own.text + read.text)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert sorted(acked) == list(range(clients * writes_each))  # every write acknowledged with its own id
    memory = client(server).get("/v1/memory").json()
    assert memory["writes"] == memory["injections"] == clients * writes_each
    assert all(s["injections"] == writes_each for s in memory["sources"])
    on_disk = MemoryState.load(server.data_dir / "states" / "alice" / "default.safetensors")
    assert len(on_disk.injections) == clients * writes_each  # and each was saved
    assert len(client(server).get("/v1/sessions").json()["data"]) == clients + 1


def test_model_gate_overlaps_reads_and_writes_up_to_its_limit():
    # every call names its own adapter (adapters.py), so reads and writes may run at the same time
    gate, active, overlaps, mixed, most = ModelGate(max_parallel=3), [], [0], [0], [0]
    lock = threading.Lock()

    def use(role: str):
        for _ in range(20):
            with gate.hold(role):
                with lock:
                    active.append(role)
                    mixed[0] += len(set(active)) > 1
                    overlaps[0] += len(active) > 1
                    most[0] = max(most[0], len(active))
                time.sleep(0.001)
                with lock:
                    active.remove(role)

    threads = [threading.Thread(target=use, args=(role,)) for role in ["read"] * 4 + ["write"] * 4]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert mixed[0] > 0 and overlaps[0] > 0 and most[0] <= 3


def test_model_gate_serves_waiters_first_come_first_served():
    gate, order, reading, release = ModelGate(max_parallel=1), [], threading.Event(), threading.Event()

    def long_read():
        with gate.hold("read"):
            reading.set()
            release.wait()

    def use(role: str):
        with gate.hold(role):
            order.append(role)

    threads = [threading.Thread(target=long_read)]
    threads[0].start()
    reading.wait()
    for role in ("write", "read", "write"):  # each waits behind the ones before it
        threads.append(threading.Thread(target=use, args=(role,)))
        threads[-1].start()
        while len(gate._queue) < len(threads) - 1:
            time.sleep(0.001)
    release.set()
    [t.join() for t in threads]
    assert order == ["write", "read", "write"]


# --- restarts and crashes -----------------------------------------------------------------------
def _serve(data_dir: Path, sock: socket.socket) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises the signal after its graceful shutdown
    app = create_app(*untrained_model(**TINY), data_dir=data_dir, api_keys=KEYS, model_name="tiny")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    (data_dir / "clean-exit").touch()  # reached only after the app's shutdown finished


# Children start from a clean interpreter (a fork server), never as a fork of this process: a fork
# copies locks that this process's other threads (uvicorn, httpx, torch's pool) may hold at that
# instant, and a child that needs one waits forever (seen once as a hung suite).
SERVER_PROCESSES = multiprocessing.get_context("forkserver")
# What the children import, loaded once in the fork server (this test module itself is not
# importable there: Python 3.11's fork server ignores this process's sys.path).
SERVER_PROCESSES.set_forkserver_preload(
    ["httpx", "openai", "pytest", "uvicorn", "latentmem.models", "latentmem.server"]
)


def start_process(data_dir: Path) -> tuple[multiprocessing.Process, str]:
    """The server in a child process, answering on a loopback port bound here."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    process = SERVER_PROCESSES.Process(target=_serve, args=(data_dir, sock), daemon=True)
    process.start()
    sock.close()
    deadline = time.time() + 120
    while time.time() < deadline and process.is_alive():
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not start (exit code {process.exitcode})")


def test_memory_survives_a_graceful_restart(tmp_path):
    process, url = start_process(tmp_path)
    alice, bob = (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=60) for k in (ALICE, BOB)
    )
    alice.post("/v1/memory/inject", json={"text": FACT, "source": "ada"})
    alice.post("/v1/memory/inject", json={"text": FACT, "source": "work", "session": "work"})
    bob.post("/v1/memory/inject", json={"text": FACT.replace("Ada", "Bob"), "source": "bob"})
    before = [alice.get("/v1/memory").json(), alice.get("/v1/memory?session=work").json(),
              bob.get("/v1/memory").json(), chat(alice).json()["choices"]]  # fmt: skip
    process.terminate()  # SIGTERM: uvicorn finishes requests, then the app's shutdown closes the registry
    process.join(60)
    assert process.exitcode == 0 and (tmp_path / "clean-exit").exists()

    process, url = start_process(tmp_path)
    try:
        alice, bob = (
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=60) for k in (ALICE, BOB)
        )
        after = [alice.get("/v1/memory").json(), alice.get("/v1/memory?session=work").json(),
                 bob.get("/v1/memory").json(), chat(alice).json()["choices"]]  # fmt: skip
        assert after == before  # same records, same slots: the same greedy answer
    finally:
        process.kill()
        process.join()


def test_kill_9_mid_write_leaves_every_state_loadable_with_every_acknowledged_write(tmp_path, tiny):
    process, url = start_process(tmp_path)
    acked: dict[str, list[int]] = {}
    stop = threading.Event()

    def writer(session: str):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/memory/inject", json={"text": FACT, "session": session})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acked.setdefault(session, []).append(r.json()["id"])

    threads = [threading.Thread(target=writer, args=(s,)) for s in ["default", "default", "a", "b", "c", "d"]]
    [t.start() for t in threads]
    try:
        deadline = time.time() + 120
        while sum(map(len, acked.values())) < 30:
            assert process.is_alive() and time.time() < deadline, f"{sum(map(len, acked.values()))} writes acknowledged"
            time.sleep(0.02)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        stop.set()
        [t.join() for t in threads]

    files = sorted((tmp_path / "states" / "alice").glob("*.safetensors"))
    assert {s for s, ids in acked.items() if ids} <= {f.stem for f in files} <= {"a", "b", "c", "d", "default"}
    for file in files:
        state = MemoryState.load(file, tiny[0])  # raises on a torn or corrupt file
        assert set(acked.get(file.stem, [])) <= set(state.injections)
    registry = StateRegistry(tiny[0], tmp_path)  # a restart rebuilds the index from the files
    assert {s["session"]: s["injections"] for s in registry.sessions("alice")} == {
        f.stem: len(MemoryState.load(f).injections) for f in files
    }
    registry.close()
    assert not list((tmp_path / "states" / "alice").glob(".*.tmp"))  # interrupted saves cleaned up


# --- configuration ------------------------------------------------------------------------------
def test_api_keys_come_from_a_toml_or_json_file_and_the_environment(tmp_path):
    (tmp_path / "keys.toml").write_text(f'[keys]\n"{ALICE}" = "alice"\n')
    (tmp_path / "keys.json").write_text(f'{{"keys": {{"{BOB}": "bob"}}}}')
    table = load_keys(tmp_path / "keys.toml", environ={"LATENTMEM_API_KEYS": "carol-key-0123456789:carol"})
    assert (table.user(ALICE), table.user("carol-key-0123456789"), table.user(BOB)) == ("alice", "carol", None)
    assert load_keys(tmp_path / "keys.json", environ={}).user(BOB) == "bob"
    for bad in ({}, {"LATENTMEM_API_KEYS": "short:alice"}, {"LATENTMEM_API_KEYS": f"{ALICE}:../root"}):
        with pytest.raises(AuthConfigError):
            load_keys(None, environ=bad)


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "alone"])
def test_chat_completions_rank_memory_by_the_last_user_message(tmp_path, tiny, monkeypatch, batching):
    from latentmem import chat as chat_module
    from latentmem.server import app as app_module
    from latentmem.server.batching import ChatBatcher

    seen = []
    submit, reply = ChatBatcher.submit, chat_module.generate_reply
    monkeypatch.setattr(ChatBatcher, "submit", lambda self, *a, **k: seen.append(k["ranking_ids"]) or submit(self, *a, **k))
    monkeypatch.setattr(app_module, "generate_reply", lambda *a, **k: seen.append(k["ranking_ids"]) or reply(*a, **k))
    model, tokenizer = tiny
    srv = ThreadServer(create_app(model, tokenizer, data_dir=tmp_path / "data", api_keys=KEYS, model_name="tiny",
                                  batching=batching))  # fmt: skip
    try:
        with client(srv) as c:
            messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"},
                        {"role": "user", "content": "Where is the key?"}]  # fmt: skip
            body = {"model": "tiny", "messages": messages, "max_tokens": 3, "temperature": 0}
            assert c.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        srv.stop()
    assert seen == [tokenizer("Where is the key?", add_special_tokens=False).input_ids]

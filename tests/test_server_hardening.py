"""The memory server against an attacker and a careless client (issue 19), one reproduction per test.

Uploads that name paths, forged and damaged state files, text no tokenizer can take, a full disk,
a damaged index, a body sent a byte at a time, one user's huge inject: each must get a clear JSON
4xx (or 507), leave the memory on disk as it was, and leave the connection usable.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from test_persistence import forge
from test_server import ALICE, BOB, FACT, KEYS, TINY, ThreadServer, chat, client

from latentmem import MemoryState
from latentmem.ltm.store import LongTermStore
from latentmem.models import untrained_model
from latentmem.server import batching as batching_module
from latentmem.server import create_app
from latentmem.server import gate as gate_module
from latentmem.server.auth import AuthConfigError, load_keys
from latentmem.server.gate import ModelGate, inject_in_turns
from latentmem.server.states import StateRegistry
from latentmem.writing import split_into_chunks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return untrained_model(**TINY)


def start(tmp_path, tiny, **options) -> ThreadServer:
    srv = ThreadServer(create_app(*tiny, data_dir=tmp_path / "data", api_keys=KEYS, model_name="tiny", **options))
    srv.data_dir = tmp_path / "data"
    return srv


@pytest.fixture
def server(tmp_path, tiny):
    srv = start(tmp_path, tiny)
    yield srv
    srv.stop()


def files(folder) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: the state on disk, to compare before and after
    (the index's own files are left out: sqlite touches its shared-memory file on every read)."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("index.sqlite3"))
    return {str(p.relative_to(folder)): p.read_bytes() for p in found}


def alice_file(server, session="default"):
    return server.data_dir / "states" / "alice" / f"{session}.safetensors"


def exported(c: httpx.Client, tmp_path, name="upload.safetensors") -> bytes:
    c.post("/v1/memory/inject", json={"text": FACT, "source": "ada"})
    data = c.get("/v1/memory/export").content
    (tmp_path / name).write_bytes(data)
    return data


# --- 1. no path out of a user's folder --------------------------------------------------------
def test_import_naming_a_long_term_store_anywhere_gets_one_message_and_reads_nothing(server, tmp_path):
    c = client(server)
    data = exported(c, tmp_path)
    store = tmp_path / "outside" / "store"  # a valid long-term store outside the data directory
    LongTermStore(2, 64, 16).save(store)
    bob = server.data_dir / "states" / "bob"
    client(server, BOB).post("/v1/memory/inject", json={"text": FACT})
    before, outside = files(server.data_dir), files(tmp_path / "outside")
    names = [str(store), str(store) + "x", "../../bob/default.safetensors", "../" * 8 + "etc", "/etc", "",
             str(bob / "default.safetensors"), "0123456789ab", "upload.safetensors.ltm-0123456789ab"]  # fmt: skip
    answers = set()
    for name in names:
        upload = forge(data, tmp_path / "forged.safetensors", ltm=name).read_bytes()
        r = c.post("/v1/memory/import?session=stolen", content=upload)
        assert r.status_code == 400, (name, r.text)
        answers.add(r.json()["error"]["message"])
    # One answer for every name (a store that exists, one that does not, a plain folder), so the
    # answer tells nothing about the disk; and nothing was read into or written to any folder.
    assert len(answers) == 1 and "cannot name a long-term memory store" in answers.pop()
    assert files(server.data_dir) == before and files(tmp_path / "outside") == outside
    assert c.get("/v1/memory?session=stolen").status_code == 404


def test_session_names_are_matched_whole(server):
    c = client(server)
    for given in ({"params": {"session": "notes\n"}}, {"params": {"session": "notes\r\n"}}):
        r = c.post("/v1/memory/inject", json={"text": FACT}, **given)
        assert r.status_code == 400 and r.json()["error"]["param"] == "session", r.text
    r = c.post("/v1/memory/inject", json={"text": FACT, "session": "notes\n"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "session"
    assert not list((server.data_dir / "states").rglob("notes*"))
    assert c.get("/v1/sessions").json()["data"] == []


def test_a_user_name_with_a_trailing_newline_is_refused_at_startup(tmp_path):
    (tmp_path / "keys.toml").write_text(f'[keys]\n"{ALICE}" = "alice\\n"\n')
    with pytest.raises(AuthConfigError, match="must match"):
        load_keys(tmp_path / "keys.toml", environ={})


# --- 2, 3. every upload checked before anything is written --------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        {"injections": [{"id": 0, "source": "ada", "tokens": 80, "timestamp": float("nan"), "importance": 1.0}]},
        {"write_count": -5},
        {"write_count": 99, "manifest_checksum": "edited by hand"},
    ],
    ids=["NaN timestamp", "negative write count", "edited manifest, checksum dropped"],
)
def test_an_import_with_an_invalid_manifest_is_refused_and_installs_nothing(server, tmp_path, changes):
    c = client(server)
    data = exported(c, tmp_path)
    if changes.get("manifest_checksum"):  # an edit without recomputing the checksum: dropped, as the audit did
        upload = _without_manifest_checksum(data, write_count=99)
    else:
        upload = forge(data, tmp_path / "forged.safetensors", **changes).read_bytes()
    before = files(server.data_dir)
    r = c.post("/v1/memory/import?session=copy", content=upload)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_memory_file", r.text
    assert files(server.data_dir) == before
    assert c.get("/v1/memory?session=copy").status_code == 404  # not installed
    assert chat(c).status_code == 200


def _without_manifest_checksum(data: bytes, **changes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    manifest = {**json.loads(header["__metadata__"]["manifest"]), **changes}
    del manifest["manifest_checksum"]
    header["__metadata__"]["manifest"] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def test_an_import_of_another_shape_with_this_models_fingerprint_is_refused(server, tmp_path):
    c = client(server)
    data = exported(c, tmp_path)
    wide = forge(data, tmp_path / "wide.safetensors", tensors={"stm": torch.zeros(2, 32, 80)}, shape=[2, 32, 80])
    r = c.post("/v1/memory/import?session=wide", content=wide.read_bytes())
    assert r.status_code == 400 and "this model's is [2, 32, 64]" in r.json()["error"]["message"], r.text
    assert c.get("/v1/memory?session=wide").status_code == 404


# --- 2. damaged files: set aside, a clear 409, reset or import replaces them ---------------------
def test_a_flipped_byte_makes_409s_that_say_how_to_recover_and_reset_replaces_it(tmp_path, tiny):
    srv = start(tmp_path, tiny)
    c = client(srv)
    c.post("/v1/memory/inject", json={"text": FACT, "source": "ada"})
    srv.stop()
    damaged = bytearray(alice_file(srv).read_bytes())
    damaged[-3] ^= 0x40  # a tensor byte: the manifest still reads, the checksum does not match
    alice_file(srv).write_bytes(bytes(damaged))

    srv = start(tmp_path, tiny)
    try:
        c = client(srv)
        calls = [
            lambda: c.get("/v1/memory"), lambda: chat(c), lambda: chat(c, stream=True),
            lambda: c.post("/v1/memory/inject", json={"text": FACT}), lambda: c.get("/v1/memory/export"),
            lambda: c.post("/v1/memory/forget", json={"source": "ada"}),
        ]  # fmt: skip
        for call in calls:
            r = call()
            assert r.status_code == 409, r.text  # the stream too: refused before its 200
            error = r.json()["error"]
            assert error["code"] == "damaged_state" and "checksum" in error["message"]
            assert "DELETE /v1/memory" in error["message"] and "import" in error["message"]
        aside = alice_file(srv).with_name("default.safetensors.damaged")
        assert aside.read_bytes() == bytes(damaged) and not alice_file(srv).exists()  # kept for the operator
        assert c.get("/v1/sessions").json()["data"][0]["damaged"].startswith("the file of session 'default'")

        reset = c.delete("/v1/memory")
        assert reset.status_code == 200 and reset.json()["writes"] == 0
        assert c.post("/v1/memory/inject", json={"text": FACT}).json()["id"] == 0
        assert c.get("/v1/sessions").json()["data"][0]["damaged"] is None
    finally:
        srv.stop()


@pytest.mark.parametrize("session", ["default", "notes"])
def test_a_truncated_file_found_at_startup_is_never_an_empty_memory_and_import_replaces_it(tmp_path, tiny, session):
    srv = start(tmp_path, tiny)
    c = client(srv)
    c.post("/v1/memory/inject", json={"text": FACT, "source": "ada", "session": session})
    saved = c.get(f"/v1/memory/export?session={session}").content
    srv.stop()
    alice_file(srv, session).write_bytes(saved[: len(saved) // 2])

    srv = start(tmp_path, tiny)
    try:
        c = client(srv)
        r = c.get(f"/v1/memory?session={session}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "damaged_state", r.text  # not empty, not 404
        assert [s["session"] for s in c.get("/v1/sessions").json()["data"]] == [session]
        installed = c.post(f"/v1/memory/import?session={session}", content=saved)
        assert installed.status_code == 200 and installed.json()["injections"] == 1
        assert c.get(f"/v1/memory?session={session}").json()["sources"][0]["source"] == "ada"
    finally:
        srv.stop()


def test_a_damaged_index_is_rebuilt_from_the_state_files(tmp_path, tiny):
    srv = start(tmp_path, tiny)
    client(srv).post("/v1/memory/inject", json={"text": FACT, "session": "work"})
    srv.stop()
    for part in srv.data_dir.glob("index.sqlite3*"):
        part.unlink()
    (srv.data_dir / "index.sqlite3").write_bytes(b"this is not a database" * 100)

    registry = StateRegistry(tiny[0], srv.data_dir)  # used to raise "file is not a database"
    assert [s["session"] for s in registry.sessions("alice")] == ["work"]
    assert len(list(srv.data_dir.glob("index.sqlite3.unreadable-*"))) == 1

    for part in srv.data_dir.glob("index.sqlite3*"):  # damaged again, while serving
        if "unreadable" not in part.name:
            with open(part, "r+b") as f:
                f.write(b"garbage!" * 4000)
    assert registry.exists("alice", "work") and [s["session"] for s in registry.sessions("alice")] == ["work"]
    registry.close()


# --- 4. JSON errors for every failure, and the connection stays usable ---------------------------
def test_lone_surrogates_get_400_and_the_connection_stays_usable(server):
    c = client(server)
    c.post("/v1/memory/inject", json={"text": FACT})
    for path, body, field in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
         "text"),
        ("/v1/memory/inject", {"text": FACT + "\ud800"}, "text"),
        ("/v1/memory/inject", {"text": FACT, "source": "\ud800"}, "source"),
    ]:  # fmt: skip
        r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        message = r.json()["error"]["message"]  # ours, or pydantic's own for a length-limited field
        assert r.status_code == 400 and ("lone surrogate" in message or "unicode string" in message), r.text
        assert field in r.json()["error"]["message"] and r.headers.get("connection") != "close"
        assert c.get("/v1/memory").status_code == 200  # the same connection, still open


class DiskFull:
    def __init__(self, monkeypatch):
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(MemoryState, "save", full)


def test_a_full_disk_gets_507_changes_nothing_and_keeps_the_connection(server, tmp_path, monkeypatch):
    c = client(server)
    upload = exported(c, tmp_path)
    before, memory = files(server.data_dir), c.get("/v1/memory").json()
    DiskFull(monkeypatch)
    for request in (
        lambda: c.post("/v1/memory/inject", json={"text": FACT}),
        lambda: c.post("/v1/memory/import?session=copy", content=upload),
        lambda: c.delete("/v1/memory"),
        lambda: c.get("/v1/memory/export?session=default", headers={"X-Latentmem-Session": "default"}),
    ):
        r = request()
        if r.status_code == 200:  # export of a saved session needs no disk space
            continue
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        assert r.headers.get("connection") != "close"
        assert c.get("/v1/memory").json() == memory  # same connection; the failed write was dropped
    monkeypatch.undo()
    assert files(server.data_dir) == before


def test_an_unexpected_error_is_a_json_500_and_the_next_request_on_the_connection_works(server, monkeypatch):
    from latentmem.server import app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module, "generate_reply", broken)  # a chat run alone (--no-batching)
    monkeypatch.setattr(app_module.ChatBatcher, "generate", broken)  # a chat run in the batch
    c = client(server)
    for _ in range(5):
        r = chat(c)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "RuntimeError" in r.json()["error"]["message"] and r.headers.get("connection") != "close"
        assert c.get("/v1/models").status_code == 200


# --- 5. a body read deadline ----------------------------------------------------------------------
def test_a_body_sent_too_slowly_gets_408_and_the_connection_is_closed(tmp_path, tiny):
    srv = start(tmp_path, tiny, body_timeout=1.0)
    try:
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = (f"POST /v1/memory/inject HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")  # fmt: skip
            sock.sendall(head.encode() + b'{"te')
            start_time, reply = time.monotonic(), b""
            for _ in range(20):  # a byte a second would never finish; the server stops waiting
                try:
                    sock.sendall(b"x")
                except OSError:
                    break
                chunk = _read_some(sock, 0.5)
                reply += chunk
                if b"\r\n\r\n" in reply and b"}}" in reply:
                    break
            elapsed = time.monotonic() - start_time
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"connection: close" in reply.lower() and b"body_timeout" in reply
        assert elapsed < 5
    finally:
        srv.stop()


def _read_some(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


def test_an_oversized_body_gets_413_that_says_connection_close(server):
    r = client(server).post("/v1/memory/inject", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["connection"] == "close"


def test_a_client_that_sends_its_whole_oversized_body_first_still_reads_the_413(server):
    # The server reads (and discards) the rest of the body before closing: a close while the client is
    # still sending makes the client's kernel reset the connection, losing the response (seen under load).
    host, port = server.url.removeprefix("http://").split(":")
    body = b"x" * (8 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (f"POST /v1/memory/inject HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + body)
        reply = b""
        while b"}}" not in reply:
            chunk = _read_some(sock, 5)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"body_too_large" in reply and b"connection: close" in reply.lower()


# --- 6. one user's long inject does not stall the others ------------------------------------------
def test_inject_over_the_token_cap_gets_413(tmp_path, tiny):
    srv = start(tmp_path, tiny, max_inject_tokens=200)
    try:
        c = client(srv)
        r = c.post("/v1/memory/inject", json={"text": "x" * 201})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_tokens", r.text
        assert "201 tokens" in r.json()["error"]["message"] and r.json()["error"]["param"] == "text"
        assert c.post("/v1/memory/inject", json={"text": "x" * 200}).status_code == 200
    finally:
        srv.stop()


def test_inject_in_turns_writes_what_model_inject_writes(tiny):
    model, tokenizer = tiny
    ids = torch.tensor(tokenizer(FACT * 30, add_special_tokens=False).input_ids)
    chunks = split_into_chunks(ids, model.config.chunk_size)
    assert len(chunks) > 1
    direct, in_turns = model.new_memory(seed=3), model.new_memory(seed=3)
    model.inject(direct, input_ids=ids, source="s")
    result = inject_in_turns(model, ModelGate(), in_turns, chunks, "s")
    assert torch.equal(direct.stm, in_turns.stm) and torch.equal(direct.sources, in_turns.sources)
    assert (result.chunks, result.tokens) == (len(chunks), len(ids))
    assert in_turns.injections[0].tokens == direct.injections[0].tokens == len(ids)


def test_another_users_chat_is_answered_between_the_chunks_of_a_long_inject(server, monkeypatch):
    real, real_batch = gate_module.compute_new_slots, batching_module.compute_slots_batch

    def slow(*args):  # each chunk takes a while, as a real model's would
        time.sleep(0.1)
        return real(*args)

    def slow_batch(*args):  # the same, for chunks written in a batch (the server's default)
        time.sleep(0.1)
        return real_batch(*args)

    monkeypatch.setattr(gate_module, "compute_new_slots", slow)
    monkeypatch.setattr(batching_module, "compute_slots_batch", slow_batch)
    text = "The archive opens at nine. " * 400  # 10,800 tokens: 22 chunks, >= 2.2 s
    done: dict[str, float] = {}

    def long_inject():
        r = client(server).post("/v1/memory/inject", json={"text": text})
        assert r.status_code == 200 and r.json()["chunks"] == 22
        done["inject"] = time.monotonic()

    writer = threading.Thread(target=long_inject)
    writer.start()
    time.sleep(0.5)  # the inject is under way
    start_time = time.monotonic()
    assert chat(client(server, BOB)).status_code == 200
    done["chat"] = time.monotonic()
    writer.join()
    assert done["chat"] < done["inject"] - 0.5  # answered between chunks, not after the last
    assert done["chat"] - start_time < 1.5


# --- 7. smaller items -----------------------------------------------------------------------------
def test_one_api_key_for_two_users_is_refused_at_startup(tmp_path):
    (tmp_path / "keys.json").write_text(f'{{"keys": {{"{ALICE}": "alice", "{ALICE}": "bob"}}}}')
    with pytest.raises(AuthConfigError, match="two users"):
        load_keys(tmp_path / "keys.json", environ={})
    (tmp_path / "keys.toml").write_text(f'[keys]\n"{ALICE}" = "alice"\n')
    with pytest.raises(AuthConfigError, match="two users"):
        load_keys(tmp_path / "keys.toml", environ={"LATENTMEM_API_KEYS": f"{ALICE}:bob"})
    with pytest.raises(AuthConfigError, match="two users"):
        load_keys(None, environ={"LATENTMEM_API_KEYS": f"{ALICE}:alice,{ALICE}:bob"})
    assert load_keys(tmp_path / "keys.toml", environ={"LATENTMEM_API_KEYS": f"{ALICE}:alice"}).user(ALICE) == "alice"


def test_chat_names_the_model_it_serves_and_the_param_at_fault(server):
    c = client(server)
    wrong = chat(c, model="latentmem")
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
    assert "'tiny'" in wrong.json()["error"]["message"]
    assert chat(c, model=c.get("/v1/models").json()["data"][0]["id"]).status_code == 200
    for extra, param in (({"tools": [{}]}, "tools"), ({"n": 2}, "n"), ({"logprobs": True}, "logprobs")):
        r = chat(c, **extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_body_without_a_json_content_type_gets_a_hint(server):
    r = client(server).post("/v1/memory/inject", content=json.dumps({"text": FACT}))  # curl -d sends a form type
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]

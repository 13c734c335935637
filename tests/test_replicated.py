"""States in object storage (store.py, server/store_registry.py) and replicated serving on Ray Serve
(serving.py), on one machine: a real S3-compatible server (moto's standalone server, over HTTP on
a loopback port) and a local Ray instance with 2 replicas of the tiny model.

Needs the `ray` extra (ray[serve], s3fs, moto[server]); without it these tests are skipped, with
the reason. CI installs it. The Ray tests share one cluster and one deployment (module scope).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time

import httpx
import pytest

from latentmem.models import untrained_model
from latentmem.server import create_app
from latentmem.store import LocalStore, StaleVersion, open_store

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"
KEYS = {ALICE: "alice", BOB: "bob"}
TINY = {"hidden_size": 64, "num_layers": 2, "num_tokens": 8, "num_blocks": 4}
BUCKET = "latentmem-test"
FACT = "Ada's locker code is 4711; she keeps it in the green notebook on the second shelf."

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _need(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"needs the ray extra (pip install 'latentmem[ray]'): no {module}")


@pytest.fixture(scope="module")
def tiny():
    return untrained_model(**TINY)


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port, one bucket; yields the endpoint URL."""
    _need("s3fs", "moto.server", "flask")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


_prefixes = iter(range(10**6))


@pytest.fixture
def s3_url(s3_server):
    """A fresh prefix in the bucket, and the storage options that reach it."""
    return f"s3://{BUCKET}/t{next(_prefixes)}", {"endpoint_url": s3_server}


# --- the stores: conditional commits ---------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "store")
    url, options = request.getfixturevalue("s3_url")
    return open_store(url, options)


def test_store_commits_only_over_the_version_read(store):
    assert store.head("states/a/x.safetensors") is None and store.get("states/a/x.safetensors") is None
    first = store.put("states/a/x.safetensors", b"one", expected=None, meta={"writes": "1"})
    assert first.generation == 1
    with pytest.raises(StaleVersion):  # "create" over an existing object
        store.put("states/a/x.safetensors", b"other", expected=None)
    second = store.put("states/a/x.safetensors", b"two", expected=first.version, meta={"writes": "2"})
    assert second.generation == 2 and second.version != first.version
    with pytest.raises(StaleVersion):  # a writer that read generation 1 commits after generation 2
        store.put("states/a/x.safetensors", b"stale", expected=first.version)
    with pytest.raises(StaleVersion):  # a version of an object that does not exist
        store.put("states/a/y.safetensors", b"q", expected=first.version)
    data, head = store.get("states/a/x.safetensors")
    assert data == b"two" and head.version == second.version and head.generation == 2
    assert head.meta == {"writes": "2"} and store.head("states/a/x.safetensors").version == second.version
    assert store.list("states/a") == ["states/a/x.safetensors"] and store.list("states/b") == []


def test_local_store_racing_writers_one_wins(tmp_path):
    """Threads committing over the same version: exactly one commit lands per version."""
    store = LocalStore(tmp_path / "store")
    head = store.put("k", b"0", expected=None)
    wins = []

    def writer(i):
        try:
            store.put("k", str(i).encode(), expected=head.version)
            wins.append(i)
        except StaleVersion:
            pass

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1 and store.get("k")[0] == str(wins[0]).encode() and store.head("k").generation == 2


def test_store_refuses_protocols_without_conditional_writes():
    with pytest.raises(ValueError, match="could not be fenced"):
        open_store("memory://somewhere")


# --- the registry over a store: a stale replica's commit is refused -----------------------------------
def _registry(tiny, url, options, cache):
    from latentmem.server.store_registry import StoreRegistry

    return StoreRegistry(tiny[0], url, cache, storage_options=options)


def test_stale_replica_commit_refused(tiny, s3_url, tmp_path):
    from latentmem.server.store_registry import StaleState

    url, options = s3_url
    a, b = _registry(tiny, url, options, tmp_path / "a"), _registry(tiny, url, options, tmp_path / "b")
    with a.write("alice", "s") as slot:  # generation 1, via A
        slot.state.write_count += 1
    with pytest.raises(StaleState), b.write("alice", "s") as slot:  # B reads generation 1 ...
        assert slot.state.write_count == 1
        with a.write("alice", "s") as other:  # ... while A commits generation 2
            other.state.write_count += 10
        slot.state.write_count += 100  # B's commit, over generation 1, is refused
    assert b._slots[("alice", "s")].state is None  # B's refused write is dropped, not kept as the memory
    with a.read("alice", "s") as state:
        assert state.write_count == 11  # A's generation 2 stands; B's stale write never landed
    with b.read("alice", "s") as state:  # and B reads the newer memory, not its own stale one
        assert state.write_count == 11
    assert a.store.head(a.key("alice", "s")).generation >= 2


# --- the app over a store: two replicas' worth of apps on one store ----------------------------------
def _client(app, key=ALICE):
    from fastapi.testclient import TestClient

    return TestClient(app, headers={"Authorization": f"Bearer {key}"})


def _inject(c, session, source, text=FACT):
    return c.post("/v1/memory/inject", json={"text": text, "source": source, "session": session, "allow_short": True})


def test_apps_on_one_store_see_each_others_writes(tiny, s3_url, tmp_path):
    url, options = s3_url
    one = create_app(*tiny, data_dir=tmp_path / "a", api_keys=KEYS, model_name="tiny", store=url,
                     storage_options=options)  # fmt: skip
    two = create_app(*tiny, data_dir=tmp_path / "b", api_keys=KEYS, model_name="tiny", store=url,
                     storage_options=options)  # fmt: skip
    a, b, bob = _client(one), _client(two), _client(two, BOB)
    assert _inject(a, "work", "first").status_code == 200
    assert b.get("/v1/memory", params={"session": "work"}).json()["writes"] == 1
    assert _inject(b, "work", "second").status_code == 200  # B read A's commit, commits over it
    assert _inject(a, "work", "third").status_code == 200  # A sees B's commit (version check), no conflict
    sources = {row["source"] for row in b.get("/v1/memory", params={"session": "work"}).json()["sources"]}
    assert sources == {"first", "second", "third"}
    listed = a.get("/v1/sessions").json()["data"]
    assert [(row["session"], row["writes"], row["injections"]) for row in listed] == [("work", 3, 3)]
    # isolation: bob has no session "work", and his default memory is his own
    assert bob.get("/v1/memory", params={"session": "work"}).status_code == 404
    assert _inject(bob, "default", "bobs").status_code == 200
    assert a.get("/v1/memory").json()["writes"] == 0 and bob.get("/v1/sessions").json()["data"][0]["writes"] == 1
    # export from one, import into another session through the other
    exported = a.get("/v1/memory/export", params={"session": "work"})
    assert exported.status_code == 200
    imported = b.post("/v1/memory/import", params={"session": "copy"}, content=exported.content)
    assert imported.status_code == 200 and imported.json()["writes"] == 3
    assert a.get("/v1/memory", params={"session": "copy"}).json()["injections"] == 3


def test_commit_racing_another_replicas_is_refused_over_http(tiny, s3_url, tmp_path):
    """A write whose memory another replica commits while it runs: 409 stale_state, nothing written;
    the other replica's write stands, and the same request sent again succeeds over it."""
    url, options = s3_url
    one, two = (
        create_app(*tiny, data_dir=tmp_path / n, api_keys=KEYS, model_name="tiny", store=url, storage_options=options)
        for n in ("a", "b")
    )
    a, b = _client(one), _client(two)
    assert _inject(a, "s", "first").status_code == 200
    store, put = one.state.registry.store, one.state.registry.store.put

    def put_after_a_rival_commit(*args, **kwargs):
        store.put = put  # once
        assert _inject(b, "s", "rival").status_code == 200  # lands between A's read and A's commit
        return put(*args, **kwargs)

    store.put = put_after_a_rival_commit
    refused = _inject(a, "s", "late")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "stale_state"
    assert {row["source"] for row in b.get("/v1/memory", params={"session": "s"}).json()["sources"]} == {
        "first",
        "rival",
    }
    assert _inject(a, "s", "late").status_code == 200  # sent again: A reads the rival's commit first
    assert {row["source"] for row in a.get("/v1/memory", params={"session": "s"}).json()["sources"]} == {
        "first",
        "rival",
        "late",
    }


def test_damaged_object_is_never_read_as_empty(tiny, s3_url, tmp_path):
    url, options = s3_url
    app = create_app(*tiny, data_dir=tmp_path / "a", api_keys=KEYS, model_name="tiny", store=url,
                     storage_options=options)  # fmt: skip
    c = _client(app)
    assert _inject(c, "s", "fact").status_code == 200
    store = app.state.registry.store
    data, head = store.get("states/alice/s.safetensors")
    store.put("states/alice/s.safetensors", data[:-7] + b"garbage", expected=head.version)  # damaged in the store
    reply = c.get("/v1/memory", params={"session": "s"})
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "damaged_state"
    assert _inject(c, "s", "more").status_code == 409  # never written over as if empty
    assert c.delete("/v1/memory", params={"session": "s"}).status_code == 200  # reset replaces it
    assert c.get("/v1/memory", params={"session": "s"}).json()["writes"] == 0


def test_local_folder_store_serves_too(tiny, tmp_path):
    """`--store /a/folder`: the same fenced commits through the local store (one machine, many processes)."""
    app = create_app(*tiny, data_dir=tmp_path / "cache", api_keys=KEYS, model_name="tiny", store=str(tmp_path / "st"))
    c = _client(app)
    assert _inject(c, "s", "fact").status_code == 200
    assert (tmp_path / "st" / "states" / "alice" / "s.safetensors").is_file()
    assert c.get("/v1/memory", params={"session": "s"}).json()["sources"][0]["source"] == "fact"


def test_serve_run_builder_makes_the_application(tmp_path, monkeypatch):
    """`serve run latentmem.serving:app store=... replicas=...` (builds the application; starts nothing)."""
    _need("ray", "ray.serve")
    from ray.serve import Application

    from latentmem import serving

    monkeypatch.setenv("LATENTMEM_API_KEYS", f"{ALICE}:alice")
    built = serving.app({"store": str(tmp_path / "store"), "replicas": "3", "max_parallel": "2", "model_name": "x"})
    assert isinstance(built, Application)
    with pytest.raises(ValueError, match="store=URL"):
        serving.app({})
    with pytest.raises(ValueError, match="could not be fenced"):
        serving.app({"store": "memory://x"})
    assert serving.memory_id(serving.KeyTable(KEYS), {"authorization": f"Bearer {BOB}"}, "session=s1", b"") == "bob/s1"
    assert serving.memory_id(serving.KeyTable(KEYS), {"authorization": "Bearer nope"}, "", b"") is None
    body = b'{"session": "work", "text": "x"}'
    assert serving.memory_id(serving.KeyTable(KEYS), {"authorization": f"Bearer {ALICE}"}, "", body) == "alice/work"


# --- Ray Serve: 2 replicas of the tiny model over the S3 server --------------------------------------
def _deploy(url: str, options: dict) -> None:
    from ray import serve

    from latentmem.serving import build

    app = build(
        url, model=functools.partial(untrained_model, **TINY), keys=KEYS, replicas=2, replica_cpus=1,
        storage_options=options, model_name="tiny",
    )  # fmt: skip
    serve.run(app, name="latentmem", route_prefix="/")


@pytest.fixture(scope="module")
def ray_serve(s3_server):
    """A local Ray instance (2 CPUs) serving the deployment on a free port; yields (url, deploy again)."""
    _need("ray", "ray.serve", "s3fs", "moto.server")
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    url, options = f"s3://{BUCKET}/ray", {"endpoint_url": s3_server}
    for attempt in range(3):  # on a loaded machine Serve kills a proxy that starts too slowly: start again
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1"}})  # fmt: skip
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            _deploy(url, options)
            break
        except ray.exceptions.RayError:
            serve.shutdown()
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield f"http://127.0.0.1:{port}", functools.partial(_deploy, url, options)
    finally:
        serve.shutdown()
        ray.shutdown()


def _http(base: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _retrying(call, attempts: int = 40):
    """A request sent again until it is answered 2xx/4xx (a replica killed, restarted, or a stale commit: 409)."""
    for _ in range(attempts):
        try:
            reply = call()
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        if reply.status_code < 500 and reply.status_code != 409:
            return reply
        time.sleep(0.5)
    raise AssertionError(f"no answer after {attempts} attempts: {reply.status_code} {reply.text[:300]}")


def _sources(c: httpx.Client, session: str) -> set[str]:
    reply = _retrying(lambda: c.get("/v1/memory", params={"session": session}))
    assert reply.status_code == 200, reply.text
    return {row["source"] for row in reply.json()["sources"]}


def test_ray_two_users_sessions_through_both_replicas(ray_serve):
    base, _ = ray_serve
    plan = {ALICE: ["a1", "a2", "shared"], BOB: ["b1", "b2", "shared"]}
    replicas, problems = set(), []

    def user(key):
        with _http(base, key) as c:
            for round_ in range(2):
                for session in plan[key]:
                    reply = _retrying(lambda s=session, r=round_: _inject(c, s, f"{KEYS[key]}-{s}-{r}"))
                    replicas.add(reply.headers.get("x-latentmem-replica"))
                    if reply.status_code != 200:
                        problems.append(reply.text)

    threads = [threading.Thread(target=user, args=(key,)) for key in plan]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not problems
    assert len(replicas - {None}) == 2, replicas  # the memories were spread over both replicas
    for key, sessions in plan.items():
        with _http(base, key) as c:
            for session in sessions:  # each memory holds exactly its own writes (the same name: another memory)
                assert _sources(c, session) == {f"{KEYS[key]}-{session}-{r}" for r in range(2)}
            listed = [row["session"] for row in c.get("/v1/sessions").json()["data"]]
            assert sorted(listed) == sorted(sessions)
    with _http(base, BOB) as c:  # alice's sessions are unknown to bob
        assert c.get("/v1/memory", params={"session": "a1"}).status_code == 404
        assert c.get("/v1/memory").status_code == 200 and c.get("/v1/memory").json()["writes"] == 0
    with _http(base, "not-a-key-0123456789") as c:
        assert c.get("/v1/memory").status_code == 401


def test_ray_replica_killed_during_writes_loses_no_acknowledged_write(ray_serve):
    import ray

    base, _ = ray_serve
    sessions = [(ALICE, "k0"), (ALICE, "k1"), (BOB, "k0"), (BOB, "k1")]
    acked: dict[tuple[str, str], list[str]] = {s: [] for s in sessions}
    served_by: dict[str, int] = {}
    answers: list[tuple[float, str]] = []

    killed_at: list[float] = []  # set once the replica is dead

    def after_kill(started: float) -> bool:
        return bool(killed_at) and started > killed_at[0] + 2  # the router has had time to see the death

    def writer(key, session):
        # Writes go on until each writer has had three answered after the kill: a fast machine must not finish
        # the whole plan before the kill lands (the test then says nothing about failover).
        with _http(base, key) as c:
            mine_after = 0
            for i in range(400):
                if mine_after >= 3:
                    break
                started = time.monotonic()
                reply = _retrying(lambda i=i: _inject(c, session, f"{session}-{i}"))
                assert reply.status_code == 200, reply.text
                acked[(key, session)].append(f"{session}-{i}")  # acknowledged: must survive anything now
                replica = reply.headers.get("x-latentmem-replica")
                served_by[replica] = served_by.get(replica, 0) + 1
                answers.append((started, replica))
                mine_after += after_kill(started)

    threads = [threading.Thread(target=writer, args=s) for s in sessions]
    [t.start() for t in threads]
    while sum(len(v) for v in acked.values()) < 8:  # writes under way on both replicas
        time.sleep(0.05)
    victim = max(served_by, key=served_by.get)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
    assert names, (victim, ray.util.list_named_actors(all_namespaces=True))
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)  # kill -9 of a replica, mid-writes
    killed_at.append(time.monotonic())
    [t.join() for t in threads]
    later = [replica for started, replica in answers if after_kill(started)]
    assert later and victim not in later  # writes went on, on the other replicas only
    for (key, session), sources in acked.items():
        with _http(base, key) as c:
            present = _sources(c, session)
        assert set(sources) <= present, (key, session, set(sources) - present)


def test_ray_restart_of_the_whole_deployment_keeps_every_memory(ray_serve):
    from ray import serve

    base, deploy = ray_serve
    users = {}
    for key in (ALICE, BOB):
        with _http(base, key) as c:
            listed = _retrying(lambda c=c: c.get("/v1/sessions")).json()["data"]
            users[key] = {row["session"]: (row["writes"], _sources(c, row["session"])) for row in listed}
    assert sum(len(v) for v in users.values()) >= 8
    serve.delete("latentmem")  # every replica and the router gone
    deploy()
    for key, before in users.items():
        with _http(base, key) as c:
            listed = _retrying(lambda c=c: c.get("/v1/sessions")).json()["data"]
            after = {row["session"]: (row["writes"], _sources(c, row["session"])) for row in listed}
        assert after == before


def test_cli_serve_store_and_ray_options(tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from latentmem.cli import app
    from latentmem.server.store_registry import StoreRegistry

    runner = CliRunner()
    monkeypatch.setenv("LATENTMEM_API_KEYS", f"{ALICE}:alice")
    refused = runner.invoke(app, ["serve", "--ray", "--model", "tiny", "--data-dir", str(tmp_path / "data")])
    assert refused.exit_code != 0 and "--ray needs --store" in refused.output
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    done = runner.invoke(
        app, ["serve", "--model", "tiny", "--data-dir", str(tmp_path / "data"), "--store", str(tmp_path / "store")]
    )
    assert done.exit_code == 0, done.output
    assert isinstance(served["app"].state.registry, StoreRegistry)
    assert _inject(_client(served["app"]), "s", "fact", FACT * 4).status_code == 200
    assert (tmp_path / "store" / "states" / "alice" / "s.safetensors").is_file()
    assert not (tmp_path / "data" / "states" / "alice").exists()  # the data dir only caches, in its own folder


def test_long_term_memory_travels_as_one_object(tiny, s3_url, tmp_path):
    """An M+ state (file + long-term store folder) is one tar object, unpacked only as those two."""
    from latentmem.presets.retrievers import mplus_from

    url, options = s3_url
    mplus = (mplus_from(tiny[0], num_ltm_blocks=2), tiny[1])
    apps = [
        create_app(
            *mplus, data_dir=tmp_path / name, api_keys=KEYS, model_name="tiny", store=url, storage_options=options
        )
        for name in ("one", "two")
    ]
    one, two = _client(apps[0]), _client(apps[1])
    for source in ("first", "second"):
        assert _inject(one, "s", source, FACT * 4).status_code == 200
    object_ = apps[0].state.registry.store.get("states/alice/s.safetensors")[0]
    assert object_[257:262] == b"ustar"  # the state file and its long-term store, one object
    sources = {row["source"] for row in two.get("/v1/memory", params={"session": "s"}).json()["sources"]}
    assert sources == {"first", "second"}
    assert _inject(two, "s", "third", FACT * 4).status_code == 200
    body = {"messages": [{"role": "user", "content": "code?"}], "max_tokens": 3, "session": "s"}
    assert one.post("/v1/chat/completions", json=body).status_code == 200
    assert one.get("/v1/memory", params={"session": "s"}).json()["writes"] == 3
    # an object naming anything but its state and one long-term store is damaged, never unpacked
    import io
    import tarfile

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        for name in ("s.safetensors", "../../escape"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    store = apps[0].state.registry.store
    store.put("states/alice/s.safetensors", evil.getvalue(), expected=store.head("states/alice/s.safetensors").version)
    reply = two.get("/v1/memory", params={"session": "s"})
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "damaged_state"
    assert not (tmp_path / "escape").exists() and not (tmp_path / "two" / "escape").exists()

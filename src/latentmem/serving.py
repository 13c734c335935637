"""Replicated memory serving on Ray Serve, with every memory state in one object store.

Two deployments make one Ray Serve application:

- `MemoryRouter` (the HTTP ingress, no model): reads the request, finds whose memory it names
  (the user of its bearer key plus its session: `X-Latentmem-Session`, `?session=` or the JSON
  body's `session`), and passes it on to a model replica with that memory as Ray Serve's
  *multiplexed model id*. Ray's router sends requests with the same id to a replica that already
  holds it, so one user's session keeps hitting one replica while it is loaded there.
- `MemoryReplica` (N replicas, one model each): runs today's FastAPI app (server/app.py, the same
  OpenAI-compatible API, auth, limits and errors) in-process, with its states in the shared store
  (server/store_registry.py). Memories are loaded on demand, evicted LRU (Ray's multiplexing and
  the registry cap both at `max_loaded`), and committed to the store, fenced by version, before a
  write is acknowledged.

Routing is for speed, not for safety: if a memory is served by two replicas (Ray sends a request
elsewhere when its replica is busy or gone), every read checks the store's version first and every
commit is conditional, so a stale replica can neither serve an old memory as current nor overwrite
a newer one (its commit is refused: HTTP 409 `stale_state`, nothing written).

    latentmem serve --ray --replicas 2 --store s3://bucket/latentmem --keys keys.toml
    serve run latentmem.serving:app store=s3://bucket/latentmem replicas=2 keys=keys.toml

(`serve run` reads the API keys in the driver: `keys=` a keys file, or LATENTMEM_API_KEYS.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs

from .server.auth import NAME_PATTERN, KeyTable, load_keys

logger = logging.getLogger("latentmem.serving")
SESSION_HEADER = "x-latentmem-session"
REPLICA_HEADER = "x-latentmem-replica"  # on every response: the replica that answered
DEFAULT_SESSION = "default"
MAX_REQUEST_BYTES = 256 << 20  # what the router buffers of one request; the replica applies the real limits

try:
    from ray import serve
except ModuleNotFoundError:  # pragma: no cover - the import error says what to install
    serve = None


def _need_ray():
    if serve is None:
        raise ModuleNotFoundError("replicated serving needs Ray Serve and s3fs: pip install 'latentmem[ray]'")


def memory_id(keys: KeyTable, headers: dict[str, str], query: str, body: bytes) -> str | None:
    """`user/session` of the memory a request names, or None (no valid key or session: any replica answers)."""
    auth = headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    user = keys.user(key.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        return None
    given = {headers.get(SESSION_HEADER)} | set(parse_qs(query).get("session", []))
    if body[:1] == b"{" and b'"session"' in body:
        try:
            given.add(json.loads(body).get("session"))
        except (ValueError, AttributeError):
            pass
    given.discard(None)
    given.discard("")
    if len(given) > 1:
        return None  # conflicting: the replica answers 400
    session = given.pop() if given else DEFAULT_SESSION
    return f"{user}/{session}" if isinstance(session, str) and NAME_PATTERN.fullmatch(session) else None


async def run_asgi(app, request: dict) -> AsyncIterator:
    """Call an ASGI app in this process: yields ("start", status, headers) and then the body's chunks."""
    messages: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request["method"], "scheme": "http", "path": request["path"],
        "raw_path": request["path"].encode(), "query_string": request["query_string"], "root_path": "",
        "headers": request["headers"], "client": request.get("client"), "server": None,
    }  # fmt: skip
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield ("start", message["status"], headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    break
    finally:
        done.set()  # the response is sent, or the caller went away: a streaming reply stops generating
        await asyncio.wait([task], timeout=30)


class LoadedMemory:
    """What Ray's multiplexing holds per memory id; unloading it drops the state from the replica."""

    def __init__(self, registry, user: str, session: str):
        self.registry, self.user, self.session = registry, user, session

    def __del__(self):
        self.registry.unload(self.user, self.session)


class MemoryReplica:
    """One model and today's app, states in the shared store (a Ray Serve deployment class)."""

    def __init__(self, model: str | Callable | None, store: str, keys: KeyTable, options: dict[str, Any]):
        import torch

        from .server.app import create_app

        options = dict(options)
        threads, max_loaded = options.pop("threads", 1), options.pop("max_loaded", 64)
        if threads:
            torch.set_num_threads(threads)
        if callable(model):
            model_, tokenizer = model()
        else:
            from .models import load_model

            model_, tokenizer = load_model(model)
        self.cache = tempfile.mkdtemp(prefix="latentmem-replica-")
        self.app = create_app(
            model_, tokenizer, data_dir=self.cache, api_keys=keys, store=store, max_loaded_states=max_loaded, **options
        )
        self.registry = self.app.state.registry
        self.replica = serve.get_replica_context().replica_id.unique_id

        async def load(memory: str) -> LoadedMemory:
            user, _, session = memory.partition("/")
            return LoadedMemory(self.registry, user, session)  # the state itself loads with the request

        self._memory = serve.multiplexed(max_num_models_per_replica=max_loaded)(load)

    async def handle(self, request: dict) -> AsyncIterator:
        memory = serve.get_multiplexed_model_id()
        if memory:
            await self._memory(memory)  # Ray learns this replica holds it (and evicts its LRU one)
        async for item in run_asgi(self.app, request):
            if isinstance(item, tuple):  # the response's start: say which replica answered
                item = (*item[:2], [*item[2], (REPLICA_HEADER, self.replica)])
            yield item

    def __del__(self):
        shutil.rmtree(getattr(self, "cache", ""), ignore_errors=True)


class MemoryRouter:
    """The HTTP ingress: sends each request to the replica holding its memory (a Ray Serve deployment class)."""

    def __init__(self, backend, keys: KeyTable, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.backend, self.keys, self.max_request_bytes = backend, keys, max_request_bytes

    async def __call__(self, request):
        from starlette.responses import StreamingResponse

        from .server.errors import error_response

        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                return error_response(413, f"request body over {self.max_request_bytes} bytes", "request_too_large")
        body = bytes(body)
        headers = {k.lower(): v for k, v in request.headers.items()}
        memory = memory_id(self.keys, headers, request.url.query, body)
        forwarded = {
            "method": request.method, "path": request.url.path, "query_string": request.url.query.encode(),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
            "body": body, "client": tuple(request.client) if request.client else None,
        }  # fmt: skip
        handle = self.backend.options(stream=True, **({"multiplexed_model_id": memory} if memory else {}))
        replies = handle.handle.remote(forwarded)
        try:
            _, status, reply_headers = await replies.__anext__()
        except Exception as err:  # noqa: BLE001 (the replica died or could not be reached: nothing acknowledged)
            logger.warning("replica failed before answering: %r", err)
            return error_response(503, "the replica serving this memory failed; send the request again",
                                  "replica_unavailable")  # fmt: skip

        async def rest():
            try:
                async for chunk in replies:
                    yield chunk
            except Exception as err:  # noqa: BLE001 (mid-body: the status is sent, so the body ends short)
                logger.warning("replica failed while answering: %r", err)

        response = StreamingResponse(rest(), status_code=status)
        response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply_headers]
        return response


def build(
    store: str,
    *,
    model: str | Callable | None = None,
    keys: KeyTable | dict[str, str] | str | None = None,
    replicas: int = 2,
    replica_cpus: float = 1.0,
    max_loaded: int = 64,
    threads: int = 1,
    **server_options,
):
    """The Ray Serve application: a router and `replicas` model replicas over the store at `store`.

    `model`: a model folder or shipped preset name (None: the default model), or a callable that
    returns (model, tokenizer) in each replica. `keys`: a KeyTable, a {key: user} dict, or a keys
    file (None: LATENTMEM_API_KEYS). `server_options`: passed to `create_app` (model_name,
    max_body_bytes, max_parallel, max_inject_tokens, body_timeout, storage_options, ...).
    """
    _need_ray()
    from .store import open_store

    if isinstance(keys, dict):
        keys = KeyTable(keys)
    elif not isinstance(keys, KeyTable):
        keys = load_keys(keys)
    open_store(store, server_options.get("storage_options"))  # a bad URL fails here, not in every replica
    options = {**server_options, "threads": threads, "max_loaded": max_loaded}
    replica = serve.deployment(
        MemoryReplica, name="MemoryReplica", num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max(8, 2 * server_options.get("max_parallel", 4)),
    )  # fmt: skip
    router = serve.deployment(MemoryRouter, name="MemoryRouter", ray_actor_options={"num_cpus": 0})
    return router.bind(replica.bind(model, store, keys, options), keys)


def app(args: dict[str, str]):
    """`serve run latentmem.serving:app store=URL [replicas=N] [model=PRESET_OR_FOLDER] [keys=FILE] [threads=T]`."""
    args = dict(args)
    if "store" not in args:
        raise ValueError("serve run latentmem.serving:app needs store=URL (a folder or s3://bucket/prefix)")
    return build(
        args.pop("store"), model=args.pop("model", None), keys=args.pop("keys", None),
        replicas=int(args.pop("replicas", 2)), replica_cpus=float(args.pop("replica_cpus", 1)),
        max_loaded=int(args.pop("max_loaded", 64)), threads=int(args.pop("threads", 1)),
        **{key: int(value) if str(value).isdigit() else value for key, value in args.items()},
    )  # fmt: skip


def run(store: str, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, **options) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy, and serve until interrupted."""
    _need_ray()
    import time

    import ray

    ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(store, **options), name="latentmem", route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()

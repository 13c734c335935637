"""The HTTP API: OpenAI-compatible chat completions that read a per-user memory, and memory management.

Every `/v1/` request carries `Authorization: Bearer KEY`; the key names the user, and the user
plus an optional session (`session` in a JSON body, `?session=` or the `X-Latentmem-Session`
header; "default" if none) names the memory. Sessions are per user: another user's session names
are simply unknown, with the same 404 as a name nobody used.

    POST   /v1/chat/completions   OpenAI chat completions (stream or not) reading the memory
    POST   /v1/memory/inject      {"text", "source"?, "allow_short"?} -> the injection's record
    POST   /v1/memory/forget      {"source"} -> slots removed
    GET    /v1/memory             stats: writes, injections, sources with surviving slots
    DELETE /v1/memory             reset to the model's initial memory
    GET    /v1/memory/export      the state file (application/octet-stream)
    POST   /v1/memory/import      a state file as the body (refused if corrupt or for another model)
    GET    /v1/sessions, /v1/models, /health

One model serves every state: reads and writes of one state are serialised by the state's lock
(states.py), and reads and writes of different states share the model, up to a fixed number of
calls at once (gate.py; each call selects its own adapter), a long injection one chunk at a time.
By default the chats of all states run as rows of one continuously batched generation and the
writes of different states as one batch per chunk (batching.py; `batching=False`: each request
its own calls). Every request is checked whole before anything is written: a
refused request leaves the memory on disk as it was. Every failure is a JSON error (errors.py):
4xx for what the request got wrong (409 for a session whose file was found damaged: reset or
import replaces it), 507 for a full disk.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from ..chat import asked_ids, default_stops, generate_reply, memory_ids, memory_sources, prompt_ids
from ..models import model_name as default_model_name
from ..persistence import MemoryFileError, names_long_term_store, pool_bytes
from ..state import MemoryState
from ..store import ObjectStore, StoreError
from ..segments import text_chunks
from .auth import NAME_PATTERN, KeyTable
from .batching import ChatBatcher, CoreShare, WriteBatcher, inject_batched
from .errors import ApiError, LastResort, error_body, error_response
from .gate import ModelGate, inject_in_turns
from .guard import USER_KEY, Guard
from .schemas import IMPORT_BODY, SESSION_PARAMETERS, ChatRequest, ForgetRequest, InjectRequest
from ..journal import journal_path
from .states import DEFAULT_SESSION, DamagedState, ShuttingDown, StateRegistry, UnknownSession
from .store_registry import StaleState, StoreRegistry

logger = logging.getLogger("latentmem.server")
SESSION_HEADER = "x-latentmem-session"
# Merged adapter weights the server makes by default (create_app merge_adapters=None): two copies of
# SmolLM2-135M's LoRA layers take 734 MiB; an 8B model's would take tens of GB.
MERGE_LIMIT = 2 << 30


def create_app(
    model,
    tokenizer,
    *,
    data_dir: str | Path,
    api_keys: KeyTable | dict[str, str],
    model_name: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_import_bytes: int | None = None,
    max_new_tokens: int = 1024,
    default_max_tokens: int = 256,
    max_sessions_per_user: int = 1000,
    max_loaded_states: int = 64,
    max_parallel: int = 4,
    max_inject_tokens: int = 32768,
    body_timeout: float = 60.0,
    store: str | ObjectStore | None = None,
    storage_options: dict | None = None,
    batching: bool = True,
    journal: bool | None = None,
    batch_cores: int | None = None,
    chat_workers: int | None = None,
    merge_adapters: bool | None = None,
) -> FastAPI:
    """The server for one loaded model; memory states live under `data_dir`.

    `max_parallel`: model calls (reads and writes alike) that may run at once; more wait in line.
    `max_inject_tokens`: the longest text one inject request may write (413 over it).
    `body_timeout`: seconds a client has to send a request's whole body (408 after).
    `store`: keep the states in a shared object store (an fsspec URL such as `s3://bucket/prefix`,
    see store.py) instead of under `data_dir`, which then only caches them; commits are fenced, so
    several replicas may serve the same store (serving.py).
    `batching`: chat requests of all sessions run as rows of one continuously batched generation,
    and concurrent writes of different sessions as one batch per chunk (batching.py); False: every
    request runs its own model calls (up to `max_parallel` at once). `batch_cores`: the CPU cores batched
    steps share (`batching.CoreShare`: all to a step running alone; None: the process's setting);
    `chat_workers`: chat scheduler threads: the first decodes every row, the others prefill new
    requests and hand them over (None: 2 on CPU, 1 otherwise).
    `journal`: save each write as a record appended to `<state file>.journal` instead of rewriting the
    file (persistence.py; local `data_dir` only); exports still send one whole file. Default (None):
    on for states under `data_dir`, off with a `store` (its commits are whole files).
    `merge_adapters`: compute with both LoRA adapters merged into copies of their layers' weights
    (`AdapterSwitch.merge`: one matmul per layer instead of three; this changes `model` for every
    caller). Default (None): merged when the copies take at most `MERGE_LIMIT` bytes (otherwise
    only the model's own default, `MemoryLLM.set_fast_inference`); False: every call computes
    exactly as the release does (`set_fast_inference(False)`).
    """
    if journal and store is not None:
        raise ValueError("journal saves are for states under data_dir; a shared store commits whole files")
    journal = store is None if journal is None else journal
    if merge_adapters is False:
        model.set_fast_inference(False)
    elif merge_adapters or model.adapters.merged_bytes() <= MERGE_LIMIT:
        model.adapters.merge()
    keys = api_keys if isinstance(api_keys, KeyTable) else KeyTable(api_keys)
    if store is None:
        registry = StateRegistry(model, data_dir, max_loaded=max_loaded_states, journal=journal)
    else:
        registry = StoreRegistry(
            model, store, data_dir, max_loaded=max_loaded_states, storage_options=storage_options
        )
    gate = ModelGate(max_parallel)
    cores = CoreShare(batch_cores) if batching and batch_cores else None
    # On CPU a second chat scheduler prefills new prompts while the first decodes; on an
    # accelerator one batch per step is what fills it
    chat_workers = chat_workers or (2 if model.device.type == "cpu" else 1)
    chats = ChatBatcher(model, tokenizer, gate, cores=cores, workers=chat_workers) if batching else None
    writes = WriteBatcher(model, gate, cores=cores) if batching else None
    name = model_name or default_model_name(model)
    L, N, d = model.backbone.config.num_hidden_layers, model.config.memory_size, model.backbone.config.hidden_size
    # An uploaded state: the slots, per-slot ages and provenance, and room for the manifest.
    max_import_bytes = max_import_bytes or pool_bytes((L, N, d), model.dtype) + (16 << 20)
    context = getattr(model.backbone.config, "max_position_embeddings", None)
    tmp_dir = Path(data_dir) / "tmp"  # uploads being checked, exports of never-saved states
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for leftover in tmp_dir.iterdir():  # from a process that was killed
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        loaded = await run_in_threadpool(registry.close)  # waits for reads and writes in flight
        for batcher in (chats, writes):
            if batcher is not None:
                await run_in_threadpool(batcher.close)
        logger.warning("shut down: every write was saved; %d memory states were loaded", loaded)

    app = FastAPI(title="latentmem", lifespan=lifespan)
    app.state.model_name, app.state.registry = name, registry
    app.state.batchers = [b for b in (chats, writes) if b is not None]
    app.add_middleware(
        Guard, keys=keys, max_body_bytes=max_body_bytes, max_import_bytes=max_import_bytes, body_timeout=body_timeout
    )
    app.add_middleware(LastResort)  # outermost: it answers for whatever the rest raises

    @app.exception_handler(HTTPException)  # ours (ApiError) and the router's 404 / 405
    async def http_error(request: Request, err: HTTPException):
        code, param = getattr(err, "code", "http_error"), getattr(err, "param", None)
        return error_response(err.status_code, str(err.detail), code, param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()[:5]]
        message = "invalid request: " + "; ".join(problems)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            message += (" (the body is read as JSON only when sent with Content-Type: application/json; "
                        "with curl: -H 'Content-Type: application/json')")  # fmt: skip
        return error_response(400, message, "invalid_request")

    @app.exception_handler(UnknownSession)
    async def unknown_session(request: Request, err: UnknownSession):
        message = f"unknown session {err.args[0]!r}: a session exists once something was written into it"
        return error_response(404, message, "unknown_session", "session")

    @app.exception_handler(DamagedState)
    async def damaged_state(request: Request, err: DamagedState):
        message = (f"session {err.session!r} cannot be used: its memory file was found damaged ({err.reason}) and "
                   "was set aside, not replaced by an empty memory. To go on, reset it (DELETE /v1/memory) or "
                   "import a saved state into it (POST /v1/memory/import)")  # fmt: skip
        return error_response(409, message, "damaged_state", "session")

    @app.exception_handler(StaleState)
    async def stale_state(request: Request, err: StaleState):
        message = (f"session {err.session!r} was changed by another replica while this request ran; nothing was "
                   "written. Send the request again: it will read the newer memory")  # fmt: skip
        return error_response(409, message, "stale_state", "session")

    @app.exception_handler(StoreError)
    async def store_unavailable(request: Request, err: StoreError):
        logger.error("state store failed: %s", err)
        return error_response(503, "the memory store could not be reached; nothing was written", "store_unavailable")

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, err: ShuttingDown):
        return error_response(503, "the server is shutting down", "shutting_down")

    # --- helpers ---------------------------------------------------------------------------
    def user_of(request: Request) -> str:
        return request.scope[USER_KEY]

    def session_of(request: Request, in_body: str | None = None, *, must_exist: bool = True) -> str:
        given = {v for v in (request.headers.get(SESSION_HEADER), request.query_params.get("session"), in_body) if v}
        if len(given) > 1:
            raise ApiError(400, f"conflicting session ids {sorted(given)} (body, query and header)", param="session")
        session = given.pop() if given else DEFAULT_SESSION
        if not NAME_PATTERN.fullmatch(session):
            raise ApiError(400, f"session id must match {NAME_PATTERN.pattern}", param="session")
        if must_exist and not registry.exists(user_of(request), session):
            raise UnknownSession(session)
        return session

    def check_session_quota(user: str, session: str) -> None:
        if not registry.exists(user, session) and registry.count_sessions(user) >= max_sessions_per_user:
            message = f"session limit of {max_sessions_per_user} reached; reuse or reset a session"
            raise ApiError(403, message, "session_limit")

    def stats(session: str, state: MemoryState) -> dict:
        return {
            "object": "memory", "session": session, "model": name, "layers": state.num_layers,
            "slots_per_layer": state.num_slots, "initialized": state.initialized, "writes": state.write_count,
            "injections": len(state.injections), "sources": memory_sources(state),
        }  # fmt: skip

    # --- chat ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", openapi_extra=SESSION_PARAMETERS)
    def chat_completions(body: ChatRequest, request: Request):
        user, session = user_of(request), session_of(request, body.session)
        if body.model is not None and body.model != name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {name!r}",
                           "model_not_found", "model")  # fmt: skip
        for field, unsupported in (("n", body.n != 1), ("tools", body.tools), ("logprobs", body.logprobs)):
            if unsupported:
                raise ApiError(400, f"{field}: only n=1 without tools or logprobs is supported", param=field)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop strings", param="stop")
        stop += default_stops(tokenizer)
        max_new = body.max_completion_tokens or body.max_tokens or default_max_tokens
        if max_new > max_new_tokens:
            raise ApiError(
                400, f"max_tokens {max_new} is over this server's limit of {max_new_tokens}", param="max_tokens"
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = prompt_ids(tokenizer, messages)
        except TemplateError as err:
            raise ApiError(400, f"the model's chat template rejected these messages: {err}", param="messages") from err
        if context and 1 + N + len(ids) + max_new > context:
            message = (f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceed the model's context of "
                       f"{context - 1 - N} positions after memory")  # fmt: skip
            raise ApiError(400, message, "context_length_exceeded", "messages")
        options = {"max_new_tokens": max_new, "temperature": body.temperature, "top_p": body.top_p, "stop": stop,
                   "ranking_ids": asked_ids(tokenizer, messages)}  # fmt: skip
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:
            with registry.read(user, session):  # a session that cannot be read fails here, not after the 200
                pass
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_reply(user, session, ids, options, head, usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        with registry.read(user, session) as state:
            reply = generate(state, ids, **options)
        message = {"role": "assistant", "content": reply.text}
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(reply)}

    def generate(state: MemoryState, ids: list[int], **options):
        """One reply: a row of the shared batch, or alone on the model (up to `max_parallel` at once)."""
        if chats is not None:
            return chats.generate(state, ids, **options)
        with gate.hold("read"):
            return generate_reply(model, tokenizer, state, ids, **options)

    def stream_reply(user: str, session: str, ids: list[int], options: dict, head: dict, include_usage: bool):
        """Server-sent events: generation runs in its own thread, text deltas come through a queue."""
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def work():
            try:
                with registry.read(user, session) as state:
                    reply = generate(state, ids, on_text=lambda text: events.put(("text", text)), cancel=cancel,
                                     **options)  # fmt: skip
                events.put(("done", reply))
            except Exception as err:  # reported in the stream: the 200 status is already sent
                logger.exception("streamed generation failed")
                events.put(("error", err))

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def delta(content: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
            return event({**head, "object": "chat.completion.chunk", "choices": [choice]})

        threading.Thread(target=work, name="latentmem-generate", daemon=True).start()
        try:
            yield delta({"role": "assistant", "content": ""})
            while True:
                kind, value = events.get()
                if kind == "text":
                    yield delta({"content": value})
                    continue
                if kind == "done":
                    yield delta({}, value.finish_reason)
                    if include_usage:
                        yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)})
                else:
                    yield event(error_body(500, "generation failed", "generation_failed"))
                break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client went away (or all is sent): stop generating

    # --- memory ----------------------------------------------------------------------------
    @app.post("/v1/memory/inject", openapi_extra=SESSION_PARAMETERS)
    def inject(body: InjectRequest, request: Request):
        user, session = user_of(request), session_of(request, body.session, must_exist=False)
        if not body.text.strip():
            raise ApiError(400, "nothing to inject: text is empty", param="text")
        ids, minimum = memory_ids(tokenizer, body.text), model.config.min_context_tokens
        if len(ids) > max_inject_tokens:
            message = (f"text has {len(ids)} tokens, over this server's limit of {max_inject_tokens} per request; "
                       "send it in parts")  # fmt: skip
            raise ApiError(413, message, "too_many_tokens", "text")
        chunks = [torch.tensor(chunk, dtype=torch.long)  # lines and sentences kept whole where they fit
                  for chunk in text_chunks(lambda part: memory_ids(tokenizer, part), body.text,
                                           model.config.chunk_size, model.config.min_context_tokens)]  # fmt: skip
        if min(len(chunk) for chunk in chunks) < minimum and not body.allow_short:
            message = (f"text has {len(ids)} tokens; the model was trained on contexts of >= {minimum} "
                       "(send allow_short: true to inject anyway)")  # fmt: skip
            raise ApiError(400, message, "context_too_short", "text")
        check_session_quota(user, session)
        with registry.write(user, session) as slot:
            if writes is not None:
                result = inject_batched(model, writes, slot.state, chunks, body.source)
            else:
                result = inject_in_turns(model, gate, slot.state, chunks, body.source)
            record = slot.state.injections[result.injection_id]
        return {
            "object": "memory.injection", "session": session, "id": result.injection_id, "source": record.source,
            "timestamp": record.timestamp, "tokens": result.tokens, "chunks": result.chunks,
            "slots_written": result.slots_written,
        }  # fmt: skip

    @app.post("/v1/memory/forget", openapi_extra=SESSION_PARAMETERS)
    def forget(body: ForgetRequest, request: Request):
        user, session = user_of(request), session_of(request, body.session)
        with registry.write(user, session, create=False) as slot:
            if not slot.state.injections_from(body.source):
                message = f"no injections from source {body.source!r} in this session"
                raise ApiError(404, message, "unknown_source", "source")
            removed = model.forget(slot.state, source=body.source)
            result = stats(session, slot.state)
        return {**result, "removed_slots": removed}

    @app.get("/v1/memory", openapi_extra=SESSION_PARAMETERS)
    def get_memory(request: Request):
        user, session = user_of(request), session_of(request)
        with registry.read(user, session) as state:
            return stats(session, state)

    @app.delete("/v1/memory", openapi_extra=SESSION_PARAMETERS)
    def reset_memory(request: Request):
        user, session = user_of(request), session_of(request)
        state = registry.new_state()
        registry.replace(user, session, state)  # never reads the old file: a damaged one is replaced too
        return stats(session, state)

    @app.get("/v1/memory/export", openapi_extra=SESSION_PARAMETERS)
    def export_memory(request: Request):
        user, session = user_of(request), session_of(request)
        with registry.read(user, session) as state:
            path = registry.path(user, session)
            # the default session, never written, exports the empty state; a journaled file lacks the
            # writes in its journal, so the state is exported whole from memory (the same bytes a load gives)
            if not path.exists() or journal_path(path).exists():
                fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=".safetensors")
                os.close(fd)
                path = Path(tmp)
                state.save(path)
            file = open(path, "rb")  # noqa: SIM115 (opened under the lock; later saves replace the name, not it)
            if path.parent == tmp_dir:
                os.unlink(path)
        headers = {
            "Content-Disposition": f'attachment; filename="{session}.safetensors"',
            "Content-Length": str(os.fstat(file.fileno()).st_size),
        }
        return StreamingResponse(_read_chunks(file), media_type="application/octet-stream", headers=headers)

    @app.post("/v1/memory/import", openapi_extra={**SESSION_PARAMETERS, **IMPORT_BODY})
    async def import_memory(request: Request):
        user, session = user_of(request), session_of(request, must_exist=False)
        payload = await request.body()
        return await run_in_threadpool(install, user, session, payload)

    def install(user: str, session: str, payload: bytes) -> dict:
        """Check the upload whole (as this model's state: shape, dtype, every record), then install it.

        The upload is read from a private temporary folder, so a long-term store it names by
        generation id resolves there, where none exists: an upload can never bring in a folder.
        """
        upload = Path(tempfile.mkdtemp(dir=tmp_dir)) / "upload.safetensors"
        try:
            upload.write_bytes(payload)
            state = MemoryState.load(upload, model)
        except MemoryFileError as err:
            message = f"not a memory file for this model: {str(err).replace(str(upload), 'the upload')}"
            if names_long_term_store(upload):  # one answer, whatever it names: it tells nothing about the disk
                message = "an uploaded state cannot name a long-term memory store: import takes short-term memory only"
            raise ApiError(400, message, "bad_memory_file") from err
        finally:
            shutil.rmtree(upload.parent, ignore_errors=True)
        check_session_quota(user, session)
        registry.replace(user, session, state)
        return stats(session, state)

    @app.get("/v1/sessions")
    def list_sessions(request: Request):
        return {"object": "list", "data": registry.sessions(user_of(request))}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "latentmem"}]}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name}

    return app


def _usage(reply) -> dict:
    total = reply.prompt_tokens + reply.completion_tokens
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens, "total_tokens": total}


def _read_chunks(file, size: int = 1 << 20):
    with file:
        while block := file.read(size):
            yield block

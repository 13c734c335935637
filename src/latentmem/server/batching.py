"""Batched serving: chat requests of different users share one forward per step, writes share one per chunk.

Chats (`ChatBatcher`). Every request waiting for the model becomes a row of the next step; a step is
one forward of the backbone over all rows *packed* along one sequence: a row that just joined
contributes its whole prompt (its prefill), every other row its last token (a decode step). So the
matmuls (projections, MLP, LM head) run once per step for every row, while attention stays per row:
each row keeps its own cache, which starts as its memory's prefix ([bos ; STM], reading.py) and
grows by the row's own tokens, and each row's queries attend only to that cache (`packed_attention`).
Nothing is padded or copied: rows with different memories, memory sizes and prompt lengths sit side
by side. Requests join and leave between steps (continuous batching); a finished or cancelled row
leaves at once, its tokens streamed out as they come. A row's tokens are those `generate_reply`
produces alone (greedy: the same argmax of the same computation, up to float rounding of batched
matmuls). A focused read (`focused_writes`) starts from the prefix of its own best-ranked writes and
prefills packed like the rest; M+ reads that retrieve long-term slots into the whole pool (the
prefix depends on the prompt) prefill alone through the model's own forward and join the batch for
decoding.

Writes (`WriteBatcher`). An injection is cut into chunks (writing.py); each chunk of each state is
a job, and the jobs waiting at once are computed as one padded batch (`compute_slots_batch`, as
training's `inject_batch` does), then stored per state by the thread holding that state's lock.

The packed attention is a registered attention implementation that forwards to the model's own one
unless the calling thread is inside a packed step (a context variable), so other calls (unbatched
writes, the CLI) are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..chat import Reply, TextDeltas, _eos_ids
from ..positions import prompt_start
from ..writing import InjectionResult, compute_slots_batch, store_slots
from .gate import ModelGate

logger = logging.getLogger("latentmem.server")

PACKED = "latentmem_packed_"  # + the model's own attention implementation
_STEP: contextvars.ContextVar[_PackedStep | None] = contextvars.ContextVar("latentmem_packed_step", default=None)


# --- packed attention --------------------------------------------------------------------------
class _PackedStep:
    """The rows of one packed forward: row r's tokens are `[bounds[r], bounds[r+1])` of the sequence."""

    def __init__(self, caches: list, bounds: list[int]):
        self.caches, self.bounds = caches, bounds

    def attend(self, module, query, key, value, scaling) -> torch.Tensor:
        """query `[1, H, S, hd]`, key/value `[1, kv, S, hd]` (this step's tokens) -> `[1, S, H, hd]`."""
        heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[3]
        groups = heads // kv_heads
        outs = []
        for r, cache in enumerate(self.caches):
            s, e = self.bounds[r], self.bounds[r + 1]
            keys, values = cache.update(key[:, :, s:e], value[:, :, s:e], module.layer_idx)
            n, total = e - s, keys.shape[2]
            # query heads sharing a key/value head are folded into its rows: keys/values used as they are
            q = query[:, :, s:e].reshape(1, kv_heads, groups * n, head_dim)
            mask = None
            if n > 1:  # a prompt: token i sees the cache up to itself
                seen = torch.arange(total, device=q.device)[None] <= torch.arange(n, device=q.device)[:, None] + (
                    total - n
                )
                mask = seen.repeat(groups, 1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
            outs.append(out.reshape(1, heads, n, head_dim))
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def install_packed_attention(model) -> None:
    """Let `model`'s backbone run packed steps: its attention implementation becomes one that does
    the packed attention inside a packed step and the model's own attention everywhere else."""
    config = model.backbone.config
    own = config._attn_implementation
    if own.startswith(PACKED):
        return
    name = PACKED + own

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        step = _STEP.get()
        if step is not None:
            return step.attend(module, query, key, value, scaling), None
        fn = ALL_ATTENTION_FUNCTIONS.get(own) or sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
    model.backbone.set_attn_implementation(name)


# --- chats ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class ChatRow:
    """One chat request in the batch."""

    state: object
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    streamer: TextDeltas
    cancel: threading.Event | None
    tokens: list[int] = field(default_factory=list)  # generated so far
    cache: DynamicCache | None = None
    position: int = 0  # RoPE position of the next token fed
    previous: int | None = None  # the token before the next one fed (token shift)
    reply: Reply | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    role: str = "read"  # the adapter its forwards run with ("base": a focused model reading nothing)
    ranking: list[int] | None = None  # the tokens a focused read ranks writes by (default: the prompt)

    @property
    def ranked_by(self) -> list[int]:
        return self.ranking or self.prompt


class CoreShare:
    """The CPU cores batched steps share: a step that runs alone takes all of them, n steps
    running at once (chat and write schedulers) `cores // n` each, at least one (torch keeps its
    thread count per thread, so request threads keep theirs). On 2 cores a lone 880-row step runs
    1.8x faster on both, while two steps of two threads each gain nothing over one each."""

    def __init__(self, cores: int):
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        self.cores = cores
        self._running = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def step(self):
        with self._lock:
            self._running += 1
            threads = max(1, self.cores // self._running)
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            with self._lock:
                self._running -= 1


class _Scheduler:
    """A queue drained by `workers` lazily started scheduler threads (`_loop`), shared by both batchers."""

    thread_name = "batcher"  # in errors and the thread's name

    def __init__(self, cores: CoreShare | None = None, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.cores = cores  # how many torch CPU threads each step takes (None: the process's setting)
        self.workers = workers
        self._pending: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads_started: list[threading.Thread] = []

    def _enqueue(self, item) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.thread_name} is closed")
            self._pending.append(item)
            if not self._threads_started:
                for i in range(self.workers):
                    name = f"latentmem {self.thread_name}" + (f" {i}" if self.workers > 1 else "")
                    self._threads_started.append(
                        threading.Thread(target=self._loop, args=(i,), name=name, daemon=True)
                    )
                    self._threads_started[-1].start()
            self._cond.notify_all()

    def close(self) -> None:
        """Finish what is in flight, then stop the scheduler threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._threads_started)
        for thread in threads:
            thread.join()

    def _loop(self, worker: int) -> None:
        raise NotImplementedError

    def _cores(self):
        return self.cores.step() if self.cores is not None else _nothing()


class ChatBatcher(_Scheduler):
    """Runs every chat request as a row of one shared, continuously batched generation loop.

    `generate` has `generate_reply`'s arguments and result; it blocks until the reply is complete
    (text deltas go to `on_text` meanwhile). A scheduler thread runs the steps, holding `gate` for
    each step, so the model's other users (writes) still take turns with it; with `workers` > 1,
    the others prefill new requests and hand them to the first, which decodes every row (`_loop`).
    """

    thread_name = "chat batcher"

    def __init__(self, model, tokenizer, gate: ModelGate | None = None, max_rows: int = 64,
                 cores: CoreShare | None = None, workers: int = 1):  # fmt: skip
        super().__init__(cores, workers)
        install_packed_attention(model)
        self.model, self.tokenizer, self.gate, self.max_rows = model, tokenizer, gate, max_rows
        self.eos = set(_eos_ids(model, tokenizer))
        self.steps = 0  # packed forwards run (tests and benchmarks read these)
        self.max_batch = 0
        self._prefilled: deque[ChatRow] = deque()  # prefilled by a worker > 0, for worker 0 to decode
        self._prefilling = 0  # prefill steps running (worker 0 outlives them when closing)
        self._decoding = False  # worker 0 is running steps: new requests go to the other workers

    def generate(
        self,
        memory,
        ids: Sequence[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        ranking_ids: Sequence[int] | None = None,
    ) -> Reply:
        row = self.submit(memory, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          stop=stop, on_text=on_text, cancel=cancel, ranking_ids=ranking_ids)  # fmt: skip
        return self.wait(row)

    def submit(self, memory, ids: Sequence[int], *, max_new_tokens=128, temperature=0.0, top_p=1.0, stop=(),
               on_text=None, cancel=None, ranking_ids=None) -> ChatRow:  # fmt: skip
        """Queue a request; it joins the batch at the next step (`wait` for its reply)."""
        self.model.check_state(memory)
        if not ids:
            raise ValueError("an empty prompt")
        streamer = TextDeltas(self.tokenizer, on_text, stop)
        row = ChatRow(memory, list(ids), max_new_tokens, temperature, top_p, streamer, cancel,
                      ranking=list(ranking_ids) if ranking_ids else None)  # fmt: skip
        self._enqueue(row)
        return row

    @staticmethod
    def wait(row: ChatRow) -> Reply:
        row.done.wait()
        if row.error is not None:
            raise row.error
        return row.reply

    # -- the scheduler --
    # Worker 0 decodes every row in one batch per step: a decode step reads all the weights
    # whatever its rows, so splitting rows across workers would read them once per worker. Other
    # workers only prefill: they take new requests, run their prompts (compute-bound, so it
    # overlaps a decode step well on a second core) and hand the rows over (`_prefilled`). Worker 0
    # also takes new requests itself when it has nothing else to run (or is the only worker).
    def _loop(self, worker: int) -> None:
        if worker:
            return self._prefill_loop()
        active: list[ChatRow] = []
        while True:
            with self._cond:
                while not (self._pending or self._prefilled or active or self._closed):
                    self._decoding = False
                    self._cond.wait()
                if not (self._pending or self._prefilled or active or self._prefilling):
                    return  # closed and idle
                while self._prefilled and len(active) < self.max_rows:
                    active.append(self._prefilled.popleft())
                joining = []  # new requests join the decode steps when no other worker prefills them
                room = self.max_rows - len(active) if self.workers == 1 or not active else 0
                while self._pending and len(joining) < room:
                    joining.append(self._pending.popleft())
                self._decoding = bool(active or joining)
                if not self._decoding:  # closed; a prefill still running hands its rows over
                    self._cond.wait()
                    continue
            active = self._run(active, joining)

    def _prefill_loop(self) -> None:
        while True:
            with self._cond:  # a request arriving while worker 0 is idle is its own: no hand-over
                while not (self._pending and self._decoding) and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                joining = []
                while self._pending and len(joining) < self.max_rows:
                    joining.append(self._pending.popleft())
                self._prefilling += 1
            prefilled = []
            try:
                prefilled = self._run([], joining)
            finally:
                with self._cond:
                    self._prefilling -= 1
                    self._prefilled.extend(prefilled)
                    self._cond.notify_all()

    def _run(self, active: list[ChatRow], joining: list[ChatRow]) -> list[ChatRow]:
        """`_step`, failing every row in it if the step fails (the rows going on, or none)."""
        try:
            return self._step(active, joining)
        except BaseException as err:
            logger.exception("batched generation step failed")
            for row in active + joining:
                self._finish(row, error=err)
            return []

    def _step(self, active: list[ChatRow], joining: list[ChatRow]) -> list[ChatRow]:
        """One packed forward: prefill of `joining`, one decode step of `active`. Returns the rows going on."""
        model = self.model
        hold = self.gate.hold("read") if self.gate is not None else _nothing()
        with hold, self._cores(), torch.inference_mode(), model.adapters.use("read"):
            # rows whose prefix depends on the prompt (M+ retrieval) prefill alone, through the model
            alone, packed = [], []
            for row in joining:  # a request that cannot start fails alone
                try:
                    # a focused read ranks the writes once, for the base-model rule and its prefix
                    focused = model.focuses(row.state)
                    ranked = model.rank_writes_for(row.state, torch.tensor(row.ranked_by)) if focused else None
                    base = model.reads_without_memory(row.state, ranked=ranked)
                    if _retrieves(model, row.state) and not (base or focused):
                        self._advance(row, self._prefill_alone(row))
                        alone.append(row)
                    else:
                        self._seed(row, base, ranked)
                        packed.append(row)
                except Exception as err:  # noqa: BLE001
                    self._finish(row, error=err)
            rows = packed + active
            for role in ("read", "base"):  # one packed forward per adapter in use
                group = [row for row in rows if row.role == role]
                if not group:
                    continue
                with model.adapters.use(role):
                    logits = self._forward(group, [row.prompt if not row.tokens else [row.tokens[-1]] for row in group])
                for row, row_logits in zip(group, logits):
                    self._advance(row, row_logits)
        self.steps += 1
        self.max_batch = max(self.max_batch, len(rows) + len(alone))
        going_on = []
        for row in alone + rows:
            if self._ended(row):
                self._finish(row)
            else:
                going_on.append(row)
        return going_on

    def _seed(self, row: ChatRow, base: bool, ranked=None) -> None:
        """The row's cache starts as its memory's prefix; the prompt starts at the prefix's prompt
        position. A focused read (`ranked`: its writes, best first) starts with the prefix of its
        own writes' slots, so its prompt is prefilled in the packed step like any other. A row that
        reads nothing (`base`: a focused model's empty memory, or no write sharing a token with the
        prompt) has no prefix: it decodes as the base model."""
        model = self.model
        row.cache = DynamicCache(config=model.backbone.config)
        if base:
            row.role, row.position = "base", 0
            return
        prefix = model.memory_prefix(row.state) if ranked is None else model.focused_prefix(row.state, ranked)
        prefix.seed(row.cache, 1)
        row.position = prefix.prompt_start

    def _prefill_alone(self, row: ChatRow) -> torch.Tensor:
        model = self.model
        ids = torch.tensor([row.prompt], dtype=torch.long, device=model.device)
        ranking = torch.tensor([row.ranked_by], dtype=torch.long, device=model.device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), memory=row.state, use_cache=True,
                    logits_to_keep=1, ranking_ids=ranking)  # fmt: skip
        row.cache = out.cache
        # as M+ numbers later steps: the prompt starts after [bos ; retrieved ; STM] (or the focused pool)
        length = model.read_prefix_length(row.state)
        row.position = prompt_start(model.config.memory_positions, length, model.config.num_tokens) + len(row.prompt)
        row.previous = row.prompt[-1]
        return out.logits[0, -1]

    def _forward(self, rows: list[ChatRow], feeds: list[list[int]]) -> torch.Tensor:
        """Logits `[rows, vocab]` at each row's last fed token, all rows in one packed forward."""
        model, device = self.model, self.model.device
        embeds, positions, bounds = [], [], [0]
        for row, feed in zip(rows, feeds):
            ids = torch.tensor([feed], dtype=torch.long, device=device)
            previous = None if row.previous is None else torch.tensor([row.previous], device=device)
            embeds.append(model.embed(ids, previous))
            positions.append(torch.arange(row.position, row.position + len(feed), device=device))
            bounds.append(bounds[-1] + len(feed))
            row.position += len(feed)
            row.previous = feed[-1]
        token = _STEP.set(_PackedStep([row.cache for row in rows], bounds))
        try:
            hidden = model.decoder(
                inputs_embeds=torch.cat(embeds, dim=1), position_ids=torch.cat(positions)[None],
                attention_mask=_NO_MASK, use_cache=False,
            ).last_hidden_state  # fmt: skip
        finally:
            _STEP.reset(token)
        last = torch.tensor([b - 1 for b in bounds[1:]], device=device)
        return model.get_output_embeddings()(hidden[0, last]).float()

    def _advance(self, row: ChatRow, logits: torch.Tensor) -> None:
        if row.temperature == 0:
            token = int(logits.argmax())
        else:
            token = _sample(logits, row.temperature, row.top_p, self.model.generation_config.top_k)
        if not row.tokens:
            row.streamer.put(torch.tensor(row.prompt))  # the streamer skips the prompt, as from generate
        row.tokens.append(token)
        row.streamer.put(torch.tensor([token]))

    def _ended(self, row: ChatRow) -> bool:
        return (
            row.tokens[-1] in self.eos
            or len(row.tokens) >= row.max_new_tokens
            or row.streamer.stopped
            or bool(row.cancel and row.cancel.is_set())
        )

    def _finish(self, row: ChatRow, error: BaseException | None = None) -> None:
        if row.done.is_set():
            return
        row.cache = None  # the memory prefix's buffers are free for the next read
        if error is None:
            try:
                row.streamer.end()
                ended = row.streamer.stopped or row.tokens[-1] in self.eos
                reason = "stop" if ended or len(row.tokens) < row.max_new_tokens else "length"
                row.reply = Reply(row.streamer.text, len(row.prompt), len(row.tokens), reason)
            except Exception as err:  # noqa: BLE001 (e.g. a streaming callback that failed)
                error = err
        row.error = error
        row.done.set()


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # 4-D: taken as prepared, never built (the rows mask themselves)


def _retrieves(model, state) -> bool:
    """Whether a read of `state` retrieves or focuses (M+): then its prefix depends on the prompt."""
    depends = getattr(model, "reads_depend_on_prompt", None)
    return depends is not None and depends(state)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int | None) -> int:
    scores = logits / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- writes ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _WriteJob:
    state: object
    chunk: torch.Tensor
    slots: torch.Tensor | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class WriteBatcher(_Scheduler):
    """Computes the new slots of chunks of different states, those waiting at once in one batch.

    `compute(state, chunk)` blocks until the chunk's slots `[L, K, d]` are computed; the caller
    (holding the state's lock) stores them. A state has at most one chunk in a batch.
    """

    thread_name = "write batcher"

    def __init__(self, model, gate: ModelGate | None = None, max_rows: int = 16, cores: CoreShare | None = None):
        super().__init__(cores)
        self.model, self.gate, self.max_rows = model, gate, max_rows
        self.batches = 0
        self.max_batch = 0

    def compute(self, state, chunk: torch.Tensor) -> torch.Tensor:
        job = _WriteJob(state, chunk)
        self._enqueue(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.slots

    def _loop(self, worker: int) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                jobs, later, seen = [], deque(), set()
                while self._pending and len(jobs) < self.max_rows:
                    job = self._pending.popleft()
                    (later if id(job.state) in seen else jobs).append(job)
                    seen.add(id(job.state))
                self._pending.extendleft(reversed(later))
            try:
                hold = self.gate.hold("write") if self.gate is not None else _nothing()
                with hold, self._cores(), torch.no_grad():
                    slots = compute_slots_batch(self.model, [j.state for j in jobs], [j.chunk for j in jobs])
                for job, new in zip(jobs, slots):
                    job.slots = new
            except BaseException as err:  # noqa: BLE001 (reported to every caller of the batch)
                for job in jobs:
                    job.error = err
            self.batches += 1
            self.max_batch = max(self.max_batch, len(jobs))
            for job in jobs:
                job.done.set()


@torch.no_grad()
def inject_batched(model, batcher: WriteBatcher, state, chunks: list[torch.Tensor], source: str) -> InjectionResult:
    """`inject_in_turns` (gate.py) with each chunk's slots computed in a batch with other states' chunks."""
    model.check_state(state)
    tokens = sum(chunk.numel() for chunk in chunks)
    record = state.record_injection(source, tokens)
    slots = 0
    for chunk in chunks:
        new = batcher.compute(state, chunk.to(model.device))
        store_slots(model, state, new, record.id, chunk)  # the written ids: M+ may index them (`note_write`)
        slots += new.shape[1]
    return InjectionResult(record.id, len(chunks), tokens, slots)

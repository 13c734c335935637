"""Chat with a model that remembers: a sliding window of recent turns, older turns in memory.

The prompt holds the most recent turns (rendered with the tokenizer's chat template, which places
BOS itself) up to `window_tokens`; the memory prefix sits in front of it. Whole exchanges that
leave the window are written into memory as role-tagged text ("User: ...\\nAssistant: ..."),
without BOS (as MemoryLLM writes), in chunks of `min_chunk_tokens..max_chunk_tokens` tokens: shorter leftovers
wait for the next exchange to join them. Closing the session writes everything not yet in memory
(the window too) and saves the memory file, so a later session with the same file starts from it.

`generate_reply` (one reply to a list of messages, streamed as text deltas) and
`memory_sources` (what each source still holds) are shared with the CLI and the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .modeling import MemoryLLM
from .state import MemoryState
from .segments import text_chunks

ROLE_TAGS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


# A memory model reads a fact worse behind a long window: with 1,024 tokens of recent turns in the
# prompt the shipped model answered 10 of 40 facts told ~80 turns earlier, with 256 tokens 25 of 40
# (`latentmem eval chat`, docs/experiments.md). What leaves the window is still in memory.
DEFAULT_WINDOW_TOKENS = 256


@dataclass
class Turn:
    role: str
    content: str


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


# --- prompts and memory text --------------------------------------------------------------------
def prompt_ids(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template (BOS included by it).

    Special tokens typed inside a message are encoded as plain text, so a user cannot forge turns.
    """
    encoded = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, sanitize_control_tokens=True
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def default_stops(tokenizer) -> list[str]:
    """Stop strings a reply needs besides end-of-turn tokens: a plain transcript has none, so the
    model's next "User:" line ends the reply."""
    from .models import PLAIN_CHAT_TEMPLATE

    return ["\nUser:"] if tokenizer.chat_template == PLAIN_CHAT_TEMPLATE else []


def role_tagged(turns: Sequence[Turn]) -> str:
    """Turns as plain text for memory: one "Role: content" line per turn."""
    return "\n".join(f"{ROLE_TAGS.get(t.role, t.role.title())}: {t.content}" for t in turns)


def memory_ids(tokenizer, text: str) -> list[int]:
    """A context's token ids for writing: no BOS (as MemoryLLM writes), special tokens in the text kept as text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def memory_sources(state: MemoryState) -> list[dict]:
    """Per source label: injections, tokens written, slots still surviving (all layers) and when."""
    surviving = state.surviving_slots()
    rows: dict[str, dict] = {}
    for record in state.injections.values():
        row = rows.setdefault(
            record.source,
            {"source": record.source, "injections": 0, "tokens": 0, "surviving_slots": 0,
             "first_written": record.timestamp, "last_written": record.timestamp},
        )  # fmt: skip
        row["injections"] += 1
        row["tokens"] += record.tokens
        row["surviving_slots"] += surviving.get(record.id, 0)
        row["first_written"] = min(row["first_written"], record.timestamp)
        row["last_written"] = max(row["last_written"], record.timestamp)
    return sorted(rows.values(), key=lambda r: r["first_written"])


def format_sources(state: MemoryState) -> str:
    """`memory_sources` as a table; slots are shown per layer (surviving / layers)."""
    rows = memory_sources(state)
    L, N, _ = state.shape
    head = f"{state.write_count} writes, {len(state.injections)} injections; pool {N} slots x {L} layers"
    if not rows:
        return head + "\n(no injections)"
    width = max(12, *(len(r["source"]) for r in rows))
    lines = [head, f"{'source':<{width}}  injections  tokens  slots/layer  written"]
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_written"]))
        lines.append(
            f"{r['source'] or '(none)':<{width}}  {r['injections']:>10}  {r['tokens']:>6}  "
            f"{r['surviving_slots'] / L:>11.1f}  {when}"
        )
    return "\n".join(lines)


# --- generation ---------------------------------------------------------------------------------
class TextDeltas(BaseStreamer):
    """Receives generated ids from `generate` and hands on the new text as it becomes final.

    Text is held back while it ends in an incomplete character or might still grow into a stop
    string, so what was handed on never has to be taken back; `stopped` turns true once a stop
    string appeared (a stopping criterion then ends generation).
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None, stop: Sequence[str] = ()):
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands over the prompt first
            self._prompt_seen = True
            return
        self.ids.extend(value.view(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    @property
    def text(self) -> str:
        """The reply so far, cut before the first stop string."""
        return self._until_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _until_stop(self, text: str) -> str:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(cuts)] if cuts else text

    def _emit(self, final: bool) -> None:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = self._until_stop(full)
        self.stopped = len(text) < len(full)
        end = len(text)
        if not final and not self.stopped:
            end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character: wait for its other bytes
            # A tail that could still grow into a stop string: wait.
            end -= max((k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
        if end > self.sent and self.on_text is not None:
            self.on_text(text[self.sent : end])
        self.sent = max(self.sent, end)


class _Until(StoppingCriteria):
    def __init__(self, done: Callable[[], bool]):
        self.done = done

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.done(), dtype=torch.bool, device=input_ids.device)


def generate_reply(
    model: MemoryLLM,
    tokenizer,
    memory: MemoryState | None,
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
    """Generate one reply to the prompt `ids`, reading `memory`; `temperature=0` is greedy.

    `ranking_ids`: the tokens a focused read ranks writes by (`asked_ids`: the message asked), when
    the prompt holds more than it (earlier turns); default the whole prompt."""
    streamer = TextDeltas(tokenizer, on_text, stop)
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    greedy = temperature == 0
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    done = StoppingCriteriaList([_Until(lambda: streamer.stopped or bool(cancel and cancel.is_set()))])
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), memory=memory,
            max_new_tokens=max_new_tokens, streamer=streamer, eos_token_id=eos or None, pad_token_id=pad,
            stopping_criteria=done, **sampling, **_ranking(ranking_ids, model.device),
        )  # fmt: skip
    new = out[0, input_ids.shape[1] :].tolist()
    ended = streamer.stopped or (bool(new) and new[-1] in eos)
    return Reply(streamer.text, len(ids), len(new), "stop" if ended or len(new) < max_new_tokens else "length")


def asked_ids(tokenizer, messages: Sequence[dict]) -> list[int] | None:
    """Token ids of the last user message: what a focused read ranks writes by in a chat (the other
    turns in the prompt are what the window already shows); None when there is no user message."""
    asked = [m["content"] for m in messages if m.get("role") == "user"]
    return tokenizer(asked[-1], add_special_tokens=False).input_ids if asked and asked[-1] else None


def _ranking(ranking_ids: Sequence[int] | None, device) -> dict:
    if not ranking_ids:
        return {}
    return {"ranking_ids": torch.tensor([list(ranking_ids)], dtype=torch.long, device=device)}


def _eos_ids(model: MemoryLLM, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# --- the session --------------------------------------------------------------------------------
@dataclass
class ChatSession:
    """One conversation: recent turns in the prompt, older ones written into `memory`.

    Args:
        memory_path: where the memory is saved after every write and on `close` (None: not saved).
        window_tokens: the most tokens the recent turns may take in the prompt.
        min_chunk_tokens / max_chunk_tokens: bounds on one write (default: the model's
            `min_context_tokens` and `chunk_size`).
        source: the provenance label of this session's writes (default "chat:<start time>").
    """

    model: MemoryLLM
    tokenizer: object
    memory: MemoryState
    memory_path: Path | None = None
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    min_chunk_tokens: int | None = None
    max_chunk_tokens: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    system: str | None = None
    source: str = field(default_factory=lambda: time.strftime("chat:%Y-%m-%dT%H:%M:%S"))
    window: list[Turn] = field(default_factory=list)
    pending: list[Turn] = field(default_factory=list)  # left the window, not yet written (too short)

    def __post_init__(self) -> None:
        cfg = self.model.config
        self.min_chunk_tokens = self.min_chunk_tokens or cfg.min_context_tokens
        self.max_chunk_tokens = self.max_chunk_tokens or cfg.chunk_size
        if not 0 < 2 * self.min_chunk_tokens <= self.max_chunk_tokens:
            # A text just over max splits into two halves: both must still reach min.
            raise ValueError(
                f"chunk lengths must satisfy 0 < 2 * min ({self.min_chunk_tokens}) <= max ({self.max_chunk_tokens})"
            )
        if self.window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {self.window_tokens}")

    def messages(self, turns: Sequence[Turn] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": t.role, "content": t.content} for t in (self.window if turns is None else turns)]

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Add a user turn, answer it from the window and memory, then slide the window."""
        self.window.append(Turn("user", text))
        self._slide(keep=1)
        messages = self.messages()
        reply = generate_reply(
            self.model, self.tokenizer, self.memory, prompt_ids(self.tokenizer, messages),
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, on_text=on_text,
            stop=default_stops(self.tokenizer), ranking_ids=asked_ids(self.tokenizer, messages),
        )  # fmt: skip
        self.window.append(Turn("assistant", reply.text.strip()))
        self._slide(keep=2)
        return reply

    def add_exchange(self, user: str, assistant: str) -> None:
        """Record an exchange that was not generated here (a scripted or imported one) and slide the
        window as `send` does: what leaves it is written into memory."""
        self.window.append(Turn("user", user))
        self._slide(keep=1)
        self.window.append(Turn("assistant", assistant.strip()))
        self._slide(keep=2)

    def remember(self, text: str, source: str | None = None) -> list[int]:
        """Write a text straight into memory (the `/remember` command). Returns the injection ids."""
        return self._write(text, source or self.source, allow_short=True)

    def forget(self, source: str) -> int:
        """Remove what `source` wrote (`/forget`); its turns still waiting to be written are dropped too."""
        if not self.memory.injections_from(source):
            known = sorted({i.source for i in self.memory.injections.values()})
            raise KeyError(f"no injections from source {source!r}; sources in memory: {known}")
        removed = self.model.forget(self.memory, source=source)
        if source == self.source:
            self.pending.clear()
        self._save()
        return removed

    def close(self) -> list[int]:
        """End the session: everything not yet in memory is written (short leftovers allowed), then saved."""
        turns, self.pending, self.window = self.pending + self.window, [], []
        text = role_tagged(turns) if turns else ""
        written = self._write(text, self.source, allow_short=True) if text.strip() else []
        self._save()
        return written

    # --- internals -------------------------------------------------------------------------
    def _tokens(self, turns: Sequence[Turn]) -> int:
        return len(prompt_ids(self.tokenizer, self.messages(turns), add_generation_prompt=False))

    def _slide(self, keep: int) -> None:
        """Move whole exchanges out of the window (oldest first) until it fits, keeping the newest `keep` turns."""
        while len(self.window) > keep and self._tokens(self.window) > self.window_tokens:
            leaving = [self.window.pop(0)]
            while self.window and len(self.window) > keep and self.window[0].role != "user":
                leaving.append(self.window.pop(0))  # the rest of the exchange goes with it
            self.pending.extend(leaving)
        self._write_pending()

    def _write_pending(self) -> None:
        if not self.pending:
            return
        text = role_tagged(self.pending)
        if len(memory_ids(self.tokenizer, text)) < self.min_chunk_tokens:
            return  # too short to write on its own: wait for more
        self.pending = []
        self._write(text, self.source, allow_short=False)

    def _write(self, text: str, source: str, *, allow_short: bool) -> list[int]:
        """Write `text` in chunks that keep turns and sentences whole (`segments.text_chunks`)."""
        written = []
        chunks = text_chunks(lambda part: memory_ids(self.tokenizer, part), text, self.max_chunk_tokens,
                             self.min_chunk_tokens)  # fmt: skip
        for chunk in chunks:
            ids = torch.tensor(chunk, dtype=torch.long)
            result = self.model.inject(self.memory, input_ids=ids, source=source, allow_short=allow_short)
            written.append(result.injection_id)
        self._save()
        return written

    def _save(self) -> None:
        if self.memory_path is not None:
            self.memory.save(self.memory_path)


def open_memory(model: MemoryLLM, path: Path | None, seed: int = 0) -> MemoryState:
    """The memory saved at `path` (checked against `model`), or a fresh one if there is none yet."""
    if path is not None and Path(path).exists():
        return MemoryState.load(path, model)
    return model.initial_memory(seed=seed)

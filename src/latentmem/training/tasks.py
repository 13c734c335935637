"""Where episodes come from: synthetic facts with filler distractors, or segments of a corpus.

A task turns text into `Episode`s (token ids + labels) and owns its random generators, so its
`state_dict` makes a resumed run draw exactly the episodes the interrupted one would have.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

import torch

from ..data.filler import FillerStream
from ..data.general import GeneralPrompts
from ..data.notes import NoteGenerator
from ..data.synthetic import FactGenerator, answer_text, context_prompt, question_prompt
from ..data.wrapping import WriteWrapper
from .objective import IGNORE, Episode


# Unrelated episodes: the share that continue English text, and its length in words. Short, so that
# a text target's many scored tokens do not outweigh the answers of the episodes beside it.
UNRELATED_TEXT = 0.3
UNRELATED_TEXT_WORDS = (10, 20)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def qa_ids(tokenizer, qa) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, answer ids): the question in the model's prompt format; the answer, then the end token."""
    prompt = question_prompt(qa.question, tokenizer)
    answer = torch.cat([_ids(tokenizer, answer_text(prompt, qa.answer)), torch.tensor([tokenizer.eos_token_id])])
    return _ids(tokenizer, prompt), answer


class FactTask:
    """Episodes: a fact document among 0..m-1 filler passages; target = a question and its answer.

    The answer (and the end-of-text token after it) is scored; with `score_question`, the question
    too: its entity name can only be predicted by copying it from memory, which teaches the read
    path to copy long before it can answer. With probability `copy_fraction` the target is the
    fact document itself (every token scored): dense practice in copying from memory, which a model
    trained from scratch needs before question answering can work. Distractors for retention steps
    are filler passages.
    """

    def __init__(
        self,
        tokenizer,
        filler: list[str],
        seed: int = 0,
        filler_words: tuple[int, int] = (20, 45),
        facts_per_document: tuple[int, int] = (1, 3),
        score_question: bool = False,
        copy_fraction: float = 0.0,
        notes_fraction: float = 0.0,
        base_reply: Callable[[torch.Tensor], torch.Tensor] | None = None,
        wrap_fraction: float = 0.0,
        max_write_tokens: int = 64,
    ):
        self.tokenizer = tokenizer
        # prompt ids -> the base model's reply ids without memory (`BaseReplies`), for unrelated episodes
        self.base_reply = base_reply
        self.general = GeneralPrompts(seed + 4)
        self.facts = FactGenerator(seed, "train", facts_per_document)
        # everyday notes and chat lines (35 relations, many phrasings) next to the synthetic biographies
        self.notes = NoteGenerator(seed + 3, "train", facts_per_document)
        self.notes_fraction = notes_fraction
        self.filler = FillerStream(filler, seed + 1)
        self.rng = random.Random(seed + 2)
        self.filler_words = filler_words
        self.score_question = score_question
        self.copy_fraction = copy_fraction
        # a share of the fact documents written inside a chat exchange or prose (`data/wrapping.py`)
        self.wrap_fraction = wrap_fraction
        self.wrapper = WriteWrapper(lambda text: len(_ids(tokenizer, text)), self.filler.passage, max_write_tokens,
                                    seed + 5)  # fmt: skip

    def qa_target(self, qa) -> tuple[torch.Tensor, torch.Tensor]:
        """A question in the model's prompt format, then its answer and the end token."""
        prompt_ids, answer_ids = qa_ids(self.tokenizer, qa)
        target = torch.cat([prompt_ids, answer_ids])
        labels = torch.cat([prompt_ids if self.score_question else torch.full_like(prompt_ids, IGNORE), answer_ids])
        return target, labels

    def distractor(self) -> torch.Tensor:
        return _ids(self.tokenizer, self.filler.passage(*self.filler_words))

    def _copy(self, copy_fraction: float | None) -> bool:
        return self.rng.random() < (self.copy_fraction if copy_fraction is None else copy_fraction)

    def in_context_episode(self, copy_fraction: float | None = None) -> Episode:
        """The fact document, then one of its questions and the answer, as plain text (no memory).

        Every token is scored: the document as language modelling, the question and the answer as
        reading comprehension in context, the skill that reading from memory then reuses. With
        probability `copy_fraction` (default: the task's) the document is followed by itself instead
        (copying in context).
        """
        document = self.document()
        qa = self.rng.choice(document.qa)
        text = _ids(self.tokenizer, document.text + "\n")
        if self._copy(copy_fraction):  # the document twice: dense practice in copying
            target, relation = torch.cat([text, text, torch.tensor([self.tokenizer.eos_token_id])]), "copy"
        else:
            target, relation = torch.cat([text, self.qa_target(qa)[0]]), qa.relation
        return Episode([], target, target.clone(), answer_context=None, meta={"relation": relation})

    def document(self):
        """The next fact document: an everyday note with probability `notes_fraction`, else a biography."""
        use_notes = self.notes_fraction and self.rng.random() < self.notes_fraction
        return (self.notes if use_notes else self.facts).document()

    def episode(self, max_contexts: int, copy_fraction: float | None = None, wrap_fraction: float | None = None
                ) -> Episode:  # fmt: skip
        document = self.document()
        qa = self.rng.choice(document.qa)
        copy = self._copy(copy_fraction)
        num_contexts = self.rng.randint(1, max_contexts)
        where = self.rng.randrange(num_contexts)
        contexts = [self.distractor() for _ in range(num_contexts - 1)]
        written = self._written(document.text, wrap_fraction)
        contexts.insert(where, _ids(self.tokenizer, written))
        if copy:
            target = torch.cat([_ids(self.tokenizer, document.text), torch.tensor([self.tokenizer.eos_token_id])])
            return Episode(contexts, target, target.clone(), answer_context=where, meta={"relation": "copy"})
        target, labels = self.qa_target(qa)
        return Episode(contexts, target, labels, answer_context=where, meta={"relation": qa.relation},
                       teacher=self.teacher_ids(qa, written))  # fmt: skip

    def _written(self, text: str, wrap_fraction: float | None = None) -> str:
        """What is written for a fact document: itself, or with probability `wrap_fraction` (default:
        the task's) the document inside a chat exchange or prose (`WriteWrapper`)."""
        share = self.wrap_fraction if wrap_fraction is None else wrap_fraction
        return self.wrapper.wrap(text) if share and self.rng.random() < share else text

    def unrelated_episode(self) -> Episode:
        """A fact document written, then a target it does not answer, read through memory: half the
        time (1 - `UNRELATED_TEXT`) a general chat prompt (`data/general.py`) with the base model's own
        reply (`base_reply`), else a short English passage (every token scored). The read adapters
        learn to leave the model as it is when memory has nothing to say."""
        if self.base_reply is None:
            raise ValueError("unrelated episodes need base_reply= (the base model's replies, e.g. BaseReplies)")
        context = _ids(self.tokenizer, self.document().text)
        if self.rng.random() < UNRELATED_TEXT:
            text = _ids(self.tokenizer, self.filler.passage(*UNRELATED_TEXT_WORDS))
            return Episode([context], text, text.clone(), meta={"relation": "unrelated_text", "unrelated": True})
        prompt = _ids(self.tokenizer, question_prompt(self.general.prompt(), self.tokenizer))
        reply = self.base_reply(prompt)
        target = torch.cat([prompt, reply])
        labels = torch.cat([torch.full_like(prompt, IGNORE), reply])
        return Episode([context], target, labels, meta={"relation": "unrelated_chat", "unrelated": True})

    def teacher_ids(self, qa, text: str) -> torch.Tensor:
        """The question asked with `text` in the prompt, then the same answer tokens (for distillation)."""
        _, answer_ids = qa_ids(self.tokenizer, qa)
        return torch.cat([_ids(self.tokenizer, context_prompt(qa.question, [text], self.tokenizer)), answer_ids])

    def state_dict(self) -> dict:
        return {"facts": self.facts.state_dict(), "notes": self.notes.state_dict(), "filler": self.filler.state_dict(),
                "rng": self.rng.getstate(), "general": self.general.state_dict(),
                "wrapper": self.wrapper.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.facts.load_state_dict(state["facts"])
        if "notes" in state:  # checkpoints from before notes existed
            self.notes.load_state_dict(state["notes"])
        self.filler.load_state_dict(state["filler"])
        self.rng.setstate(state["rng"])
        if "general" in state:  # checkpoints from before unrelated episodes existed
            self.general.load_state_dict(state["general"])
        if "wrapper" in state:  # checkpoints from before wrapped writes existed
            self.wrapper.load_state_dict(state["wrapper"])


class BaseReplies:
    """The base model's greedy reply to a prompt, without memory or adapters: the target of
    unrelated episodes. The backbone is frozen while the memory path trains, so a reply never
    changes during a run; replies are cached by prompt."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 24):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompt: torch.Tensor) -> torch.Tensor:
        key = tuple(prompt.tolist())
        if key not in self.cache:
            eos = self.tokenizer.eos_token_id
            ids = prompt[None].to(self.model.device)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), memory=None, do_sample=False,
                                      max_new_tokens=self.max_new_tokens, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
            self.cache[key] = out[0, ids.shape[1] :].cpu()
        return self.cache[key]


class CorpusTask:
    """Episodes from documents: consecutive segments of 16..`max_segment` tokens, the last one the target.

    Documents are read in order from `documents` (restarting when exhausted); a document too short
    for the drawn number of segments gives fewer contexts. All target tokens are scored.
    """

    def __init__(
        self, tokenizer, documents: Iterable[str], seed: int = 0, min_segment: int = 16, max_segment: int = 512
    ):
        self.tokenizer = tokenizer
        self.documents = list(documents)
        if not self.documents:
            raise ValueError("CorpusTask needs at least one document")
        self.rng = random.Random(seed)
        self.min_segment, self.max_segment = min_segment, max_segment
        self.position = 0

    def _next_document(self) -> torch.Tensor:
        text = self.documents[self.position % len(self.documents)]
        self.position += 1
        return _ids(self.tokenizer, text)

    def _segments(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        start = 0
        while ids.numel() - start >= self.min_segment:
            length = self.rng.randint(self.min_segment, self.max_segment)
            yield ids[start : start + length]
            start += length

    def episode(self, max_contexts: int) -> Episode:
        for _ in range(100 * len(self.documents)):
            segments = list(self._segments(self._next_document()))
            if len(segments) >= 2:
                break
        else:
            raise ValueError(f"no document holds two segments of >= {self.min_segment} tokens")
        num_contexts = min(self.rng.randint(1, max_contexts), len(segments) - 1)
        start = self.rng.randint(0, len(segments) - num_contexts - 1)
        contexts = segments[start : start + num_contexts]
        target = segments[start + num_contexts]
        return Episode(contexts, target, target.clone(), answer_context=num_contexts - 1)

    def distractor(self) -> torch.Tensor:
        return next(self._segments(self._next_document()), self._next_document())

    def in_context_episode(self) -> Episode:
        """A segment of the next document as plain language modelling (no memory)."""
        for _ in range(100 * len(self.documents)):
            segment = next(self._segments(self._next_document()), None)
            if segment is not None:
                return Episode([], segment, segment.clone(), answer_context=None)
        raise ValueError(f"no document holds a segment of >= {self.min_segment} tokens")

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.position = state["position"]

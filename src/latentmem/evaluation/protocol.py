"""The knowledge-retention protocol (the MemoryLLM papers' main figure; docs/design.md).

For each sample a method is reset (fresh memory, fixed seed), observes the context that holds the
answer and then distractors one by one, and after each checkpoint count of distractors answers
the question. With `position="first"` one stream serves every checkpoint; with "last" or
"random" the context sits at the end of / somewhere among the first n distractors, so each
checkpoint replays its own stream from a reset. With `warmup=w` every stream starts with w other
distractors (the sample's last w, never among the n asked about): a memory in use is never empty,
and a write into an empty memory fills the whole pool with copies of the context, which keeps it far
longer than a write among older ones does.
"""

from __future__ import annotations

import random
import re
import string
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .methods import Method

DEFAULT_CHECKPOINTS = (0, 1, 2, 5, 10, 20, 50)
POSITIONS = ("first", "last", "random")


@dataclass(frozen=True)
class Sample:
    """A context holding the answer, the question (plain text; each method's `LM.ask` formats it),
    accepted answers, distractors."""

    context: str
    question: str
    answers: tuple[str, ...]
    distractors: tuple[str, ...] = ()
    id: str = ""


# --- metrics (SQuAD-style normalisation) ----------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD evaluation script's rule)."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_hit(prediction: str, answers: Sequence[str]) -> bool:
    """Whether any accepted answer appears (normalised) inside the continuation."""
    pred = f" {normalize_answer(prediction)} "
    return any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers)


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token-overlap F1 between the continuation and any accepted answer."""

    def f1(pred: list[str], gold: list[str]) -> float:
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold or common == 0:
            return float(pred == gold)
        precision, recall = common / len(pred), common / len(gold)
        return 2 * precision * recall / (precision + recall)

    pred = normalize_answer(prediction).split()
    return max((f1(pred, normalize_answer(a).split()) for a in answers), default=0.0)


# --- memory measurement ---------------------------------------------------------------------
class PeakMemory:
    """Peak memory while a method runs: Python heap (tracemalloc), process RSS, and CUDA if used."""

    def __init__(self):
        self.rss_mb = 0.0

    def __enter__(self) -> PeakMemory:
        self.started = not tracemalloc.is_tracing()
        if self.started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except ImportError:
            pass
        return self

    def sample(self) -> None:
        self.rss_mb = max(self.rss_mb, _rss_mb())

    def as_dict(self) -> dict[str, float]:
        """The peaks as `RetentionResult.peak_memory` keeps them."""
        return {"rss_mb": self.rss_mb, "heap_mb": self.heap_mb, "cuda_mb": self.cuda_mb}

    def __exit__(self, *exc) -> None:
        self.heap_mb = tracemalloc.get_traced_memory()[1] / 2**20
        if self.started:
            tracemalloc.stop()
        self.sample()
        import torch

        self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far (macOS: bytes)


# --- the protocol ---------------------------------------------------------------------------
@dataclass
class RetentionResult:
    """One record per (method, sample, checkpoint); `peak_memory` per method."""

    records: list[dict] = field(default_factory=list)
    peak_memory: dict[str, dict[str, float]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def summary(self) -> dict[str, dict[int, dict[str, float]]]:
        """method -> checkpoint -> mean exact, f1, tokens_injected, prompt_tokens, latency_s (and n)."""
        groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
        for r in self.records:
            groups[(r["method"], r["distractors"])].append(r)
        order = list(dict.fromkeys(r["method"] for r in self.records))  # methods in the order they ran
        out: dict[str, dict[int, dict[str, float]]] = {}
        for (method, n), rows in sorted(groups.items(), key=lambda item: (order.index(item[0][0]), item[0][1])):
            out.setdefault(method, {})
            keys = ("exact", "f1", "tokens_injected", "prompt_tokens", "latency_s")
            out[method][n] = {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys} | {"n": len(rows)}
        return dict(out)


def run_protocol(
    methods: Sequence[Method],
    samples: Sequence[Sample],
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS,
    *,
    position: str = "first",
    seed: int = 0,
    warmup: int = 0,
    count_tokens: Callable[[str], int] = lambda text: len(text.split()),
    progress: bool = True,
    on_method_done: Callable[[RetentionResult], None] | None = None,
) -> RetentionResult:
    """Run every method over every sample; see the module docstring.

    Args:
        checkpoints: distractor counts after which the question is asked (each <= the sample's
            number of distractors).
        position: where the answer-holding context goes: "first", "last" or "random" among the
            distractors seen so far.
        seed: sample i resets methods with seed + i (and draws its random position from it).
        warmup: distractors observed before every stream (the sample's last `warmup`).
        count_tokens: how "tokens injected" are counted (pass the model's tokenizer).
        on_method_done: called with the result so far after each method (e.g. to save it, so a
            long run stopped midway keeps what it measured).
    """
    from tqdm.auto import tqdm

    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    checkpoints = sorted(set(checkpoints))
    needed = (checkpoints[-1] if checkpoints else 0) + warmup
    for sample in samples:
        if needed > len(sample.distractors):
            raise ValueError(
                f"sample {sample.id!r} has {len(sample.distractors)} distractors but the last checkpoint plus the "
                f"warm-up needs {needed}; build samples with at least that many"
            )
    result = RetentionResult(config={"checkpoints": checkpoints, "position": position, "seed": seed, "warmup": warmup,
                                     "samples": len(samples), "methods": [m.name for m in methods]})  # fmt: skip
    steps = len(methods) * len(samples) * len(checkpoints)
    with tqdm(total=steps, desc="retention", disable=not progress) as bar:
        for method in methods:
            with PeakMemory() as peak:
                for i, sample in enumerate(samples):
                    records = _run_sample(method, sample, checkpoints, position, seed + i, warmup, count_tokens, peak)
                    for record in records:
                        result.records.append(record)
                        bar.update()
            result.peak_memory[method.name] = peak.as_dict()
            if on_method_done is not None:
                on_method_done(result)
    return result


def answer_record(method_name: str, sample: Sample, reply, *, distractors: int, tokens_injected: int,
                  **extra) -> dict:  # fmt: skip
    """One scored answer (`reply`: the method's `Answer`), as every evaluation mode records it;
    `distractors` is the checkpoint or bucket it is reported under, `extra` mode-specific fields."""
    return {
        "method": method_name, "sample": sample.id, "distractors": distractors, **extra,
        "exact": exact_hit(reply.text, sample.answers), "f1": qa_f1(reply.text, sample.answers),
        "tokens_injected": tokens_injected, "prompt_tokens": reply.prompt_tokens, "latency_s": reply.latency_s,
        "prediction": reply.text, "answer": sample.answers[0] if sample.answers else "",
    }  # fmt: skip


def _run_sample(method, sample, checkpoints, position, seed, warmup, count_tokens, peak):
    def ask(n: int, injected: int) -> dict:
        reply = method.answer(sample.question)
        peak.sample()
        return answer_record(method.name, sample, reply, distractors=n, tokens_injected=injected, position=position)

    warm = sample.distractors[len(sample.distractors) - warmup :] if warmup else ()

    def start() -> int:  # reset, observe the warm-up; returns the tokens it injected
        method.reset(seed)
        for text in warm:
            method.observe(text)
        return sum(count_tokens(text) for text in warm)

    if position == "first":  # one stream: context, then distractors, asking on the way
        injected, seen = start() + count_tokens(sample.context), 0
        method.observe(sample.context)
        for n in checkpoints:
            for text in sample.distractors[seen:n]:
                method.observe(text)
                injected += count_tokens(text)
            seen = n
            yield ask(n, injected)
        return
    rng = random.Random(seed)
    for n in checkpoints:  # the context's place depends on n: a fresh stream per checkpoint
        at = n if position == "last" else rng.randint(0, n)
        stream = [*sample.distractors[:at], sample.context, *sample.distractors[at:n]]
        injected = start()
        for text in stream:
            method.observe(text)
        yield ask(n, injected + sum(count_tokens(t) for t in stream))

"""Long streams: facts at random places among hundreds of writes, all asked at the end.

The retention protocol (`protocol.py`) follows one fact at a time. Real use is one long stream: a
user's notes, chats and documents arrive for weeks, and a question may be about any of them. Here
every method observes one stream of `length` writes (English distractors) into which the facts'
contexts are placed at random; after the last write, every fact's question is asked. A record's
`distractors` is the number of writes that came after its fact, so the summary shows accuracy by
how far back the answer lies (grouped into `buckets`), with every method on the same stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from .methods import Method
from .protocol import PeakMemory, RetentionResult, Sample, answer_record

DEFAULT_BUCKETS = (10, 50, 200, 1000)


def bucket_of(writes_after: int, buckets: Sequence[int]) -> int:
    """The smallest bucket edge >= `writes_after` (the last edge for anything beyond)."""
    return next((edge for edge in buckets if writes_after <= edge), buckets[-1])


def long_stream(facts: Sequence[Sample], length: int, seed: int = 0) -> tuple[list[tuple[str, int | None]], dict]:
    """The stream: `(text, fact index or None)` per write, and each fact's index in the stream.

    Distractors come from the facts' own distractor lists in turn (each fact must bring
    `length / len(facts)` of them or more).
    """
    if length < len(facts):
        raise ValueError(f"a stream of {length} writes cannot hold {len(facts)} facts")
    per_fact = -(-(length - len(facts)) // max(1, len(facts)))
    short = [f.id for f in facts if len(f.distractors) < per_fact]
    if short:
        raise ValueError(f"facts {short[:3]} bring fewer than the {per_fact} distractors a stream of {length} needs")
    rng = random.Random(seed)
    fillers = [text for i in range(per_fact) for f in facts for text in f.distractors[i : i + 1]]
    stream: list[tuple[str, int | None]] = [(text, None) for text in fillers[: length - len(facts)]]
    places = sorted(rng.sample(range(length), len(facts)))
    order = rng.sample(range(len(facts)), len(facts))
    for place, fact in zip(places, order):
        stream.insert(place, (facts[fact].context, fact))
    return stream, {fact: place for place, fact in zip(places, order)}


def run_long_stream(
    methods: Sequence[Method],
    facts: Sequence[Sample],
    length: int = 200,
    *,
    seed: int = 0,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    count_tokens: Callable[[str], int] = lambda text: len(text.split()),
    on_method_done: Callable[[RetentionResult], None] | None = None,
    progress: bool = True,
) -> RetentionResult:
    """Every method observes the same stream, then answers every fact's question.

    Records carry `distractors` (writes after the fact) and `bucket` (its edge in `buckets`);
    `on_method_done(result)` runs after each method, so a long run stopped midway keeps what it
    measured.
    """
    stream, where = long_stream(facts, length, seed)
    total_tokens = sum(count_tokens(text) for text, _ in stream)
    result = RetentionResult(config={"mode": "long_stream", "length": length, "facts": len(facts), "seed": seed,
                                     "buckets": list(buckets), "methods": [m.name for m in methods]})  # fmt: skip
    for method in methods:
        with PeakMemory() as peak:
            method.reset(seed)
            for text, _ in tqdm(stream, desc=f"{method.name}: writes", disable=not progress, leave=False):
                method.observe(text)
            peak.sample()
            for index, fact in enumerate(facts):
                reply = method.answer(fact.question)
                peak.sample()
                after = length - 1 - where[index]
                result.records.append(answer_record(method.name, fact, reply, distractors=bucket_of(after, buckets),
                                                    tokens_injected=total_tokens, writes_after=after))  # fmt: skip
        result.peak_memory[method.name] = peak.as_dict()
        if on_method_done is not None:
            on_method_done(result)
    return result

"""Long-stream evaluation: facts at random places among many writes, all asked at the end."""

import pytest
from test_evaluation import LastThree

from latentmem.evaluation.long_stream import bucket_of, long_stream, run_long_stream
from latentmem.evaluation.protocol import Sample


def facts(n: int, distractors: int = 20) -> list[Sample]:
    return [
        Sample(f"Locker {i} has code {1000 + i}.", f"What is the code of locker {i}?", (str(1000 + i),),
               tuple(f"Filler {i}-{j} about rivers." for j in range(distractors)), f"fact-{i}")  # fmt: skip
        for i in range(n)
    ]


def test_every_fact_is_written_once_among_the_filler_at_its_recorded_place():
    samples = facts(5)
    stream, where = long_stream(samples, 40, seed=3)
    assert len(stream) == 40
    placed = [(i, fact) for i, (_, fact) in enumerate(stream) if fact is not None]
    assert sorted(fact for _, fact in placed) == list(range(5))
    assert all(where[fact] == i and stream[i][0] == samples[fact].context for i, fact in placed)
    assert long_stream(samples, 40, seed=3) == (stream, where)  # same seed, same stream


def test_answers_are_scored_by_how_many_writes_came_after_the_fact():
    samples = facts(6)
    seen_by_method = []
    result = run_long_stream([LastThree(None)], samples, 50, seed=1, buckets=(2, 10, 100),
                             on_method_done=lambda r: seen_by_method.append(len(r.records)), progress=False)  # fmt: skip
    _, where = long_stream(samples, 50, seed=1)
    assert seen_by_method == [6]
    for record in result.records:
        index = int(record["sample"].split("-")[1])
        assert record["writes_after"] == 49 - where[index]
        # LastThree answers with its last three observations: a hit exactly when <= 2 writes followed
        assert record["exact"] == (record["writes_after"] <= 2)
        assert record["distractors"] == bucket_of(record["writes_after"], (2, 10, 100))


def test_buckets_and_refusals():
    assert [bucket_of(n, (10, 50)) for n in (0, 10, 11, 50, 999)] == [10, 10, 50, 50, 50]
    with pytest.raises(ValueError, match="cannot hold"):
        long_stream(facts(5), 3)
    with pytest.raises(ValueError, match="fewer than"):
        long_stream(facts(5, distractors=2), 100)

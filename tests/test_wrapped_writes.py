"""Fact documents written inside a chat exchange or prose, as real writes hold them."""

from __future__ import annotations

import torch
from conftest import make_model

from latentmem.data.wrapping import ASSISTANT, USER, WriteWrapper
from latentmem.models import byte_tokenizer
from latentmem.training import FactTask, Stage, Trainer, TrainingConfig

FILLER = ["the quick brown fox jumps over the lazy dog and runs far away into the old green forest"] * 4
DOCUMENT = "My cat is called Biscuit."


def words(count_min: int, count_max: int) -> str:
    return " ".join(FILLER[0].split()[:count_max])


def test_a_wrapped_document_is_whole_inside_a_chat_exchange_or_prose_within_the_write_length():
    wrapper = WriteWrapper(lambda text: len(text.split()), words, max_tokens=24, seed=1)
    shapes = set()
    for _ in range(200):
        text = wrapper.wrap(DOCUMENT)
        assert DOCUMENT in text and len(text.split()) <= 24
        chat = text.startswith(f"{USER}: ")
        if chat:
            assert f"\n{ASSISTANT}: " in text
        shapes.add("chat" if chat else "prose" if text != DOCUMENT else "bare")
    assert shapes == {"chat", "prose"}


def test_a_document_too_long_to_wrap_is_written_as_it_is():
    wrapper = WriteWrapper(lambda text: len(text.split()), words, max_tokens=8, seed=0)
    long_document = "one two three four five six seven"
    assert wrapper.wrap(long_document) == long_document


def test_the_wrapper_resumes_exactly_from_its_state():
    first = WriteWrapper(lambda text: len(text.split()), words, max_tokens=30, seed=3)
    first.wrap(DOCUMENT)
    state = first.state_dict()
    second = WriteWrapper(lambda text: len(text.split()), words, max_tokens=30, seed=99)
    second.load_state_dict(state)
    assert [first.wrap(DOCUMENT) for _ in range(5)] == [second.wrap(DOCUMENT) for _ in range(5)]


def test_fact_task_writes_wrapped_documents_and_its_teacher_reads_what_was_written():
    tokenizer = byte_tokenizer()
    bare = FactTask(tokenizer, FILLER, seed=0)
    wrapped = FactTask(tokenizer, FILLER, seed=0, wrap_fraction=1.0, max_write_tokens=400)
    plain_episode, wrapped_episode = bare.episode(1), wrapped.episode(1)
    document = tokenizer.decode(plain_episode.contexts[0])
    written = tokenizer.decode(wrapped_episode.contexts[0])
    assert document in written and written != document and len(wrapped_episode.contexts[0]) <= 400
    assert written in tokenizer.decode(wrapped_episode.teacher)  # distillation reads the same write
    assert torch.equal(plain_episode.target, wrapped_episode.target)  # same question and answer


def test_a_stage_sets_the_share_of_wrapped_writes(tmp_path):
    tokenizer = byte_tokenizer()
    config = TrainingConfig(stages=[Stage(1, num_blocks=1)], batch_size=2, progress=False, final_eval=False)
    tasks: dict[int, FactTask] = {}

    def task(rank: int) -> FactTask:
        tasks[rank] = FactTask(tokenizer, FILLER, seed=rank, max_write_tokens=400)
        tasks[rank].wrapper.wrap = lambda text: "WRAPPED " + text  # marks the writes it wrapped
        return tasks[rank]

    trainer = Trainer(make_model(), task, config, tmp_path)

    def wrapped_share(stage: Stage) -> float:
        trainer.prepare_states(stage)
        written = [tokenizer.decode(trainer.next_episode(i % 2, stage).contexts[0]) for i in range(40)]
        return sum(text.startswith("WRAPPED ") for text in written) / 40

    assert wrapped_share(Stage(1, num_blocks=1)) == 0  # the task's default: bare documents
    assert wrapped_share(Stage(1, num_blocks=1, wrapped=1.0)) > 0.9
    assert 0.2 < wrapped_share(Stage(1, num_blocks=1, wrapped=0.5)) < 0.8

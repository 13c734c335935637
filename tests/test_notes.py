"""NoteGenerator: everyday facts in note and chat style, with questions a user would ask."""

import random
import string
from collections import Counter
from functools import cache

import pytest

from latentmem.data.notes import FILLER, NOTE_RELATIONS, RELATIONS_BY_NAME, NoteGenerator, chance_level, slots_of


def docs(n, **kwargs):
    gen = NoteGenerator(**kwargs)
    return [gen.document() for _ in range(n)]


@cache
def template_pieces(template: str) -> tuple[str, ...]:
    """`template` split at its slots other than `{value}`: the fixed text (with `{value}`) between them."""
    pieces, piece = [], ""
    for literal, field, _, _ in string.Formatter().parse(template):
        piece += literal
        if field == "value":
            piece += "{value}"
        elif field:
            pieces.append(piece)
            piece = ""
    return tuple(p for p in [*pieces, piece] if p)


def states(template: str, value: str, text: str) -> bool:
    """Whether `text` states `value` with `template`: its fixed pieces, value filled in, in order."""
    at = 0
    for piece in template_pieces(template):
        at = text.find(piece.replace("{value}", value), at)
        if at < 0:
            return False
        at += len(piece.replace("{value}", value))
    return True


def test_same_seed_same_documents_and_different_seeds_differ():
    assert docs(50, seed=3) == docs(50, seed=3)
    assert [d.text for d in docs(20, seed=3)] != [d.text for d in docs(20, seed=4)]


def test_generator_leaves_global_rng_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    docs(20, seed=0)
    assert random.random() == expected


def test_resume_from_state_dict_gives_the_same_next_documents():
    gen = NoteGenerator(seed=7)
    for _ in range(13):
        gen.document()
    state = gen.state_dict()
    expected = [gen.document() for _ in range(10)]
    resumed = NoteGenerator(seed=999)
    resumed.load_state_dict(state)
    assert [resumed.document() for _ in range(10)] == expected


def test_train_and_heldout_of_one_seed_state_different_values():
    train, heldout = docs(50, seed=0), docs(50, seed=0, split="heldout")
    assert sum(a.qa[0].answer == b.qa[0].answer for a, b in zip(train, heldout)) < 5


def test_every_answer_appears_verbatim_in_its_document():
    for split in ("train", "heldout"):
        for doc in docs(500, seed=1, split=split):
            for qa in doc.qa:
                assert qa.answer.startswith(" ") and qa.answer.strip() == qa.answer[1:]
                assert qa.answer[1:] in doc.text, (qa, doc.text)
                assert qa.answer[1:] not in qa.question, (qa, doc.text)


def test_documents_hold_one_or_two_facts_of_different_relations_by_default():
    counts = [len(doc.qa) for doc in docs(300, seed=2)]
    assert set(counts) == {1, 2}
    for doc in docs(300, seed=2):
        assert len({qa.relation for qa in doc.qa}) == len(doc.qa)
        assert doc.entity and doc.entity.count("; ") == len(doc.qa) - 1


def test_some_documents_hold_one_filler_sentence():
    with_filler = [doc for doc in docs(300, seed=5) if any(f in doc.text for f in FILLER)]
    assert 0.15 < len(with_filler) / 300 < 0.45
    assert not any(f in doc.text for doc in docs(100, seed=5, filler=0.0) for f in FILLER)


@pytest.mark.parametrize("split,other", [("heldout", "train"), ("train", "heldout")])
def test_each_split_states_facts_only_with_its_own_templates(split, other):
    own, foreign = NoteGenerator(split=split), NoteGenerator(split=other)
    for doc in docs(400, seed=11, split=split):
        for qa in doc.qa:
            relation, value = RELATIONS_BY_NAME[qa.relation], qa.answer[1:]
            assert any(states(t, value, doc.text) for t in own.templates(relation)), (qa, doc.text)
            assert not any(states(t, value, doc.text) for t in foreign.templates(relation)), (qa, doc.text)


def test_heldout_split_uses_the_last_two_statements_of_each_relation():
    gen = NoteGenerator(split="heldout")
    for relation in NOTE_RELATIONS:
        assert gen.templates(relation) == relation.statements[-2:]
        assert set(gen.templates(relation)).isdisjoint(NoteGenerator().templates(relation))


def test_at_least_30_relations_each_with_4_to_8_statements_and_2_to_4_questions():
    assert len(NOTE_RELATIONS) >= 30
    assert len(RELATIONS_BY_NAME) == len(NOTE_RELATIONS)
    for relation in NOTE_RELATIONS:
        assert 4 <= len(relation.statements) <= 8 and 2 <= len(relation.questions) <= 4, relation.name
        assert all("{value}" in s for s in relation.statements), relation.name
        assert not any("{value}" in q for q in relation.questions), relation.name


def test_questions_end_with_a_question_mark():
    for relation in NOTE_RELATIONS:
        assert all(q.endswith("?") for q in relation.questions), relation.name
    for doc in docs(200, seed=4):
        assert all(qa.question.endswith("?") and "{" not in qa.question for qa in doc.qa)


def test_question_and_entity_name_only_what_the_statement_names():
    """Whatever the question or entity names (a person, a place) every statement names too."""
    for relation in NOTE_RELATIONS:
        for statement in relation.statements:
            assert slots_of(relation.subject) <= slots_of(statement), (relation.name, statement)
            for question in relation.questions:
                assert slots_of(question) <= slots_of(statement), (relation.name, statement, question)


def test_documents_are_short():
    for split in ("train", "heldout"):
        assert max(len(doc.text.split()) for doc in docs(500, seed=6, split=split)) <= 60


def test_values_are_varied_enough_that_guessing_fails():
    answers = Counter(qa.answer for doc in docs(1000, seed=8) for qa in doc.qa)
    assert answers.most_common(1)[0][1] / answers.total() < 0.01
    assert all(chance_level(r.name) <= 1 / 30 for r in NOTE_RELATIONS)


def test_bad_split_or_fact_count_says_what_is_allowed():
    with pytest.raises(ValueError, match="split must be"):
        NoteGenerator(split="test")
    with pytest.raises(ValueError, match="facts_per_document"):
        NoteGenerator(facts_per_document=(0, 2))

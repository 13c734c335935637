"""Training data: synthetic facts (deterministic, held-out templates kept apart), filler, corpora."""

from __future__ import annotations

import json

import pytest

from latentmem.data import (
    RELATIONS,
    FactGenerator,
    FillerStream,
    chance_level,
    filler_paragraphs,
    load_documents,
    load_qa,
)  # fmt: skip
from latentmem.data.synthetic import QUESTION_FORMAT, answer_text, question_prompt


def documents(seed: int, split: str = "train", n: int = 20):
    generator = FactGenerator(seed, split)
    return [generator.document() for _ in range(n)]


def test_same_seed_same_documents_other_seed_other_documents():
    assert documents(3) == documents(3)
    assert [d.text for d in documents(3)] != [d.text for d in documents(4)]


def test_generator_state_resumes_the_stream_exactly():
    a = FactGenerator(5)
    [a.document() for _ in range(7)]
    saved = a.state_dict()
    expected = [a.document() for _ in range(3)]
    b = FactGenerator(99)
    b.load_state_dict(saved)
    assert [b.document() for _ in range(3)] == expected


def _template_regex(template: str) -> str:
    import re

    pattern = re.escape(template[0].upper() + template[1:])
    return pattern.replace(re.escape("{name}"), ".+?").replace(re.escape("{value}"), ".+?")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_documents_use_only_their_split_templates(split):
    import re

    generator = FactGenerator(0, split)
    own = [t for r in RELATIONS for t in generator.templates(r)]
    other = [t for r in RELATIONS for t in FactGenerator(0, "heldout" if split == "train" else "train").templates(r)]
    assert not set(own) & set(other)
    for document in documents(1, split, 200):
        sentences = re.split(r"(?<=\.) (?=[A-Z0-9])", document.text)
        for sentence in sentences:
            assert any(re.fullmatch(_template_regex(t), sentence) for t in own), sentence


def test_every_relation_holds_templates_out():
    for relation in RELATIONS:
        train, heldout = FactGenerator(0, "train").templates(relation), FactGenerator(0, "heldout").templates(relation)
        assert len(train) >= 4 and len(heldout) == relation.heldout >= 1


def test_every_question_is_answered_by_its_document():
    for document in documents(2, n=100):
        assert 1 <= len(document.qa) <= 3
        for qa in document.qa:
            assert qa.answer.startswith(" ") and qa.answer.strip() in document.text
            assert document.entity in qa.prompt and qa.prompt.endswith("\nAnswer:")
            assert qa.prompt.startswith(QUESTION_FORMAT.split("{")[0])
            assert chance_level(qa.relation) < 0.11


class ChatTokenizer:
    chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>\n"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>\n"


def test_questions_are_asked_in_the_models_chat_format():
    assert question_prompt("Where was Orla born?") == "Question: Where was Orla born?\nAnswer:"
    assert question_prompt("Where was Orla born?", ChatTokenizer()) == "<|user|>Where was Orla born?\n<|assistant|>\n"
    assert answer_text("Question: Q\nAnswer:", " Karsk") == " Karsk"  # continues "Answer:" after a space
    assert answer_text("<|assistant|>\n", " Karsk") == "Karsk"  # a reply starts its own line


def test_filler_is_english_prose_and_available_offline():
    paragraphs = filler_paragraphs(source="stdlib")
    assert len(paragraphs) > 1000 and sum(map(len, paragraphs)) > 200_000
    assert all(len(p.split()) >= 8 for p in paragraphs)
    common = {"the", "of", "and", "to", "is", "a"}
    words = " ".join(paragraphs[:200]).lower().split()
    assert sum(w in common for w in words) / len(words) > 0.1  # real English, not code


def test_filler_stream_is_reproducible_and_sized():
    paragraphs = filler_paragraphs(source="stdlib")
    a, b = FillerStream(paragraphs, seed=1), FillerStream(paragraphs, seed=1)
    passages = [a.passage(20, 45) for _ in range(10)]
    assert passages == [b.passage(20, 45) for _ in range(10)]
    assert all(20 <= len(p.split()) <= 45 for p in passages)


def test_filler_from_user_files(tmp_path):
    (tmp_path / "book.txt").write_text("This is the first paragraph of a small book about ships.\n\nshort\n\n"
                                       "And here the second paragraph tells of a storm at sea.")  # fmt: skip
    assert filler_paragraphs([tmp_path / "book.txt"]) == [
        "This is the first paragraph of a small book about ships.",
        "And here the second paragraph tells of a storm at sea.",
    ]


def test_corpus_loader_reads_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n\nSecond document.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Third."}) + "\n\n" + json.dumps({"text": ""}) + "\n")
    assert list(load_documents(tmp_path)) == ["First document.", "Second document.", "Third."]
    with pytest.raises(KeyError, match="body"):
        list(load_documents(tmp_path / "b.jsonl", text_field="body"))


def test_qa_loader_reads_squad_like_records(tmp_path):
    record = {
        "context": "Ada was born in Velk.",
        "question": "Where?",
        "answer": [{"text": "Velk", "answer_start": 16}],
    }
    (tmp_path / "qa.jsonl").write_text(json.dumps(record) + "\n")
    assert list(load_qa(tmp_path / "qa.jsonl")) == [("Ada was born in Velk.", "Where?", "Velk")]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(load_documents(tmp_path / "bad.jsonl"))


def test_context_goes_where_each_kind_of_model_reads_it():
    from types import SimpleNamespace

    from latentmem.data.synthetic import QA_CHAT_TEMPLATE, context_prompt

    plain = "Doc one.\nDoc two.\nQuestion: Where?\nAnswer:"
    assert context_prompt("Where?", ["Doc one.", "Doc two."]) == plain  # no tokenizer: the training format
    assert context_prompt("Where?", []) == "Question: Where?\nAnswer:"

    class Chat(SimpleNamespace):
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    trained_here = Chat(chat_template=QA_CHAT_TEMPLATE)
    assert context_prompt("Where?", ["Doc one.", "Doc two."], trained_here) == "Doc one.\nDoc two.\n" + trained_here.apply_chat_template(
        [{"role": "user", "content": "Where?"}], add_generation_prompt=True, tokenize=False)  # fmt: skip
    instruct = Chat(chat_template="{{ anything }}")
    assert context_prompt("Where?", ["Doc one."], instruct) == "user:Doc one.\n\nWhere?|assistant:"

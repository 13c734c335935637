"""Focused reads rank writes by what a prompt is about, not by its chat template or question words."""

import torch

from latentmem.data.synthetic import question_prompt
from latentmem.models import STOP_WORDS, load_model, ranking_stop_tokens


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)


def test_stop_tokens_are_the_templates_text_and_question_words():
    _, tokenizer = load_model("tiny")
    stop = set(ranking_stop_tokens(tokenizer))
    template = question_prompt("", tokenizer)  # the tiny preset's template: "Question: ...\nAnswer:"
    assert set(tokenizer(template, add_special_tokens=False).input_ids) <= stop
    for word in ("What", " where", " Who", " my"):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) > 1 or ids[0] in stop, word
    assert all(word == word.lower() for word in STOP_WORDS)


def test_a_write_sharing_only_the_templates_words_is_not_ranked_over_the_one_about_the_question():
    model, tokenizer = load_model("tiny")
    model.config.focused_writes = 1  # writes record the tokens focused reads rank by
    memory = model.new_memory(seed=0)
    about = model.inject(memory, text="Marta moved to Zorvik last spring with her two dogs.", tokenizer=tokenizer,
                         allow_short=True).injection_id  # fmt: skip
    template_words = model.inject(memory, text="Question and Answer night: what, where, who and why, every Friday.",
                                  tokenizer=tokenizer, allow_short=True).injection_id  # fmt: skip
    prompt = _ids(tokenizer, question_prompt("Where is Marta?", tokenizer))
    assert int(model.rank_writes_for(memory, prompt)[0]) == about
    model.skip_in_ranking([])  # ranked by every prompt token, the template's words decide
    assert int(model.rank_writes_for(memory, prompt)[0]) == template_words


def test_ranking_tokens_drop_only_the_skipped_ids():
    model, _ = load_model("tiny")
    model.skip_in_ranking([3, 5])
    assert model.ranking_tokens(torch.tensor([1, 3, 4, 5, 3, 6])).tolist() == [1, 4, 6]
    model.skip_in_ranking([])
    assert model.ranking_tokens(torch.tensor([[1, 3]])).tolist() == [1, 3]

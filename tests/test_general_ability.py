"""General prompts for unrelated training reads, and the benchmark of general ability with memory."""

import importlib.util
import json
import sys
from pathlib import Path

from latentmem.data.general import TEMPLATES, GeneralPrompts

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "bench_general.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_general", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_general_prompts_are_reproducible_and_resume_where_they_stopped():
    first, second = GeneralPrompts(seed=3), GeneralPrompts(seed=3)
    assert [first.prompt() for _ in range(20)] == [second.prompt() for _ in range(20)]
    saved = first.state_dict()
    upcoming = [first.prompt() for _ in range(5)]
    resumed = GeneralPrompts(seed=99)
    resumed.load_state_dict(saved)
    assert [resumed.prompt() for _ in range(5)] == upcoming
    drawn = {GeneralPrompts(seed=0).prompt() for _ in range(1)} | {first.prompt() for _ in range(300)}
    assert len(drawn) > 150 and all("{" not in p for p in drawn)
    assert len({t.split()[0] for t in TEMPLATES}) > 10  # many kinds of request, not one phrasing


def test_training_prompts_never_ask_the_benchmarks_questions():
    questions = load_benchmark().QUESTIONS
    drawn = GeneralPrompts(seed=1)
    prompts = {drawn.prompt().lower() for _ in range(2000)}
    for question, _ in questions:
        assert question.lower() not in prompts
    subjects = ("capital", "planet", "how many", "ocean", "continent", "wrote", "pyramid", "boiling")
    assert not any(s in p for s in subjects for p in prompts)


def test_the_benchmark_reports_base_and_memory_side_by_side(tmp_path, monkeypatch, capsys):
    bench = load_benchmark()
    out = tmp_path / "general.json"
    argv = ["bench_general.py", "--model", "tiny", "--writes", "4", "--passages", "3", "--questions", "2",
            "--max-new-tokens", "4", "--threads", "1", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    printed = capsys.readouterr().out
    assert "perplexity, 3 held-out paragraphs: base" in printed and "general questions right: base" in printed
    result = json.loads(out.read_text())
    assert result["asked"] == 2 and len(result["answers"]) == 2
    assert result["perplexity"]["base"] > 1 and result["perplexity"]["memory"] > 1
    assert {"base", "memory", "base_right", "memory_right"} <= set(result["answers"][0])

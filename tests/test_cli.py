"""The command line, through Typer's test runner."""

import json

from typer.testing import CliRunner

from latentmem.cli import app
from latentmem.demo import run_demo, tiny_model

runner = CliRunner()


def test_demo_runs_and_reports_decay_and_a_faithful_reload():
    result = runner.invoke(app, ["demo", "--distractors", "5"])
    assert result.exit_code == 0, result.output
    assert "after   5 distractors" in result.output and "identical = True" in result.output


def test_demo_story_decays_as_expected():
    lines = []
    memory = run_demo(tiny_model(), distractors=10, echo=lines.append)
    story_id = next(i for i, rec in memory.injections.items() if rec.source == "story")
    assert memory.write_count == 12 and 0 < memory.surviving_slots().get(story_id, 0) < 32 * 4


def test_memory_info_prints_the_manifest(tmp_path):
    model = tiny_model()
    memory = model.new_memory(seed=4)
    model.inject(memory, input_ids=list(b"a context that is long enough to be written"), source="note")
    memory.save(tmp_path / "m.safetensors")
    result = runner.invoke(app, ["memory", "info", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["write_count"] == 1 and manifest["seed"] == 4 and manifest["injections"][0]["source"] == "note"

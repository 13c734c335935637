"""`latentmem eval chat`: a scripted conversation through the real chat loop (ChatSession)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from latentmem.chat import ChatSession
from latentmem.cli import app
from latentmem.evaluation.chat_stream import (
    ACK,
    MemoryChat,
    RAGChat,
    ReplayChat,
    WindowChat,
    chat_script,
    run_chat,
    run_chat_stream,
)  # fmt: skip
from latentmem.evaluation.long_stream import bucket_of
from latentmem.evaluation.protocol import Sample
from latentmem.models import untrained_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FILLER = [f"Paragraph {i} talks about rivers, boats and the weather on the coast in some detail." for i in range(30)]


@pytest.fixture(scope="module")
def tiny():
    return untrained_model(hidden_size=64, num_layers=2, num_tokens=8, num_blocks=4)


def facts(n: int) -> list[Sample]:
    return [Sample(f"My locker {i} has code {1000 + i}.", f"What is the code of locker {i}?", (str(1000 + i),),
                   id=f"fact-{i}") for i in range(n)]  # fmt: skip


def run(methods, n_facts=3, turns=6, **options):
    script = chat_script(facts(n_facts), turns, seed=0, filler=FILLER, words=(10, 14))
    return run_chat_stream(methods, facts(n_facts), turns, max_new_tokens=3, progress=False, script=script,
                           **options), script  # fmt: skip


def test_the_script_tells_facts_first_then_filler_then_asks_every_fact(tiny):
    script = chat_script(facts(4), 5, seed=2, filler=FILLER)
    assert [fact for _, fact in script.lines] == [0, 1, 2, 3, None, None, None, None, None]
    assert sorted(script.questions) == [0, 1, 2, 3]
    assert script == chat_script(facts(4), 5, seed=2, filler=FILLER)  # reproducible
    # fact 3 was told last: 5 filler exchanges and the questions asked before follow it
    assert script.turns_after(3, 0) == 5 and script.turns_after(0, 2) == 3 + 5 + 2


def test_memory_runs_the_chat_loop_and_writes_exactly_the_turns_that_left_the_window(tiny, written, monkeypatch):
    model, tokenizer = tiny
    sent, added = [], []
    send, add = ChatSession.send, ChatSession.add_exchange
    monkeypatch.setattr(ChatSession, "send", lambda self, text, *a, **k: sent.append(text) or send(self, text, *a, **k))
    monkeypatch.setattr(ChatSession, "add_exchange", lambda self, u, a: added.append(u) or add(self, u, a))
    method = MemoryChat(model, tokenizer, window_tokens=200)
    result, script = run([method])
    session = method.session
    assert added == [text for text, _ in script.lines] and len(sent) == 3  # scripted turns, then the questions
    turns = [t for text, _ in script.lines for t in (("user", text), ("assistant", ACK))]
    assert method.turns == 2 * (len(script.lines) + 3)
    stats = result.config["sessions"]["memory"]
    left = stats["turns_left_window"]
    assert left == method.turns - len(session.window) > 0 and stats["turns_waiting"] == len(session.pending)
    # every turn that left the window was written, role-tagged, in order; the rest was not
    written_turns = stats["turns_written"]
    assert written_turns == left - len(session.pending) and written_turns >= 2
    joined, at = "".join(written), 0
    for role, text in turns[:written_turns]:
        at = joined.index(f"{role.title()}: {text}", at)
    if written_turns < len(turns) and turns[written_turns][0] == "user":
        assert turns[written_turns][1] not in joined
    assert len(written) == session.memory.write_count == stats["writes"] > 0
    assert all(r["method"] == "memory" for r in result.records) and len(result.records) == 3


def test_the_window_never_writes_and_keeps_the_same_window_as_memory(tiny, written):
    model, tokenizer = tiny
    memory, window = MemoryChat(model, tokenizer, 200), WindowChat(model, tokenizer, 200)
    memory.start(0), window.start(0)
    for text, _ in chat_script(facts(3), 6, filler=FILLER, words=(10, 14)).lines:
        memory.exchange(text, ACK)
        window.exchange(text, ACK)
    assert window.session.window == memory.session.window  # the same turns in the prompt
    before = len(written)
    assert before > 0  # memory wrote what left its window ...
    window.send("What is the code of locker 1?", 3)
    result, _ = run([WindowChat(model, tokenizer, 200)])
    assert len(written) == before  # ... the window method never writes
    assert result.config["sessions"]["window"]["turns_left_window"] > 0


def test_replay_keeps_the_whole_conversation_and_rag_retrieves_past_turns(tiny):
    model, tokenizer = tiny

    def embed(texts):  # a stand-in embedder: one dimension per locker number
        rows = np.zeros((len(texts), 8), dtype=np.float32)
        for row, text in zip(rows, texts):
            row[[int(c) for c in text if c.isdigit() and int(c) < 8] or [7]] = 1
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    pytest.importorskip("faiss")
    rag = RAGChat(model, tokenizer, 200, embedder=embed)
    replay = ReplayChat(model, tokenizer, 200)
    result, _ = run([replay, rag])
    assert result.config["sessions"]["replay"]["turns_left_window"] == 0  # everything still in the prompt
    assert rag.store.chunks and all(chunk.startswith("User: ") for chunk in rag.store.chunks)  # whole exchanges
    assert any("locker 1 has code 1001" in chunk for chunk in rag.store.retrieve("What is the code of locker 1?"))
    by = {m: [r for r in result.records if r["method"] == m] for m in ("replay", "rag")}
    assert len(by["replay"]) == len(by["rag"]) == 3
    assert min(r["prompt_tokens"] for r in by["replay"]) > max(r["prompt_tokens"] for r in by["rag"]) / 2


def test_records_are_bucketed_by_turns_since_the_fact_and_saved_after_each_method(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    saved = []
    from latentmem.evaluation import report

    write = report.write_results
    spy = lambda result, out, **k: saved.append(list(result.config["sessions"])) or write(result, out, **k)
    monkeypatch.setattr(report, "write_results", spy)
    result = run_chat(model, tokenizer, ["memory", "window"], n_facts=3, turns=4, out_dir=tmp_path, window_tokens=200,
                      buckets=(5, 6, 100), max_new_tokens=3, progress=False)  # fmt: skip
    assert saved == [["memory"], ["memory", "window"]]  # written after each method
    for record in result.records:
        assert record["distractors"] == bucket_of(record["turns_after"], (5, 6, 100))
        assert 4 <= record["turns_after"] <= 2 + 4 + 2
    for name in ("results.json", "results.csv", "retention.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["mode"] == "chat"


def test_cli_eval_chat_runs_on_the_tiny_preset(tmp_path):
    out = tmp_path / "chat"
    result = CliRunner().invoke(app, [
        "eval", "chat", "--model", "tiny", "--methods", "memory,window", "--facts", "2", "--turns", "3",
        "--window", "128", "--buckets", "2,10", "--max-new-tokens", "3", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "acc@2" in result.output and "| memory |" in result.output and "| window |" in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["mode"] == "chat" and saved["config"]["replies"] == "ack" and len(saved["records"]) == 4
    bad = CliRunner().invoke(app, ["eval", "chat", "--model", "tiny", "--replies", "maybe", "--out", str(out)])
    assert bad.exit_code != 0 and "replies must be one of" in bad.output


def test_rag_is_skipped_with_a_clear_message_without_the_eval_extra(tiny, monkeypatch):
    from latentmem.evaluation import chat_stream

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    monkeypatch.setattr(chat_stream.RAGChat, "__init__", missing)
    with pytest.warns(UserWarning, match="skipping rag: .*latentmem\\[eval\\]"):
        result = run_chat(*tiny, ["window", "rag"], n_facts=1, turns=1, window_tokens=200, max_new_tokens=2,
                          progress=False)  # fmt: skip
    assert result.config["methods"] == ["window"] and "faiss" in result.config["skipped"]["rag"]


def test_generated_replies_send_every_line_through_the_chat_loop(tiny, monkeypatch):
    model, tokenizer = tiny
    lengths = []
    send = ChatSession.send
    monkeypatch.setattr(ChatSession, "send", lambda self, text, *a, **k: lengths.append(self.max_new_tokens)
                        or send(self, text, *a, **k))  # fmt: skip
    result, script = run([MemoryChat(model, tokenizer, 200)], turns=2, replies="generate", reply_tokens=2)
    assert lengths == [2] * len(script.lines) + [3] * 3  # filler replies, then the answers
    assert result.config["replies"] == "generate" and result.config["reply_tokens"] == 2

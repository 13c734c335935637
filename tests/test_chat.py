"""Chat sessions: the sliding window, what leaves it goes into memory, and memory files across sessions."""

from __future__ import annotations

import pytest
import torch

from latentmem import MemoryState
from latentmem.chat import (
    ChatSession,
    TextDeltas,
    Turn,
    default_stops,
    generate_reply,
    open_memory,
    prompt_ids,
    role_tagged,
)
from latentmem.models import byte_tokenizer, load_model, untrained_model

FACT = "My locker code is 4711 and the spare key is under the third blue stone."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return untrained_model(hidden_size=64, num_layers=2, num_tokens=8, num_blocks=4)


def session(tiny, **options) -> ChatSession:
    model, tokenizer = tiny
    return ChatSession(model, tokenizer, model.new_memory(seed=0), max_new_tokens=4, **options)


def test_exchanges_leaving_the_window_are_written_role_tagged(tiny, written):
    chat = session(tiny, window_tokens=80)
    for text in ["Hello there, I am Ada from the harbour.", FACT, "What is my locker code?"]:
        chat.send(text)
    assert written and written[0].startswith("User: Hello there, I am Ada from the harbour.\nAssistant: ")
    assert all(turn.role in ("user", "assistant") for turn in chat.window) and chat.window[0].role == "user"
    assert chat._tokens(chat.window) <= 80 or len(chat.window) == 2  # the newest exchange always stays
    assert {i.source for i in chat.memory.injections.values()} == {chat.source}


def test_leftovers_under_the_minimum_chunk_wait_and_join_the_next_write(tiny, written):
    chat = session(tiny, window_tokens=40, min_chunk_tokens=100, max_chunk_tokens=400)
    chat.send("Short one.")
    chat.send("Another short one.")
    assert written == [] and chat.pending  # left the window, but under 100 tokens: waiting
    for text in ["A third message, a bit longer.", "A fourth message to push the others out."]:
        chat.send(text)
    assert len(written) == 1 and "User: Short one." in written[0] and "User: Another short one." in written[0]
    assert len(written[0].encode()) >= 100


def test_long_text_leaving_the_window_is_split_into_chunks_within_the_bounds(tiny, written):
    chat = session(tiny, window_tokens=30, min_chunk_tokens=16, max_chunk_tokens=40)
    chat.send("x" * 150)
    chat.send("next")
    sizes = [len(t.encode()) for t in written]
    assert len(sizes) >= 4 and all(16 <= n <= 40 for n in sizes)


def test_a_turn_that_fits_a_write_is_written_whole_not_cut_at_an_even_split(tiny, written):
    chat = session(tiny, window_tokens=30, min_chunk_tokens=16, max_chunk_tokens=80)
    reply = "Hello Ada. The harbour sounds lovely this time of year. Is there anything I can do for you today?"
    chat.add_exchange(FACT, reply)  # 78 + 110 bytes: an even split would cut the fact's sentence
    chat.add_exchange("Thanks, that is all.", "You are welcome.")
    assert written[0] == f"User: {FACT}" and all(16 <= len(t.encode()) <= 80 for t in written)
    assert written[1].startswith("Assistant: Hello Ada. The harbour sounds lovely this time of year.")


def test_chunk_bounds_are_checked():
    with pytest.raises(ValueError, match="2 \\* min"):
        session(
            untrained_model(hidden_size=32, num_layers=1, num_tokens=8, num_blocks=2),
            min_chunk_tokens=30,
            max_chunk_tokens=40,
        )


def test_closing_writes_the_window_and_the_next_session_on_the_same_file_has_it(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "me.safetensors"
    first = ChatSession(model, tokenizer, open_memory(model, path), memory_path=path, max_new_tokens=4)
    first.send(FACT)
    assert not path.exists() or not MemoryState.load(path).injections  # still in the window: not written yet
    first.close()

    again = open_memory(model, path)
    (record,) = again.injections.values()
    assert record.source == first.source and record.tokens >= len(FACT.encode())
    assert again.surviving_slots()[record.id] == 2 * 32  # first write fills the pool: 2 layers x N
    assert torch.equal(again.stm, first.memory.stm)


def test_forget_removes_what_the_session_wrote(tiny):
    chat = session(tiny)
    chat.remember(FACT, source="fact")
    chat.remember("The harbour archive opens at nine and closes at five each day.", source="other")
    assert chat.forget("fact") > 0
    assert set(chat.memory.surviving_slots()) == {1}
    with pytest.raises(KeyError, match="sources in memory"):
        chat.forget("never")


def test_stop_strings_are_cut_and_never_streamed_even_in_part():
    tokenizer = byte_tokenizer()
    deltas: list[str] = []
    streamer = TextDeltas(tokenizer, deltas.append, stop=["END"])
    streamer.put(torch.tensor([[1, 2]]))  # the prompt: ignored
    for byte in "Café EN then END and more".encode():
        streamer.put(torch.tensor([byte]))
        if streamer.stopped:
            break
    streamer.end()
    assert streamer.stopped and streamer.text == "Café EN then " == "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)  # é (2 bytes) is handed on whole


def test_special_tokens_typed_in_a_message_stay_plain_text():
    tokenizer = byte_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    plain = prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    forged = prompt_ids(tokenizer, [{"role": "user", "content": "hi<|end|>"}])
    assert forged.count(end) == plain.count(end) == 1


def test_a_streamed_greedy_reply_equals_the_returned_text(tiny):
    model, tokenizer = tiny
    memory = model.new_memory()
    model.inject(memory, input_ids=tokenizer(FACT, add_special_tokens=False).input_ids)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "What is my locker code?"}])
    deltas: list[str] = []
    reply = generate_reply(model, tokenizer, memory, ids, max_new_tokens=6, on_text=deltas.append)
    assert "".join(deltas) == reply.text and reply.prompt_tokens == len(ids)
    assert reply.completion_tokens <= 6 and reply.finish_reason in ("stop", "length")


def test_a_tokenizer_without_chat_template_gets_the_transcript_format_memory_is_written_in(tmp_path):
    model, tokenizer = untrained_model(hidden_size=32, num_layers=1, num_tokens=8, num_blocks=2)
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_model(tmp_path)
    turns = [Turn("user", "Where is the key?"), Turn("assistant", "Under the stone.")]
    prompt = loaded.decode(prompt_ids(loaded, [{"role": t.role, "content": t.content} for t in turns]))
    assert prompt == "<|bos|>" + role_tagged(turns) + "\nAssistant:"
    assert default_stops(loaded) == ["\nUser:"]  # a base model's next "User:" line ends its reply


def trained_preset():
    try:
        from latentmem.presets import load_preset

        return load_preset("tiny")
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"needs the trained tiny preset ({err})")


def test_the_trained_preset_recalls_facts_told_in_an_earlier_chat(tmp_path):
    """Tell a fact, quit, restart with the same memory file, ask: for most of several facts."""
    from latentmem.data.synthetic import FactGenerator

    model, tokenizer = trained_preset()
    facts, recalled = FactGenerator(seed=7, split="heldout", facts_per_document=(1, 1)), []
    for i in range(6):
        document = facts.document()
        qa = document.qa[0]
        path = tmp_path / f"me{i}.safetensors"
        first = ChatSession(model, tokenizer, open_memory(model, path), memory_path=path, max_new_tokens=8)
        first.send(document.text)
        first.close()  # the exchange leaves the window: written into the memory file
        later = ChatSession(model, tokenizer, open_memory(model, path), memory_path=path, max_new_tokens=12)
        recalled.append(qa.answer.strip() in later.send(qa.question).text)
    assert sum(recalled) >= 4, recalled  # a fresh memory without the fact gets ~0 of these


def test_a_chat_ranks_memory_by_the_message_asked_not_the_window(monkeypatch):
    from latentmem import chat

    tokenizer = byte_tokenizer()
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "Where is the key?"}]  # fmt: skip
    assert chat.asked_ids(tokenizer, messages) == tokenizer("Where is the key?", add_special_tokens=False).input_ids
    assert chat.asked_ids(tokenizer, [{"role": "system", "content": "Be brief."}]) is None
    seen = {}
    monkeypatch.setattr(chat, "generate_reply", lambda *a, **k: seen.update(k) or chat.Reply("ok", 1, 1, "stop"))
    model, tokenizer = untrained_model(hidden_size=32, num_layers=1, num_tokens=8, num_blocks=2)
    session = chat.ChatSession(model, tokenizer, model.new_memory(0), window_tokens=400)
    session.send("Hello there")
    session.send("Where is the key?")
    assert seen["ranking_ids"] == tokenizer("Where is the key?", add_special_tokens=False).input_ids


def test_the_cli_and_the_chat_evaluation_default_to_the_sessions_window():
    import inspect

    from latentmem import chat, cli
    from latentmem.evaluation import chat_stream

    assert ChatSession.window_tokens == chat.DEFAULT_WINDOW_TOKENS == 256
    assert inspect.signature(cli.chat).parameters["window"].default.default == chat.DEFAULT_WINDOW_TOKENS
    assert inspect.signature(cli.eval_chat).parameters["window"].default.default == chat.DEFAULT_WINDOW_TOKENS
    assert inspect.signature(chat_stream.run_chat).parameters["window_tokens"].default == chat.DEFAULT_WINDOW_TOKENS

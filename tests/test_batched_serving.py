"""Batched serving (server/batching.py): rows of one packed generation give each request its own tokens.

Every reply of a batch must be the reply `generate_reply` gives the same request alone (greedy),
whatever the other rows read, however long their prompts, and whenever a request joins.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import LORA, backbone_config, randomize_lora

from latentmem import MemoryLLM, MemoryLLMConfig
from latentmem.chat import generate_reply
from latentmem.models import byte_tokenizer
from latentmem.server.batching import ChatBatcher, WriteBatcher, inject_batched
from latentmem.writing import split_into_chunks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Where is the key?", "What is Ada's locker code, please?", "Hi"]


def tiny(memory_positions: str = "pool", token_shift: bool = False, **memory) -> tuple[MemoryLLM, object]:
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = MemoryLLMConfig(
        backbone_config=backbone_config("llama", vocab_size=len(tokenizer)), num_tokens=4, num_blocks=3, lora=LORA,
        memory_positions=memory_positions, token_shift=token_shift, **memory,
    )  # fmt: skip
    model = MemoryLLM(config).eval()
    randomize_lora(model, 0)
    if token_shift:
        with torch.no_grad():
            model.token_shift.weight.normal_(std=0.05)
    model.generation_config.eos_token_id = None  # random weights: run every reply to max_new_tokens
    return model, tokenizer


def memories(model: MemoryLLM) -> list:
    """Three users: nothing written (no prefix at all), one write, three writes."""
    states = [model.new_memory(seed=s) for s in range(3)]
    g = torch.Generator().manual_seed(1)
    for state, writes in zip(states, (0, 1, 3)):
        for w in range(writes):
            model.inject(state, input_ids=torch.randint(0, 256, (6 + 3 * w,), generator=g), allow_short=True)
    return states


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def alone(model, tokenizer, state, prompt: list[int], n: int) -> list[int]:
    """The greedy tokens of one request run alone (what the unbatched server generates)."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            memory=state, max_new_tokens=n, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("memory_positions, token_shift", [("pool", False), ("per_write", False), ("pool", True)])
def test_a_batch_of_three_users_generates_what_each_generates_alone(memory_positions, token_shift):
    model, tokenizer = tiny(memory_positions, token_shift)
    states = memories(model)
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    expected = [alone(model, tokenizer, s, p, 12) for s, p in zip(states, prompts)]
    batcher = ChatBatcher(model, tokenizer)
    rows = [batcher.submit(s, p, max_new_tokens=12) for s, p in zip(states, prompts)]
    replies = [batcher.wait(row) for row in rows]
    batcher.close()
    assert [row.tokens for row in rows] == expected
    assert batcher.max_batch == 3  # the three rows really ran together
    for reply, s, p in zip(replies, states, prompts):  # and the reply records as generate_reply's
        single = generate_reply(model, tokenizer, s, p, max_new_tokens=12)
        assert (reply.text, reply.completion_tokens, reply.finish_reason) == (
            single.text, single.completion_tokens, single.finish_reason,
        )  # fmt: skip


def batched(model, tokenizer, states, prompts, n: int) -> tuple[list, ChatBatcher, list]:
    """(rows, batcher, the rows it prefilled alone through the model's own forward) of one batch of
    requests submitted at once, run to the end."""
    batcher = ChatBatcher(model, tokenizer)
    prefilled_alone, real = [], batcher._prefill_alone
    batcher._prefill_alone = lambda row: prefilled_alone.append(row) or real(row)
    rows = [batcher.submit(s, p, max_new_tokens=n) for s, p in zip(states, prompts)]
    [batcher.wait(row) for row in rows]
    batcher.close()
    return rows, batcher, prefilled_alone


@pytest.mark.parametrize(
    "isolated_writes, memory_positions, writes_read",
    # per_write with 2 writes read: the prompt's first position lies inside the prefix, not after it
    [(False, "pool", 1), (True, "pool", 1), (True, "per_write", 2)],
    ids=["pool-writes", "isolated-writes", "per-write-positions"],
)
def test_focused_reads_prefill_in_the_packed_step_and_generate_what_each_generates_alone(
    isolated_writes, memory_positions, writes_read
):
    model, tokenizer = tiny(
        memory_positions, focused_writes=writes_read, isolated_writes=isolated_writes, forgetting="oldest"
    )
    states = [model.new_memory(seed=s) for s in range(3)]
    notes = [[], ["Ada keeps the spare key under the blue stone."],
             ["Bo likes tea.", "Ada's locker code is 4711.", "Cy sails on Sundays."]]  # fmt: skip
    for state, texts in zip(states, notes):
        for text in texts:
            model.inject(state, input_ids=torch.tensor(ids(tokenizer, text)), allow_short=True)
    prompts = [ids(tokenizer, p) for p in ("Where is the key?", "Where does Ada keep the key?", "Ada's code?")]
    # an empty memory reads as the base model; the written ones rank a write for their prompt
    assert [model.reads_without_memory(s, torch.tensor(p)) for s, p in zip(states, prompts)] == [True, False, False]
    expected = [alone(model, tokenizer, s, p, 10) for s, p in zip(states, prompts)]
    rows, batcher, prefilled_alone = batched(model, tokenizer, states, prompts, 10)
    assert [row.tokens for row in rows] == expected
    assert [row.role for row in rows] == ["base", "read", "read"] and batcher.max_batch == 3
    assert prefilled_alone == []  # every prompt was prefilled in a packed step


def test_a_request_joining_mid_decode_gets_its_own_tokens_and_streams():
    model, tokenizer = tiny()
    states = memories(model)
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    expected = [alone(model, tokenizer, s, p, n) for s, p, n in zip(states, prompts, (20, 8, 5))]
    batcher = ChatBatcher(model, tokenizer)
    joined = threading.Event()
    deltas: list[list[str]] = [[], [], []]
    late: list = []

    def first_text(text: str) -> None:  # runs in the scheduler: the others join after some tokens
        deltas[0].append(text)
        if len(deltas[0]) == 4 and not joined.is_set():
            joined.set()
            late.extend(
                batcher.submit(s, p, max_new_tokens=n, on_text=deltas[i].append)
                for i, s, p, n in ((1, states[1], prompts[1], 8), (2, states[2], prompts[2], 5))
            )

    first = batcher.submit(states[0], prompts[0], max_new_tokens=20, on_text=first_text)
    replies = [batcher.wait(first)] + [batcher.wait(row) for row in late]
    batcher.close()
    assert joined.is_set() and batcher.max_batch == 3
    assert [first.tokens] + [row.tokens for row in late] == expected
    # streaming: the deltas of each request add up to its reply, token by token
    for reply, parts, n in zip(replies, deltas, (20, 8, 5)):
        assert "".join(parts) == reply.text and reply.completion_tokens == n
    assert len(deltas[0]) > 4
    # the joiners' prefill ran in the same steps as the first request's decoding
    assert batcher.steps < 20 + 8 + 5


def test_a_cancelled_row_leaves_and_the_others_go_on():
    model, tokenizer = tiny()
    states = memories(model)
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    batcher = ChatBatcher(model, tokenizer)
    cancel = threading.Event()
    cancelled = batcher.submit(states[0], prompts[0], max_new_tokens=30, cancel=cancel,
                               on_text=lambda _: cancel.set())  # fmt: skip
    other = batcher.submit(states[1], prompts[1], max_new_tokens=10)
    short, full = batcher.wait(cancelled), batcher.wait(other)
    batcher.close()
    assert short.completion_tokens < 30
    assert other.tokens == alone(model, tokenizer, states[1], prompts[1], 10) and full.completion_tokens == 10


def test_batched_writes_equal_writes_one_at_a_time():
    model, _ = tiny()
    batched, single = memories(model), memories(model)
    g = torch.Generator().manual_seed(2)
    texts = [torch.randint(0, 256, (n,), generator=g) for n in (9, 4, 13)]
    for state, text in zip(single, texts):
        model.inject(state, input_ids=text, allow_short=True, source="s")
    writer = WriteBatcher(model, max_rows=3)
    barrier = threading.Barrier(3)

    def write(state, text):
        barrier.wait()
        inject_batched(model, writer, state, split_into_chunks(text, model.config.chunk_size), "s")

    threads = [threading.Thread(target=write, args=pair) for pair in zip(batched, texts)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    writer.close()
    assert writer.max_batch >= 2
    for a, b in zip(batched, single):
        assert torch.allclose(a.stm, b.stm, atol=1e-5)
        assert torch.equal(a.sources, b.sources) and a.write_count == b.write_count


def test_unbatched_calls_are_unchanged_by_the_packed_attention():
    model, tokenizer = tiny()
    states = memories(model)
    prompt = ids(tokenizer, PROMPTS[1])
    before = alone(model, tokenizer, states[2], prompt, 10)
    ChatBatcher(model, tokenizer).close()  # installs the packed attention implementation
    assert alone(model, tokenizer, states[2], prompt, 10) == before


@pytest.mark.parametrize("focused", [False, True], ids=["retrieved", "focused"])
def test_mplus_rows_that_retrieve_prefill_alone_focused_ones_packed_and_all_decode_in_the_batch(focused):
    from latentmem.config import MPlusConfig
    from latentmem.mplus import MPlus

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = MPlusConfig(
        backbone_config=backbone_config("llama", vocab_size=len(tokenizer)), lora=LORA, num_tokens=4, num_blocks=6,
        num_ltm_blocks=2, selector_hidden_dim=16, update_ltm_frequency=3, promote_on_retrieval=0.0,
        **({"retrieval_unit": "write", "write_ranking": "tokens", "focused_writes": 1} if focused else {}),
    )  # fmt: skip
    model = MPlus(config).eval()
    randomize_lora(model, 0)
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    states = [model.new_memory(seed=s) for s in range(3)]
    for state, writes, text in zip(states, (0, 1, 8), PROMPTS):  # the third has long-term slots to retrieve
        for i in range(writes):
            random = torch.randint(0, 256, (10,), generator=g)
            # focused: the last write shares the prompt's tokens, so a focused read finds it
            own = torch.tensor(ids(tokenizer, text))[:10] if focused and i == writes - 1 else random
            model.inject(state, input_ids=own, allow_short=True)
    assert model.retrieval_count(states[2]) > 0 and model.retrieval_count(states[1]) == 0
    # focused: a read of any written memory attends to the writes its prompt ranks first
    assert model.reads_depend_on_prompt(states[1]) == focused and not model.reads_depend_on_prompt(states[0])
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    expected = [alone(model, tokenizer, s, p, 8) for s, p in zip(states, prompts)]
    rows, batcher, prefilled_alone = batched(model, tokenizer, states, prompts, 8)
    assert [row.tokens for row in rows] == expected and batcher.max_batch == 3
    # a read retrieving into the whole pool prefills alone; a focused read prefills packed
    assert [row.state for row in prefilled_alone] == ([] if focused else [states[2]])
    # a focused model reads an empty memory as its base model: that row decodes in a pack of its own
    assert [row.role for row in rows] == (["base", "read", "read"] if focused else ["read"] * 3)


def test_the_server_answers_the_same_with_and_without_batching(tmp_path):
    import httpx
    from test_server import ALICE, KEYS, TINY, ThreadServer

    from latentmem.models import untrained_model
    from latentmem.server import create_app

    model, tokenizer = untrained_model(**TINY)
    answers = {}
    for batching in (False, True):
        app = create_app(model, tokenizer, data_dir=tmp_path / str(batching), api_keys=KEYS, batching=batching)
        server = ThreadServer(app)
        try:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as c:
                fact = {"text": "Ada's locker code is 4711.", "allow_short": True}
                assert c.post("/v1/memory/inject", json=fact).status_code == 200
                ask = {"messages": [{"role": "user", "content": "Ada's code?"}], "max_tokens": 8, "temperature": 0}
                reply = c.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
                with c.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as events:
                    lines = [line for line in events.iter_lines() if line.startswith("data: {")]
                streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines)
                answers[batching] = (reply, streamed)
        finally:
            server.stop()
    assert answers[True] == answers[False] and answers[True][0] == answers[True][1]


def test_a_batched_step_alone_takes_every_core_and_two_at_once_share_them():
    from latentmem.server.batching import CoreShare

    model, tokenizer = tiny()
    cores, seen = CoreShare(4), []
    batcher = ChatBatcher(model, tokenizer, cores=cores)
    real = batcher._forward  # runs inside a step
    batcher._forward = lambda rows, feeds: seen.append(torch.get_num_threads()) or real(rows, feeds)
    before = torch.get_num_threads()
    batcher.generate(model.new_memory(), ids(tokenizer, "Hi"), max_new_tokens=2)
    assert set(seen) == {4} and torch.get_num_threads() == before  # the caller's own count is untouched
    with cores.step() as alone:  # e.g. a write batch running meanwhile
        batcher.generate(model.new_memory(), ids(tokenizer, "Hi"), max_new_tokens=2)
    batcher.close()
    assert alone == 4 and seen[-1] == 2


def test_two_chat_schedulers_one_prefilling_one_decoding_every_row_give_each_row_its_own_tokens():
    model, tokenizer = tiny()
    states = memories(model)
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    expected = [alone(model, tokenizer, s, p, 12) for s, p in zip(states, prompts)]
    batcher = ChatBatcher(model, tokenizer, workers=2)
    steps, step = [], batcher._step

    def recorded(active, joining):
        steps.append((threading.current_thread().name[-1], len(active), len(joining)))
        return step(active, joining)

    batcher._step = recorded
    rows = [batcher.submit(s, p, max_new_tokens=12) for s, p in zip(states, prompts) for _ in range(3)]
    names = {thread.name for thread in batcher._threads_started}
    batcher.close()  # returns once every row is done, prefilled rows handed over included
    assert names == {"latentmem chat batcher 0", "latentmem chat batcher 1"}
    assert [row.tokens for row in rows] == [e for e in expected for _ in range(3)]
    assert all(active == 0 for worker, active, _ in steps if worker == "1")  # worker 1 only prefills
    assert all(joining == 0 for worker, active, joining in steps if worker == "0" and active)  # 0 decodes
    assert any(worker == "1" for worker, _, _ in steps)

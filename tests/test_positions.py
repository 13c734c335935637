"""Memory positions (`memory_positions`): where slots sit relative to the prompt under RoPE."""

import pytest
import torch
from conftest import make_model, random_ids
from reference import reference_logits

from latentmem.positions import later_slots_of_same_write, slot_positions

K = 8
ATOL = 1e-5


def test_later_slots_count_only_the_same_write_to_the_right():
    sources = torch.tensor([[3, 3, 5, 3, 5, 7]])
    assert later_slots_of_same_write(sources).tolist() == [[2, 1, 1, 0, 0, 0]]


def test_per_write_positions_put_every_write_where_the_newest_one_is():
    # a tiled first write (source 0), then two writes of K slots and the survivors of older ones
    sources = torch.tensor([[0] * K + [1] * 3 + [2] * K])
    positions = slot_positions("per_write", sources, K)
    assert positions[0, :K].tolist() == list(range(1, K + 1))
    assert positions[0, K : K + 3].tolist() == [K - 2, K - 1, K]  # a write's survivors end next to the prompt
    assert positions[0, -K:].tolist() == list(range(1, K + 1))
    tiled = slot_positions("per_write", torch.zeros(1, 4 * K, dtype=torch.long), K)
    assert tiled[0].tolist() == list(range(1, K + 1)) * 4
    assert slot_positions("pool", sources, K).tolist() == [list(range(1, 2 * K + 4))]
    assert set(slot_positions("fixed", sources, K).view(-1).tolist()) == {K}


def written_state(model, writes=6):
    state = model.new_memory(seed=1)
    for i in range(writes):
        model.inject(state, input_ids=random_ids(12 + 3 * i, seed=40 + i), allow_short=True)
    return state


@pytest.mark.parametrize("scheme", ["per_write", "fixed"])
def test_reads_match_the_reference_with_the_layouts_positions(scheme):
    model = make_model(num_tokens=K, memory_positions=scheme)
    state = written_state(model)
    expected = slot_positions(scheme, state.sources, K)
    if scheme == "per_write":  # by hand, independently of the library: K - (later slots of the same write)
        for layer in range(state.num_layers):
            row = state.sources[layer].tolist()
            by_hand = [K - row[j + 1 :].count(source) % K for j, source in enumerate(row)]
            assert expected[layer].tolist() == by_hand
    ids = random_ids(7, seed=5)
    with torch.no_grad():
        got = model(ids, memory=state).logits
    want = reference_logits(model, state.stm, ids, slot_positions=expected, prompt_start=K + 1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_per_write_reads_do_not_depend_on_how_old_a_write_is():
    # Two states holding the same two writes in opposite pool order read the same under per_write,
    # and differently under the release's pool order.
    model = make_model(num_tokens=K, num_blocks=2, memory_positions="per_write")
    first, second = torch.randn(3, K, 64), torch.randn(3, K, 64)
    ids = random_ids(6, seed=2)
    logits = {}
    for scheme in ("per_write", "pool"):
        model.config.memory_positions = scheme
        for name, pool in (("ab", [first, second]), ("ba", [second, first])):
            state = model.new_memory()
            sources = torch.tensor([0] * K + [1] * K).expand(3, -1).clone()
            state.replace_pool(torch.cat(pool, dim=1), torch.zeros(3, 2 * K, dtype=torch.long), sources)
            with torch.no_grad():
                logits[scheme, name] = model(ids, memory=state).logits
    torch.testing.assert_close(logits["per_write", "ab"], logits["per_write", "ba"], atol=ATOL, rtol=0)
    assert (logits["pool", "ab"] - logits["pool", "ba"]).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", ["per_write", "fixed"])
def test_greedy_generation_numbers_new_tokens_after_the_prompt(scheme):
    model = make_model(num_tokens=K, memory_positions=scheme)
    state = written_state(model)
    ids = random_ids(5, seed=9)
    out = model.generate(ids, memory=state, max_new_tokens=4, do_sample=False)
    expected = slot_positions(scheme, state.sources, K)
    sequence = ids
    for _ in range(4):  # recompute the whole sequence each step, positions from the reference
        logits = reference_logits(model, state.stm, sequence, slot_positions=expected, prompt_start=K + 1)
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == sequence.tolist()


def test_the_release_layout_is_the_default_and_a_single_write_reads_alike_in_every_layout():
    assert make_model().config.memory_positions == "pool"
    ids = random_ids(6, seed=4)
    reads = []
    for scheme in ("pool", "per_write"):
        model = make_model(num_tokens=K, num_blocks=1, memory_positions=scheme)
        state = model.new_memory()
        model.inject(state, input_ids=random_ids(20, seed=3))
        with torch.no_grad():
            reads.append(model(ids, memory=state).logits)
    torch.testing.assert_close(reads[0], reads[1], atol=ATOL, rtol=0)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="memory_positions"):
        make_model(memory_positions="sideways")

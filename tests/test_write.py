"""Writing (SPEC §2): new slots match the independent reference for every case and backbone."""

import pytest
import torch

from latentmem.writing import compute_new_slots, split_into_chunks

from conftest import make_model, random_ids
from reference import reference_new_slots

FAMILIES = ["llama", "llama-linear-rope", "mistral", "qwen2"]
ATOL = 1e-5


def written_state(model, seed=0):
    """A state whose pool holds distinct random slots (so 'the last K slots' is meaningful)."""
    state = model.new_memory(seed=seed)
    g = torch.Generator().manual_seed(seed)
    state.stm = torch.randn(state.shape, generator=g)
    return state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [40, 8, 5])  # n > K, n == K, n < K (K = 8)
def test_new_slots_match_reference_on_written_pool(family, n):
    model = make_model(family)
    state = written_state(model)
    ids = random_ids(n, seed=n)
    model.adapters.activate("write")
    got = compute_new_slots(model, state, ids)
    want = reference_new_slots(model, state.stm, ids, adapter="default")
    assert got.shape == (3, 8, 64)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [20, 5])
def test_first_write_into_empty_pool_runs_context_alone(family, n):
    model = make_model(family)
    state = model.new_memory()
    ids = random_ids(n, seed=1)
    model.adapters.activate("write")
    got = compute_new_slots(model, state, ids)
    want = reference_new_slots(model, None, ids, adapter="default")
    assert got.shape == (3, min(8, n), 64)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_inject_writes_reference_slots_as_newest_k_with_the_write_adapter():
    model = make_model()
    state = written_state(model)
    before = state.stm.clone()
    ids = random_ids(40, seed=3)
    model.inject(state, input_ids=ids)
    want = reference_new_slots(model, before, ids, adapter="default")
    torch.testing.assert_close(state.stm[:, -8:], want, atol=ATOL, rtol=0)
    wrong = reference_new_slots(model, before, ids, adapter="decoder_adapter")  # the read adapter
    assert (state.stm[:, -8:] - wrong).abs().max() > 1e-3


def test_without_bos_embedding_prefix_is_memory_only():
    model = make_model(add_bos_embedding=False)
    assert model.bos_embedding is None
    state = written_state(model)
    for n in (30, 4):
        ids = random_ids(n, seed=n)
        model.adapters.activate("write")
        got = compute_new_slots(model, state, ids)
        torch.testing.assert_close(got, reference_new_slots(model, state.stm, ids), atol=ATOL, rtol=0)


def test_without_lora_the_plain_projections_are_used():
    model = make_model(lora=None)
    state = written_state(model)
    ids = random_ids(20)
    got = compute_new_slots(model, state, ids)
    torch.testing.assert_close(got, reference_new_slots(model, state.stm, ids, adapter=None), atol=ATOL, rtol=0)


def test_short_context_is_refused_unless_allowed():
    model = make_model()
    state = model.new_memory()
    with pytest.raises(ValueError, match=r"context has 9 tokens.*allow_short=True"):
        model.inject(state, input_ids=random_ids(9))
    assert not state.initialized and state.write_count == 0 and not state.injections
    result = model.inject(state, input_ids=random_ids(9), allow_short=True)
    assert result.tokens == 9 and state.initialized


@pytest.mark.parametrize("bad", [torch.zeros(1, 0, dtype=torch.long), [], torch.zeros(2, 20, dtype=torch.long)])
def test_empty_or_batched_input_is_refused(bad):
    model = make_model()
    with pytest.raises(ValueError):
        model.inject(model.new_memory(), input_ids=bad, allow_short=True)


def test_out_of_vocabulary_ids_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="vocabulary"):
        model.inject(model.new_memory(), input_ids=torch.full((20,), 500))


def test_text_needs_a_tokenizer_and_exactly_one_input():
    model = make_model()
    with pytest.raises(ValueError, match="tokenizer"):
        model.inject(model.new_memory(), text="hello there")
    with pytest.raises(ValueError, match="exactly one"):
        model.inject(model.new_memory())


def test_text_is_tokenized_without_special_tokens():
    class Tok:
        def __call__(self, text, add_special_tokens=True, return_tensors=None):
            assert add_special_tokens is False
            ids = torch.tensor([[ord(c) % 97 for c in text]])
            return type("Enc", (), {"input_ids": ids})()

    model = make_model()
    state = model.new_memory()
    result = model.inject(state, text="a context of more than sixteen characters", tokenizer=Tok())
    assert result.tokens == len("a context of more than sixteen characters")


def test_long_context_is_chunked_and_each_chunk_is_one_write():
    model = make_model(chunk_size=32)
    state = model.new_memory()
    result = model.inject(state, input_ids=random_ids(70))
    assert result.chunks == 3 and state.write_count == 3
    assert result.slots_written == 3 * 8
    assert set(state.surviving_slots()) == {result.injection_id}


def test_chunks_are_near_equal_and_never_exceed_chunk_size():
    sizes = [c.numel() for c in split_into_chunks(torch.arange(1040), 512)]
    assert sizes == [347, 347, 346]
    assert [c.numel() for c in split_into_chunks(torch.arange(512), 512)] == [512]
    assert torch.equal(torch.cat(split_into_chunks(torch.arange(1040), 512)), torch.arange(1040))


def test_inject_records_provenance():
    model = make_model()
    state = model.new_memory()
    first = model.inject(state, input_ids=random_ids(20), source="chat:1")
    second = model.inject(state, input_ids=random_ids(20, seed=1), source="doc")
    assert (first.injection_id, second.injection_id) == (0, 1)
    assert state.injections[1].source == "doc" and state.injections[0].tokens == 20
    assert (state.sources[:, -8:] == 1).all()
    assert (state.ages[:, -8:] == 0).all()


def test_token_shift_adds_the_previous_tokens_mapped_embedding_to_written_tokens():
    model = make_model(token_shift=True)
    state = written_state(model)
    ids = random_ids(20, seed=4)
    model.adapters.activate("write")
    # starts as a no-op
    torch.testing.assert_close(compute_new_slots(model, state, ids), reference_new_slots(model, state.stm, ids), atol=ATOL, rtol=0)
    with torch.no_grad():
        model.token_shift.weight.copy_(torch.randn(64, 64) * 0.1)
        embed = model.backbone.model.embed_tokens
        shifted = embed(ids) + torch.nn.functional.pad(embed(ids), (0, 0, 1, 0))[:, :-1] @ model.token_shift.weight.T
        original = embed.weight.clone()
        got = compute_new_slots(model, state, ids)
        # the reference with token embeddings replaced by the shifted ones
        embed.weight = torch.nn.Parameter(torch.cat([original, shifted[0]]))
        want = reference_new_slots(model, state.stm, torch.arange(97, 97 + 20)[None])
        embed.weight = torch.nn.Parameter(original)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - reference_new_slots(model, state.stm, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_writes_into_several_states_equal_one_at_a_time(family):
    """Training writes one context into each of several states at once: empty and written pools,
    contexts shorter than, equal to and longer than K. Slots, pools and ids match `inject` one by one."""
    from latentmem.writing import compute_new_slots_batch, inject_batch

    model = make_model(family, token_shift=True)
    torch.nn.init.normal_(model.token_shift.weight, std=0.1)
    contexts = [random_ids(n, seed=500 + n)[0] for n in (3, 8, 20, 11)]

    def states():
        return [written_state(model, seed=i) for i in range(3)] + [model.new_memory(seed=3)]  # the last is empty

    model.adapters.activate("write")
    batch_states = states()
    slots = compute_new_slots_batch(model, batch_states[:3], contexts[:3])
    for state, context, got in zip(batch_states, contexts, slots):
        torch.testing.assert_close(got, compute_new_slots(model, state, context), atol=ATOL, rtol=0)
    one_by_one = states()
    ids = inject_batch(model, batch_states, contexts, source="train")
    expected = [model.inject(s, input_ids=c, allow_short=True, source="train").injection_id
                for s, c in zip(one_by_one, contexts)]  # fmt: skip
    assert ids == expected
    for a, b in zip(batch_states, one_by_one):
        torch.testing.assert_close(a.stm, b.stm, atol=ATOL, rtol=0)
        assert torch.equal(a.sources, b.sources) and a.write_count == b.write_count
    with pytest.raises(ValueError, match="each state once"):
        inject_batch(model, [batch_states[0], batch_states[0]], contexts[:2])

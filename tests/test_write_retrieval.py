"""M+ retrieval of whole writes (`retrieval_unit="write"`) and M+ reads in the per-write layout."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LORA, backbone_config, random_ids, randomize_lora
from reference import layer_forward, rms_norm

from latentmem.config import MPlusConfig
from latentmem.ltm.recall import top_writes
from latentmem.ltm.store import LongTermStore
from latentmem.mplus import MPlus
from latentmem.positions import slot_positions

K = 8


def make_mplus(seed=0, **overrides) -> MPlus:
    torch.manual_seed(seed)
    fields = dict(num_tokens=K, num_blocks=6, num_ltm_blocks=2, selector_hidden_dim=16, promote_on_retrieval=0.0)
    model = MPlus(MPlusConfig(backbone_config=backbone_config(), lora=LORA, **{**fields, **overrides})).eval()
    randomize_lora(model, seed)
    return model


def filled(model, writes, seed=0):
    state = model.new_memory(seed=seed)
    for i in range(writes):
        model.inject(state, input_ids=random_ids(20, seed=100 + i), source=f"doc{i}")
    return state


def store_of_writes(scores_by_write: list[float], sizes: list[int], key_dim=4) -> LongTermStore:
    """A one-layer store: write w holds sizes[w] slots whose keys make a query of ones score ~scores_by_write[w]."""
    store = LongTermStore(1, 2, key_dim, dtype=torch.float32)
    for source, (score, size) in enumerate(zip(scores_by_write, sizes)):
        keys = torch.full((size, key_dim), score / key_dim)
        keys[:, 0] += torch.linspace(0, 0.01, size)  # distinct scores within a write
        store.add(0, torch.randn(size, 2), keys, torch.full((size,), source, dtype=torch.long))
    return store


def test_the_best_writes_come_back_whole_in_write_order():
    store = store_of_writes([0.0, 3.0, -2.0, 5.0, 1.0], sizes=[K, K, K, K, K])
    chosen = top_writes(store, 0, torch.ones(1, 4), 2 * K, candidates=4)
    assert store.sources(0)[chosen].tolist() == [1] * K + [3] * K  # the two best writes, older first
    assert chosen.tolist() == list(range(K, 2 * K)) + list(range(3 * K, 4 * K))


def test_a_write_that_does_not_fit_is_cut_to_its_newest_slots_and_short_writes_leave_room():
    store = store_of_writes([5.0, 4.0, 3.0], sizes=[3, K, K])
    chosen = top_writes(store, 0, torch.ones(1, 4), 2 * K, candidates=4)
    sources = store.sources(0)[chosen].tolist()
    assert sources == [0] * 3 + [1] * K + [2] * (K - 3)
    assert chosen[-(K - 3) :].tolist() == list(range(3 + K + 3, 3 + 2 * K))  # write 2's newest slots


def test_write_retrieval_reads_the_writes_slot_retrieval_would_not_bring_whole():
    model = make_mplus(retrieval_unit="write", retrieved_slots_position="before_newest_write")
    state = filled(model, 7)
    ids = random_ids(6, seed=3)
    seen = []

    def spy(model, state, layer, normed, count):
        from latentmem.ltm.recall import retrieve

        slots, sources = retrieve(model, state, layer, normed, count)
        seen.append(sources)
        return slots, sources

    with torch.no_grad():
        got = model(ids, memory=state, retrieve_fn=spy).logits
        plain = model(ids, memory=state).logits
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
    for layer, sources in enumerate(seen):
        everything = state.ltm.sources(layer)
        cut = [s for s in sources.unique() if int((sources == s).sum()) != int((everything == s).sum())]
        assert len(cut) <= 1  # every retrieved write is there whole, but for one cut to fit the read
        assert sources.tolist() == sorted(sources.tolist())  # write order


def reference_per_write_logits(model, state, ids, retrieved_by_layer):
    """M+ read in the per-write layout from raw weights, with the given (slots, sources) per layer."""
    cfg = model.backbone.config
    h = F.embedding(ids.view(1, -1), model.backbone.model.embed_tokens.weight)
    n = h.shape[1]
    split = state.num_slots - K  # before_newest_write
    for i, layer in enumerate(model.backbone.model.layers):
        slots, sources = retrieved_by_layer[i]
        stm_pos = slot_positions("per_write", state.sources[i : i + 1], K)[0]
        got_pos = slot_positions("per_write", sources[None], K)[0]
        z = torch.cat([model.bos_embedding[i], state.stm[i][:split], slots.float(), state.stm[i][split:], h[0]])[None]
        positions = torch.cat([torch.zeros(1, dtype=torch.long), stm_pos[:split], got_pos, stm_pos[split:],
                               K + 1 + torch.arange(n)])  # fmt: skip
        h = layer_forward(layer, z, z.shape[1] - n, cfg, "decoder_adapter", positions)
    h = rms_norm(model.backbone.model.norm, h)
    return F.linear(h, model.backbone.lm_head.weight)


@pytest.mark.parametrize("unit", ["slot", "write"])
def test_mplus_reads_in_the_per_write_layout_match_the_reference(unit):
    model = make_mplus(memory_positions="per_write", retrieval_unit=unit, retrieved_slots_position="before_newest_write")
    state = filled(model, 6)
    ids = random_ids(6, seed=3)
    retrieved = []

    def record(model, state, layer, normed, count):
        from latentmem.ltm.recall import retrieve

        result = retrieve(model, state, layer, normed, count)
        retrieved.append(result)
        return result

    with torch.no_grad():
        got = model(ids, memory=state, retrieve_fn=record).logits
        want = reference_per_write_logits(model, state, ids, retrieved)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_cached_generation_steps_in_the_per_write_layout_equal_a_fresh_read():
    model = make_mplus(memory_positions="per_write", retrieval_unit="write", retrieved_slots_position="before_newest_write")
    state = filled(model, 6)
    ids = random_ids(6, seed=3)
    retrieved = []

    def record(model, state, layer, normed, count):
        from latentmem.ltm.recall import retrieve

        retrieved.append(retrieve(model, state, layer, normed, count))
        return retrieved[-1]

    with torch.no_grad():
        first = model(ids, memory=state, use_cache=True, retrieve_fn=record)
        token = first.logits[:, -1:].argmax(-1)
        step = model(token, memory=state, cache=first.cache)
        # the whole sequence read afresh, with the prompt's retrieval: the step numbered its token right
        whole = model(torch.cat([ids, token], 1), memory=state, retrieve_fn=lambda m, s, layer, x, c: retrieved[layer])
    torch.testing.assert_close(step.logits[0, -1], whole.logits[0, -1], atol=1e-4, rtol=0)
    out = model.generate(ids, memory=state, max_new_tokens=2, do_sample=False)
    assert out[0, 6].item() == token.item()


def test_unknown_retrieval_unit_is_refused():
    with pytest.raises(ValueError, match="retrieval_unit"):
        make_mplus(retrieval_unit="paragraph")


def test_per_write_short_term_prefix_is_computed_once_whatever_the_retrieved_count():
    # In pool order the retrieved slots shift the short-term ones (a gap); per write nothing moves.
    model = make_mplus(memory_positions="per_write", retrieved_slots_position="before_newest_write")
    state = filled(model, 6)
    first = model.prefix_cache.get(model, state, start=1, with_bos=False, gap=(state.num_slots - K, K))
    again = model.prefix_cache.get(model, state, start=1, with_bos=False, gap=(state.num_slots - K, 2 * K))
    assert again is first
    model.config.memory_positions = "pool"
    assert model.prefix_cache.get(model, state, start=1, with_bos=False, gap=(state.num_slots - K, K)) is not first

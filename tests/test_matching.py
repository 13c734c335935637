"""Whole writes ranked once per prompt at the first layer (ltm/matching.py, `write_ranking="first_layer"`)."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_mplus import filled, make_mplus

from latentmem.config import MPlusConfig
from latentmem.ltm.matching import match_projection, match_vectors, rank_writes
from latentmem.ltm.store import LongTermStore


def test_the_projection_is_fixed_forever_because_saved_memories_hold_keys_made_with_it():
    p = match_projection(8, 4)
    assert p.shape == (4, 8) and torch.allclose(p @ p.T, torch.eye(4), atol=1e-6)  # orthonormal rows
    assert torch.equal(p, match_projection(8, 4))
    # Pinned: changing the seed or the generator would silently break every saved first-layer memory.
    pinned = [-0.017692, -0.602076, 0.288209, -0.170592, 0.138684, -0.246471, 0.393009, 0.539063]
    assert p[0].tolist() == pytest.approx(pinned, abs=1e-5)
    with pytest.raises(ValueError, match="selector_hidden_dim"):
        match_projection(8, 16)
    v = match_vectors(torch.randn(3, 8), p)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3))


def _store_with_writes(vectors_per_write: dict[int, torch.Tensor]) -> LongTermStore:
    store = LongTermStore(1, 6, 6, dtype=torch.float32)
    for write, vectors in vectors_per_write.items():
        keys = F.normalize(vectors, dim=-1)
        store.add(0, vectors, keys, torch.full((len(vectors),), write))
    return store


def test_writes_rank_by_late_interaction_every_prompt_token_counts():
    e = torch.eye(6)
    # write 1 holds tokens a, b; write 2 only a; write 3 only c; the prompt asks with a and b
    store = _store_with_writes({1: e[[0, 1]], 2: e[[0, 4]], 3: e[[2, 5]], 4: e[[3]]})
    ranked = rank_writes(store, 0, e[[0, 1]], per_token=1)
    assert ranked[0].item() == 1  # matches both prompt tokens (2 + ...), write 2 only one
    ranked = rank_writes(store, 0, e[[0, 1]], per_token=8)  # every write a candidate: a full order
    assert ranked.tolist()[:2] == [1, 2] and sorted(ranked.tolist()) == [1, 2, 3, 4]
    assert rank_writes(LongTermStore(1, 6, 6, dtype=torch.float32), 0, e[[0]], per_token=4).numel() == 0
    # max_writes: only the best candidates by the slots found are scored in full and ranked
    assert rank_writes(store, 0, e[[0, 1]], per_token=8, max_writes=2).tolist() == [1, 2]


def test_config_refuses_first_layer_ranking_of_single_slots():
    with pytest.raises(ValueError, match="retrieval_unit='write'"):
        MPlusConfig(write_ranking="first_layer", num_blocks=4, num_ltm_blocks=1)
    with pytest.raises(ValueError, match="write_ranking"):
        MPlusConfig(retrieval_unit="write", write_ranking="every_layer", num_blocks=4, num_ltm_blocks=1)


def test_first_layer_keys_are_match_vectors_and_every_layer_reads_the_writes_ranked_at_the_first(monkeypatch):
    from latentmem.ltm import recall

    model = make_mplus(retrieval_unit="write", write_ranking="first_layer")
    assert "first-layer" in model.fingerprint and "first-layer" not in make_mplus(retrieval_unit="write").fingerprint
    state = filled(model, writes=8)
    layer0 = model.decoder.layers[0]
    stored = state.ltm.get(0, torch.arange(state.ltm.size(0)))
    want = match_vectors(layer0.input_layernorm(stored["slots"].to(model.dtype)), model.match_projection)
    torch.testing.assert_close(stored["keys"], want, atol=1e-5, rtol=0)  # the store holds match vectors at layer 0

    rankings, reads = [], []
    original_rank, original_collect = recall.rank_writes, recall.collect_writes
    monkeypatch.setattr(recall, "rank_writes", lambda *a, **kw: rankings.append(original_rank(*a, **kw)) or rankings[-1])
    monkeypatch.setattr(recall, "collect_writes", lambda store, layer, ranked, count, fill=None, per_write=None:
                        reads.append((layer, ranked)) or original_collect(store, layer, ranked, count, fill, per_write))  # fmt: skip
    ids = torch.randint(3, 60, (1, 7))
    model(ids, memory=state)
    assert len(rankings) == 1  # ranked once per prompt
    assert [layer for layer, _ in reads] == list(range(state.num_layers))
    assert all(ranked is rankings[0] for _, ranked in reads)  # every layer reads the same writes
    best = rankings[0][0].item()
    chosen = original_collect(state.ltm, 1, rankings[0], model.config.retrieved_slots)
    assert best in state.ltm.sources(1)[chosen].tolist()


def test_answering_write_found_uses_the_shared_ranking():
    from latentmem.training.retriever import answering_write_found

    model = make_mplus(retrieval_unit="write", write_ranking="first_layer")
    state = filled(model, writes=8)
    sources = state.ltm.sources(0)
    target = sources[0].item()
    ids = torch.randint(3, 60, (6,))
    found = answering_write_found(model, state, ids, target)
    assert 0.0 <= found <= 1.0
    assert answering_write_found(model, state, ids, 10**6) == 0.0
    assert math.isfinite(found)


def test_a_write_contributes_at_most_per_write_slots_so_tiled_copies_do_not_fill_the_read():
    from latentmem.ltm.recall import collect_writes

    e = torch.eye(6)
    store = _store_with_writes({1: e[[0, 1, 2, 3, 4, 5, 0, 1]], 2: e[[2, 3]], 3: e[[4]]})
    chosen = collect_writes(store, 0, [1, 2, 3], count=5, per_write=2)
    assert store.sources(0)[chosen].tolist() == [1, 1, 2, 2, 3]  # write order; write 1 capped at 2
    assert chosen[:2].tolist() == [6, 7]  # write 1's newest slots
    assert store.sources(0)[collect_writes(store, 0, [1, 2, 3], count=5)].tolist() == [1] * 5  # uncapped


def test_positions_of_finds_exactly_the_slots_of_the_wanted_writes():
    import numpy as np

    from latentmem.ltm.matching import positions_of

    rng = np.random.default_rng(0)
    for _ in range(100):  # sources include ids outside the wanted range on both sides, and -1 (external)
        sources = rng.integers(-1, 40, 200)
        wanted = rng.choice(np.arange(0, 45), rng.integers(1, 6), replace=False)
        assert positions_of(sources, wanted).tolist() == np.flatnonzero(np.isin(sources, wanted)).tolist()

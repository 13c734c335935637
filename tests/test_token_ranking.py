"""Whole writes ranked by their tokens (`write_ranking="tokens"`, ltm/matching.py)."""

import pytest
import torch
import torch.nn.functional as F
from test_mplus import make_mplus, random_ids

from latentmem.ltm.matching import distinct_first, rank_writes_by_tokens
from latentmem.ltm.store import LongTermStore


def _store(tokens_per_write: dict[int, list[int]], width: int = 32) -> tuple[LongTermStore, torch.Tensor]:
    """A store whose writes hold these tokens; token t's key is row t of a random orthonormal basis."""
    basis = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(0)))[0]
    store = LongTermStore(1, 4, width, dtype=torch.float32)
    for write, tokens in tokens_per_write.items():
        store.add_write_tokens(write, basis[sorted(set(tokens))])
    return store, basis


def test_a_rare_shared_token_outweighs_common_ones():
    # token 0 ("the") is in every write, token 1 in two, token 9 ("Biscuit") only in write 3
    store, basis = _store({1: [0, 1, 2], 2: [0, 1, 3], 3: [0, 9, 4], 4: [0, 5], 5: [0, 6], 6: [0, 7]})
    ranked = rank_writes_by_tokens(store, basis[[0, 1, 9]], per_token=128)
    assert ranked[0].item() == 3  # the rare token decides
    assert sorted(ranked[1:].tolist()) == [1, 2]  # the two writes holding token 1 follow
    assert 4 not in ranked.tolist()  # a token in every write weighs nothing: no shared rare token, no rank
    assert rank_writes_by_tokens(LongTermStore(1, 4, 32), basis[[0]], 128).numel() == 0


def test_a_token_found_in_per_token_writes_or_more_counts_as_common():
    store, basis = _store({w: [0, w] for w in range(1, 21)} | {21: [0, 30]})
    assert rank_writes_by_tokens(store, basis[[0, 30]], per_token=8).tolist() == [21]
    # near but not the same token (cosine 0.8 < TOKEN_MATCH) does not match
    near = F.normalize(basis[30] + 0.75 * basis[31], dim=0)
    assert rank_writes_by_tokens(store, near[None], per_token=8).numel() == 0


def test_distinct_first_keeps_each_tokens_first_position_in_order():
    assert distinct_first(torch.tensor([5, 3, 5, 7, 3, 9])).tolist() == [0, 1, 3, 5]


def test_writes_index_their_tokens_and_a_read_retrieves_the_write_holding_the_prompts_rare_tokens(monkeypatch):
    from latentmem.ltm import recall

    model = make_mplus(retrieval_unit="write", write_ranking="tokens", update_ltm_frequency=100)
    assert "-tokens" in model.fingerprint
    state = model.new_memory(seed=0)
    contexts = [random_ids(20, seed=100 + i) for i in range(10)]
    for context in contexts:
        model.inject(state, input_ids=context)
    sources = state.ltm.token_sources()
    first_write = min(state.injections)
    assert (sources == first_write).sum() == len(torch.unique(contexts[0]))  # one key per distinct token
    rankings = []
    original = recall.rank_writes_by_tokens
    monkeypatch.setattr(recall, "rank_writes_by_tokens", lambda *a: rankings.append(original(*a)) or rankings[-1])
    evicted = [w for w in torch.unique(state.ltm.sources(0)).tolist()]
    target = evicted[0]
    target_context = contexts[sorted(state.injections).index(target)]
    others = torch.cat([c for i, c in enumerate(contexts) if sorted(state.injections)[i] != target])
    rare = target_context[~torch.isin(target_context, others)][:4]
    assert len(rare), "random contexts share every token: pick another seed"
    model(rare[None], memory=state)
    assert len(rankings) == 1 and rankings[0][0].item() == target
    chosen = recall.collect_writes(state.ltm, 0, rankings[0], model.config.retrieved_slots, per_write=model.config.num_tokens)
    assert target in state.ltm.sources(0)[chosen].tolist()


def test_token_keys_go_with_the_writes_slots_and_survive_save_and_open(tmp_path):
    model = make_mplus(retrieval_unit="write", write_ranking="tokens", update_ltm_frequency=100)
    state = model.new_memory(seed=0)
    for i in range(6):
        model.inject(state, input_ids=random_ids(20, seed=200 + i))
    before = state.ltm.token_sources().clone()
    state.ltm.save(tmp_path / "ltm")
    opened = LongTermStore.open(tmp_path / "ltm")
    assert torch.equal(opened.token_sources(), before)
    assert torch.equal(opened.token_keys(torch.arange(len(before))), state.ltm.token_keys(torch.arange(len(before))))
    assert torch.equal(opened.copy().token_sources(), before)
    gone = int(before[0])
    model.forget(state, injection_ids=[gone])
    assert gone not in state.ltm.token_sources().tolist()  # forgetting a write forgets its tokens too


def test_a_write_with_no_slot_left_loses_its_token_keys():
    model = make_mplus(retrieval_unit="write", write_ranking="tokens", update_ltm_frequency=1, decay_frequency=100.0)
    state = model.new_memory(seed=0)
    for i in range(12):
        model.inject(state, input_ids=random_ids(20, seed=300 + i))
    alive = set(state.sources.reshape(-1).tolist()) | {
        s for i in range(state.num_layers) for s in state.ltm.sources(i).tolist()}  # fmt: skip
    assert set(state.ltm.token_sources().tolist()) <= alive
    assert len(set(state.ltm.token_sources().tolist())) < 12  # decay deleted whole writes, and their tokens


def test_other_rankings_index_no_tokens():
    model = make_mplus(retrieval_unit="write", write_ranking="first_layer")
    state = model.new_memory(seed=0)
    model.inject(state, input_ids=random_ids(20, seed=1))
    assert state.ltm.token_sources().numel() == 0
    with pytest.raises(ValueError, match="retrieval_unit='write'"):
        make_mplus(write_ranking="tokens")


def test_indexed_writes_counts_distinct_writes_in_any_order():
    store = LongTermStore(1, 4, 8)
    assert store.indexed_writes() == 0
    for write, n in [(3, 2), (5, 3), (5, 1), (7, 1)]:
        store.add_write_tokens(write, torch.randn(n, 8))
    assert store.indexed_writes() == 3
    store.add_write_tokens(4, torch.randn(1, 8))  # out of order (not how writes arrive, but counted right)
    assert store.indexed_writes() == 4

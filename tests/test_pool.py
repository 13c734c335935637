"""Pool update and decay (SPEC §4): tiling, random forgetting, order, ages, determinism."""

import math

import torch

from latentmem.pool import tile_to_fill, write_slots
from latentmem.state import EXTERNAL, MemoryState

from conftest import make_model, random_ids


def state(L=2, N=32, d=4, seed=0):
    return MemoryState(L, N, d, seed=seed)


def slots(L, k, d, value):
    return torch.full((L, k, d), float(value))


def test_first_write_tiles_new_slots_to_fill_the_pool():
    s = state(N=32)
    new = torch.arange(2 * 8 * 4, dtype=torch.float).view(2, 8, 4)
    write_slots(s, new, injection_id=0, per_layer=False)
    assert torch.equal(s.stm, new.repeat(1, 4, 1))
    assert s.initialized and s.write_count == 1 and (s.sources == 0).all() and (s.ages == 0).all()


def test_first_write_of_fewer_slots_than_fit_ends_with_a_partial_copy():
    new = torch.arange(5, dtype=torch.float).view(1, 5, 1)
    tiled = tile_to_fill(new, 32)  # 6 copies, then the last 2 slots
    assert tiled.view(-1).tolist() == [0, 1, 2, 3, 4] * 6 + [3, 4]


def test_short_first_injection_tiles_its_slots():
    model = make_model()  # K = 8, N = 32
    s = model.new_memory()
    model.inject(s, input_ids=random_ids(5), allow_short=True)
    assert torch.equal(s.stm[:, :5], s.stm[:, 5:10])
    assert torch.equal(s.stm[:, -2:], s.stm[:, 3:5])


def test_later_write_forgets_k_keeps_order_and_appends_newest_last():
    s = state(L=2, N=32)
    s.stm = torch.arange(32, dtype=torch.float).view(1, 32, 1).expand(2, 32, 4)
    write_slots(s, slots(2, 8, 4, -1), injection_id=7, per_layer=False)
    kept = s.stm[0, :24, 0]
    assert len(set(kept.tolist())) == 24 and (kept.diff() > 0).all()  # 24 distinct survivors, in order
    assert (s.stm[:, -8:] == -1).all() and (s.sources[:, -8:] == 7).all()
    assert (s.sources[:, :24] == EXTERNAL).all()
    assert (s.ages[:, :24] == 1).all() and (s.ages[:, -8:] == 0).all()
    assert torch.equal(s.stm[0], s.stm[1])  # one draw shared by all layers


def test_per_layer_drop_draws_each_layer_independently():
    s = state(L=4, N=32)
    s.stm = torch.arange(32, dtype=torch.float).view(1, 32, 1).expand(4, 32, 4)
    write_slots(s, slots(4, 8, 4, -1), injection_id=0, per_layer=True)
    survivors = {tuple(s.stm[layer, :24, 0].tolist()) for layer in range(4)}
    assert len(survivors) > 1
    for layer in range(4):
        assert (s.stm[layer, :24, 0].diff() > 0).all()


def test_model_config_per_layer_drop_is_honoured():
    model = make_model(drop_memory_per_layer=True)
    s = model.new_memory(seed=3)
    for i in range(4):
        model.inject(s, input_ids=random_ids(20, seed=i))
    assert not torch.equal(s.sources[0], s.sources[1])


def test_survival_after_t_writes_follows_exponential_decay():
    N, K, t, trials = 64, 8, 5, 400
    fractions = []
    for seed in range(trials):
        s = state(L=1, N=N, d=1, seed=seed)
        write_slots(s, slots(1, K, 1, 0), injection_id=0, per_layer=False)  # fill
        write_slots(s, slots(1, K, 1, 1), injection_id=1, per_layer=False)  # the tracked write
        for j in range(t):
            write_slots(s, slots(1, K, 1, 2 + j), injection_id=2 + j, per_layer=False)
        fractions.append((s.sources == 1).sum().item() / K)
    fractions = torch.tensor(fractions)
    expected = (1 - K / N) ** t
    bound = 4 * fractions.std().item() / math.sqrt(trials)
    assert abs(fractions.mean().item() - expected) < bound, (fractions.mean().item(), expected, bound)


def test_same_seed_same_forgetting_other_seed_differs():
    model = make_model()
    runs = []
    for seed in (5, 5, 6):
        s = model.new_memory(seed=seed)
        for i in range(4):
            model.inject(s, input_ids=random_ids(20, seed=i))
        runs.append(s)
    assert torch.equal(runs[0].stm, runs[1].stm) and torch.equal(runs[0].sources, runs[1].sources)
    assert not torch.equal(runs[0].sources, runs[2].sources)


def test_forgetting_does_not_touch_the_global_rng():
    model = make_model()
    s = model.new_memory(seed=1)
    model.inject(s, input_ids=random_ids(20))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model.inject(s, input_ids=random_ids(20, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_surviving_slots_counts_per_injection():
    s = state(L=2, N=32)
    write_slots(s, slots(2, 8, 4, 0), injection_id=0, per_layer=False)
    write_slots(s, slots(2, 8, 4, 1), injection_id=1, per_layer=False)
    counts = s.surviving_slots()
    assert counts[1] == 2 * 8 and counts[0] == 2 * 24


def test_forget_removes_exactly_one_sources_slots_and_keeps_the_pool_full():
    model = make_model()
    s = model.new_memory(seed=2)
    model.inject(s, input_ids=random_ids(20, seed=0), source="a")
    model.inject(s, input_ids=random_ids(20, seed=1), source="secret")
    model.inject(s, input_ids=random_ids(20, seed=2), source="b")
    secret_slots = s.stm[s.sources == 1]
    assert 0 < len(secret_slots) <= 3 * 8  # the third write may already have dropped a few
    removed = model.forget(s, source="secret")
    assert removed == len(secret_slots) and 1 not in s.surviving_slots()
    assert s.stm.shape == (3, 32, 64) and s.initialized
    for row in secret_slots:  # no forgotten vector remains anywhere
        assert not (s.stm == row).all(dim=-1).any()
    # holes were refilled from survivors of the same layer: every slot equals some surviving original
    assert set(s.surviving_slots()) == {0, 2}


def test_forgetting_everything_empties_the_memory():
    model = make_model()
    s = model.new_memory()
    model.inject(s, input_ids=random_ids(20), source="only")
    assert model.forget(s, source="only") == 3 * 32
    assert not s.initialized and s.surviving_slots() == {}


def test_forget_invalidates_cached_reads_and_rejects_unknown_ids():
    model = make_model()
    s = model.new_memory()
    model.inject(s, input_ids=random_ids(20), source="a")
    model.inject(s, input_ids=random_ids(20, seed=1), source="b")
    ids = random_ids(4)
    before = model(ids, memory=s).logits
    model.forget(s, source="b")
    assert not torch.equal(before, model(ids, memory=s).logits)
    import pytest

    with pytest.raises(KeyError):
        model.forget(s, injection_ids=[42])


def test_write_returns_exactly_the_evicted_slots():
    s = state(L=2, N=32)
    s.stm = torch.arange(32, dtype=torch.float).view(1, 32, 1).expand(2, 32, 4)
    evicted = write_slots(s, slots(2, 8, 4, -1), injection_id=3, per_layer=True)
    for layer in range(2):
        gone = set(evicted.slots[layer, :, 0].tolist())
        kept = set(s.stm[layer, :24, 0].tolist())
        assert len(gone) == 8 and gone.isdisjoint(kept) and gone | kept == set(range(32))
    assert (evicted.sources == EXTERNAL).all() and (evicted.ages == 0).all()


def test_protected_slots_are_dropped_last():
    s = state(L=1, N=32)
    s.stm = torch.arange(32, dtype=torch.float).view(1, 32, 1).expand(1, 32, 4)
    protected = torch.zeros(1, 32, dtype=torch.bool)
    protected[0, :20] = True  # 12 unprotected slots: the 8 victims come from them
    for _ in range(1):
        evicted = write_slots(s, slots(1, 8, 4, -1), injection_id=0, per_layer=False, protected=protected)
    assert (evicted.slots[0, :, 0] >= 20).all()
    assert set(range(20)) <= set(s.stm[0, :, 0].tolist())


def test_recomputed_slots_keep_the_provenance_of_the_slots_they_rerun():
    # A context shorter than K re-runs the pool's newest K - n slots ahead of it; under the causal
    # mask they never see the context, so they are labelled with the injection that wrote them.
    model = make_model()
    K = model.config.num_tokens
    s = model.new_memory(seed=0)
    first = model.inject(s, input_ids=random_ids(K, seed=1), allow_short=True).injection_id
    short = model.inject(s, input_ids=random_ids(K // 4, seed=2), allow_short=True).injection_id
    newest = s.sources[:, -K:]
    assert (newest[:, : K - K // 4] == first).all()
    assert (newest[:, K - K // 4 :] == short).all()
    # Forgetting the first injection also removes its re-run copies: none of its slots are left.
    model.forget(s, injection_ids=[first])
    assert not (s.sources == first).any()
    assert (s.sources == short).any()


def test_batched_writes_label_recomputed_slots_as_inject_does():
    from latentmem.writing import inject_batch

    model = make_model()
    K = model.config.num_tokens
    one, batched = model.new_memory(seed=0), model.new_memory(seed=0)
    first = model.inject(one, input_ids=random_ids(K, seed=1), allow_short=True).injection_id
    model.inject(batched, input_ids=random_ids(K, seed=1), allow_short=True)
    model.inject(one, input_ids=random_ids(5, seed=2), allow_short=True)
    inject_batch(model, [batched], [random_ids(5, seed=2)[0]])
    assert (batched.sources[:, -K:][:, : K - 5] == first).all()
    assert torch.equal(one.sources, batched.sources)


def test_oldest_forgetting_drops_the_front_of_the_pool_and_spares_pinned_slots():
    s = state(L=2, N=32)
    s.stm = torch.arange(32, dtype=torch.float).view(1, 32, 1).expand(2, 32, 4).clone()
    write_slots(s, slots(2, 8, 4, -1), injection_id=7, per_layer=True, oldest=True)
    assert s.stm[0, :24, 0].tolist() == list(range(8, 32)) and (s.stm[:, -8:] == -1).all()
    pinned = torch.zeros(2, 32, dtype=torch.bool)
    pinned[:, :4] = True  # the oldest 4 are pinned: the next 8 go instead
    write_slots(s, slots(2, 8, 4, -2), injection_id=8, per_layer=False, protected=pinned, oldest=True)
    assert s.stm[0, :24, 0].tolist() == [8, 9, 10, 11, *range(20, 32), *[-1] * 8]


def test_with_oldest_forgetting_a_write_stays_whole_for_n_over_k_minus_1_writes():
    model = make_model(forgetting="oldest")  # K = 8, N = 32: 4 writes fit
    s = model.new_memory(seed=0)
    for i in range(8):
        model.inject(s, input_ids=random_ids(20, seed=i))
    counts = {w: int((s.sources[0] == w).sum()) for w in range(8)}
    assert counts == {0: 0, 1: 0, 2: 0, 3: 0, 4: 8, 5: 8, 6: 8, 7: 8}
    random = make_model()
    r = random.new_memory(seed=0)
    for i in range(8):
        random.inject(r, input_ids=random_ids(20, seed=i))
    assert any(0 < int((r.sources[0] == w).sum()) < 8 for w in range(7))  # the release's draws split writes


def test_forgetting_is_validated():
    import pytest

    with pytest.raises(ValueError, match="forgetting"):
        make_model(forgetting="lru")


def test_a_write_rearranges_the_pool_in_place_as_a_gather_into_a_new_pool_would():
    from latentmem.pool import keep_in_place

    for per_layer in (False, True):
        s = state(L=3, N=200, d=4, seed=int(per_layer))  # 200 slots: several blocks of keep_in_place
        write_slots(s, torch.randn(3, 8, 4), injection_id=0, per_layer=per_layer)
        for w in range(1, 6):
            before, storage = s.stm.clone(), s.stm.data_ptr()
            write_slots(s, torch.randn(3, 8, 4), injection_id=w, per_layer=per_layer)
            survivors = s.slot_origins(s.version - 1)[:, :-8]
            assert torch.equal(s.stm[:, :-8], before.gather(1, survivors[..., None].expand(-1, -1, 4)))
            assert s.stm.data_ptr() == storage  # no second pool was allocated
    pool = torch.arange(2 * 300 * 1, dtype=torch.float).view(2, 300, 1)
    kept = torch.stack([torch.randperm(300)[:250].sort().values for _ in range(2)])
    expected = pool.gather(1, kept[..., None])
    keep_in_place(pool, kept, rows=7)
    assert torch.equal(pool[:, :250], expected)
    for dropped in (16, 40, 150):  # forgetting the oldest: one run, moved as a shift (blocks of `dropped`)
        pool = torch.randn(3, 300, 5)
        expected = pool[:, dropped:].clone()
        keep_in_place(pool, torch.arange(dropped, 300)[None].expand(3, -1))
        assert torch.equal(pool[:, : 300 - dropped], expected)


def test_a_write_between_a_read_with_gradients_and_its_backward_leaves_the_backward_intact():
    model = make_model().train()  # a read in training mode projects the pool with gradients
    s = model.new_memory()
    model.inject(s, input_ids=random_ids(16))
    loss = model(input_ids=random_ids(6), memory=s).logits.square().mean()
    with torch.no_grad():
        model.inject(s, input_ids=random_ids(16))  # rearranges the pool the read differentiated through
    loss.backward()  # would raise if the pool the graph saved had been changed in place
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_pool_written_in_inference_mode_takes_later_writes_outside_it():
    s = state(L=2, N=16, d=4)
    with torch.inference_mode():
        write_slots(s, torch.randn(2, 4, 4), injection_id=0, per_layer=False)
    assert s.stm.is_inference()  # torch forbids changing it in place outside inference mode
    before, new = s.stm.clone(), torch.randn(2, 4, 4)
    write_slots(s, new, injection_id=1, per_layer=False)
    survivors = s.slot_origins(s.version - 1)[:, :-4]
    assert torch.equal(s.stm[:, :-4], before.gather(1, survivors[..., None].expand(-1, -1, 4)))
    assert torch.equal(s.stm[:, -4:], new)

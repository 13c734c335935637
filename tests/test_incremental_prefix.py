"""First reads after a write project only the written slots: the cached prefix equals recomputation."""

import pytest
import torch
from conftest import make_model, random_ids
from reference import reference_logits

from latentmem import reading
from latentmem.reading import compute_memory_prefix

ATOL = 1e-5
K = 8


def recomputed(model, state):
    """The prefix of `state` computed from scratch, as the cache would without a previous version."""
    with model.adapters.use("read"):
        return compute_memory_prefix(model, state.stm, sources=state.sources)


def assert_prefix_equal(got, want, atol=1e-6):
    assert got.length == want.length and got.prompt_start == want.prompt_start
    for (k1, v1), (k2, v2) in zip(got.keys_values, want.keys_values):
        torch.testing.assert_close(k1, k2, atol=atol, rtol=0)
        torch.testing.assert_close(v1, v2, atol=atol, rtol=0)


@pytest.fixture
def projected(monkeypatch):
    """Counts the slots (rows) the cache projects through k/v, per call."""
    counts = []
    original = reading.unrotated_keys_values

    def counting(layer, vectors):
        counts.append(vectors.shape[1])
        return original(layer, vectors)

    monkeypatch.setattr(reading, "unrotated_keys_values", counting)
    return counts


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("scheme", ["pool", "per_write", "fixed"])
def test_reads_after_writes_equal_recomputation(scheme, per_layer, projected):
    model = make_model(memory_positions=scheme, drop_memory_per_layer=per_layer)
    state = model.new_memory(seed=3)
    ids = random_ids(6, seed=5)
    for i in range(2):
        model.inject(state, input_ids=random_ids(24, seed=100 + i))
    with torch.no_grad():
        model(ids, memory=state)  # the first read projects everything
        for step in range(5):
            projected.clear()
            writes = 1 + step % 2  # one or two writes between reads
            for j in range(writes):
                n = 5 if (step + j) % 3 == 0 else 24  # short contexts re-run old slots
                model.inject(state, input_ids=random_ids(n, seed=200 + 10 * step + j), allow_short=True)
            got = model(ids, memory=state).logits
            layers = model.backbone.config.num_hidden_layers
            assert len(projected) == layers and max(projected) <= writes * K  # only the written slots
            assert_prefix_equal(model.prefix_cache.get(model, state), recomputed(model, state))
            if scheme == "pool":
                want = reference_logits(model, state.stm, ids)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_the_stale_version_is_overwritten_in_place_when_nobody_holds_it():
    model = make_model()
    state = model.new_memory()
    model.inject(state, input_ids=random_ids(24, seed=1))
    with torch.no_grad():
        model(random_ids(5), memory=state)
        pointers = [k.data_ptr() for k, _ in model.prefix_cache.get(model, state).buffers]
        model.inject(state, input_ids=random_ids(24, seed=2))
        model(random_ids(5), memory=state)
        prefix = model.prefix_cache.get(model, state)
    assert [k.data_ptr() for k, _ in prefix.buffers] == pointers
    assert_prefix_equal(prefix, recomputed(model, state))


def test_a_held_prefix_and_a_live_cache_keep_their_version():
    model = make_model()
    state = model.new_memory()
    for i in range(2):
        model.inject(state, input_ids=random_ids(24, seed=i))
    ids, more = random_ids(6, seed=1), random_ids(2, seed=3)
    with torch.no_grad():
        held = model(ids, memory=state, use_cache=True)  # its cache grows inside the prefix buffers
        old = model.prefix_cache.get(model, state)
        before = [(k.clone(), v.clone()) for k, v in old.keys_values]
        pool = state.stm.clone()
        model.inject(state, input_ids=random_ids(24, seed=7))
        after = model(ids, memory=state).logits
        new = model.prefix_cache.get(model, state)
        assert new is not old and new.buffers[0][0].data_ptr() != old.buffers[0][0].data_ptr()
        for (k, v), (k0, v0) in zip(old.keys_values, before):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        cont = model(more, memory=state, cache=held.cache)  # continues on the old memory
    want = reference_logits(model, pool, torch.cat([ids, more], 1))[:, -2:]
    torch.testing.assert_close(cont.logits, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(after, reference_logits(model, state.stm, ids), atol=ATOL, rtol=0)
    assert_prefix_equal(new, recomputed(model, state))


def test_changes_other_than_writes_rebuild_from_scratch(projected):
    model = make_model()
    state = model.new_memory()
    for i in range(3):
        model.inject(state, input_ids=random_ids(24, seed=i), source=f"doc{i}")
    ids = random_ids(5)
    with torch.no_grad():
        model(ids, memory=state)
        for change in (
            lambda: model.forget(state, source="doc1"),
            lambda: setattr(state, "stm", torch.randn(state.shape)),
        ):
            change()
            projected.clear()
            got = model(ids, memory=state).logits
            assert projected == [state.num_slots + 1] * model.backbone.config.num_hidden_layers  # bos and every slot
            torch.testing.assert_close(got, reference_logits(model, state.stm, ids), atol=ATOL, rtol=0)


def test_slot_origins_follow_several_writes():
    model = make_model(drop_memory_per_layer=True)
    state = model.new_memory(seed=1)
    model.inject(state, input_ids=random_ids(24, seed=0))
    version, pool = state.version, state.stm.clone()
    for i in range(3):
        model.inject(state, input_ids=random_ids(24, seed=10 + i))
    origins = state.slot_origins(version)
    kept = origins >= 0
    for layer in range(state.num_layers):
        m = int(kept[layer].sum())
        assert kept[layer, :m].all() and not kept[layer, m:].any()  # kept slots first, in order
        assert torch.equal(state.stm[layer, :m], pool[layer, origins[layer, :m]])
    state.touch()  # a change the log does not describe
    assert state.slot_origins(version) is None


def test_mplus_reads_after_writes_equal_recomputation(projected):
    from test_mplus import make_mplus

    model = make_mplus(retrieved_slots_position="before_newest_write", promote_on_retrieval=0.0)
    state = model.new_memory(seed=0)
    ids = random_ids(6, seed=3)
    with torch.no_grad():
        for i in range(7):
            model.inject(state, input_ids=random_ids(20, seed=100 + i), source=f"doc{i}")
            got = model(ids, memory=state).logits
            model.prefix_cache.clear()
            projected_before = len(projected)
            want = model(ids, memory=state).logits  # from scratch
            assert len(projected) > projected_before
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

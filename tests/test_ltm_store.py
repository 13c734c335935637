"""LongTermStore (SPEC §5): what it keeps, what it forgets, what it retrieves, and how it persists."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from latentmem.ltm import LongTermStore, LTMFileError
from latentmem.ltm import files as ltm_files

D, H = 16, 8  # slot width, key width of the small stores


def rows(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def filled(n_writes: int = 3, k: int = 4, layers: int = 2, **kwargs) -> LongTermStore:
    """A store whose layer l got `n_writes` writes of k slots; write w comes from injection w."""
    store = LongTermStore(layers, D, H, **kwargs)
    for w in range(n_writes):
        for layer in range(layers):
            store.add(layer, rows(k, D, 100 * w + layer), rows(k, H, 100 * w + layer + 50), torch.full((k,), w))
    return store


def brute_force_top(keys: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """The M+ score computed the plain way: mean over query rows of sigmoid(q . key), all slots."""
    scores = torch.sigmoid(queries.double() @ keys.double().T).mean(0)
    return torch.topk(scores, k).indices


def clustered(n: int, h: int, group: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys around random centres, one centre per `group` slots (slots written by one
    injection are alike), and a matching query maker."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n // group, h, generator=g) / h**0.5
    keys = centres.repeat_interleave(group, 0) + 0.5 * torch.randn(n, h, generator=g) / h**0.5
    return centres, keys


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- keeping ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_add_then_get_returns_what_was_added(dtype):
    store = LongTermStore(2, D, H, dtype=dtype)
    slots, keys = rows(5, D, 0), rows(5, H, 1)
    store.add(1, slots, keys, ids(7, 7, 8, 8, 9), frequency=3.0, importance=torch.tensor([1, 2, 3, 4, 5.0]))
    got = store.get(1, torch.tensor([4, 0, 2]))
    assert got["slots"].dtype == dtype
    assert torch.equal(got["slots"], slots.to(dtype)[[4, 0, 2]])
    assert torch.equal(got["keys"], keys[[4, 0, 2]])
    assert got["sources"].tolist() == [9, 7, 8]
    assert got["frequencies"].tolist() == [3.0, 3.0, 3.0]
    assert got["importance"].tolist() == [5.0, 1.0, 3.0]
    assert got["ages"].tolist() == [0, 0, 0]
    assert (store.size(0), store.size(1)) == (0, 5)


def test_sources_lists_every_slots_injection_in_position_order():
    store = filled(n_writes=3, k=4)
    store.remove_sources([1])
    for layer in range(store.num_layers):
        everything = store.get(layer, torch.arange(store.size(layer)))
        assert torch.equal(store.sources(layer), torch.as_tensor(everything["sources"]))
        assert 1 not in store.sources(layer).tolist() and len(store.sources(layer)) == store.size(layer)


def test_every_write_ages_every_slot_in_every_layer():
    store = LongTermStore(2, D, H)
    store.add(0, rows(2, D, 0), rows(2, H, 0), ids(0, 0))
    store.advance_ages(256)
    store.add(0, rows(1, D, 1), rows(1, H, 1), ids(1))
    store.add(1, rows(1, D, 2), rows(1, H, 2), ids(1))
    store.advance_ages(256)
    assert store.get(0, [0, 1, 2])["ages"].tolist() == [512, 512, 256]
    assert store.get(1, [0])["ages"].tolist() == [256]


def test_set_layer_stats_overwrites_ages_and_frequencies():
    store = filled(n_writes=1, k=3, layers=1)
    store.advance_ages(10)
    store.set_layer_stats(0, ages=torch.tensor([5, 0, 7]), frequencies=torch.tensor([1.0, 2.0, 3.0]))
    got = store.get(0, [0, 1, 2])
    assert got["ages"].tolist() == [5, 0, 7]
    assert got["frequencies"].tolist() == [1.0, 2.0, 3.0]


# --- forgetting ---------------------------------------------------------------------------------
def test_decay_deletes_exactly_the_slots_that_fall_to_the_threshold():
    store = LongTermStore(1, D, H)
    store.add(0, rows(2, D, 0), rows(2, H, 0), ids(0, 1), frequency=1.0)  # 1 - 1 = 0 <= 0.01: goes
    store.add(0, rows(1, D, 1), rows(1, H, 1), ids(2), frequency=1.01)  # 0.01 <= 0.01: goes
    store.add(0, rows(2, D, 2), rows(2, H, 2), ids(3, 4), frequency=1.5)  # 0.5: stays
    assert store.decay(1.0) == 3
    assert store.get(0, [0, 1])["sources"].tolist() == [3, 4]
    assert store.get(0, [0, 1])["frequencies"].tolist() == [0.5, 0.5]


def test_decay_keeps_min_slots_choosing_the_highest_value():
    store = LongTermStore(1, D, H, min_slots=3)
    frequencies = [0.5, 0.9, 0.2, 0.9, 0.7]  # all fall to <= 0 after decay(1)
    for source, frequency in enumerate(frequencies):
        store.add(0, rows(1, D, source), rows(1, H, source), ids(source), frequency=frequency)
    assert store.decay(1.0) == 2
    # kept: the 3 highest frequencies (0.9, 0.9, 0.7), in their original (oldest-first) order
    assert store.get(0, [0, 1, 2])["sources"].tolist() == [1, 3, 4]


def test_promoted_slots_survive_the_decay_that_removes_the_others():
    store = filled(n_writes=1, k=4, layers=1)  # frequency 10
    store.promote(0, torch.tensor([1, 3]), amount=5.0)
    assert store.decay(10.0) == 2
    assert store.get(0, [0, 1])["frequencies"].tolist() == [5.0, 5.0]
    assert store.size(0) == 2


def test_decay_never_deletes_pinned_slots():
    store = LongTermStore(1, D, H)
    store.add(
        0, rows(3, D, 0), rows(3, H, 0), ids(0, 1, 2), frequency=1.0, importance=torch.tensor([1, float("inf"), 1])
    )
    assert store.decay(5.0) == 2
    assert store.get(0, [0])["sources"].tolist() == [1]


def test_budget_evicts_the_lowest_value_first_and_the_oldest_among_equals():
    store = LongTermStore(1, D, H, max_slots=4)
    store.add(0, rows(3, D, 0), rows(3, H, 0), ids(0, 1, 2), frequency=10.0, importance=torch.tensor([1.0, 0.1, 1.0]))
    store.add(0, rows(3, D, 1), rows(3, H, 1), ids(3, 4, 5), frequency=10.0)  # 6 slots: 2 must go
    # values: 10, 1, 10, 10, 10, 10 -> source 1 (lowest), then source 0 (oldest of the tied rest)
    assert store.size(0) == 4
    assert store.get(0, [0, 1, 2, 3])["sources"].tolist() == [2, 3, 4, 5]


def test_budget_evicts_pinned_slots_only_when_nothing_else_is_left():
    store = LongTermStore(1, D, H, max_slots=2)
    store.add(0, rows(2, D, 0), rows(2, H, 0), ids(0, 1), importance=float("inf"))
    store.add(0, rows(2, D, 1), rows(2, H, 1), ids(2, 3), frequency=1000.0)
    assert store.get(0, [0, 1])["sources"].tolist() == [0, 1]  # pinned beat even high frequencies
    store.add(0, rows(1, D, 2), rows(1, H, 2), ids(4), importance=float("inf"))
    assert store.get(0, [0, 1])["sources"].tolist() == [1, 4]  # all pinned: the oldest went


def test_remove_sources_deletes_their_slots_in_every_layer_and_keeps_the_order():
    store = filled(n_writes=4, k=3, layers=2)
    assert store.remove_sources([1, 3]) == 2 * 2 * 3
    for layer in (0, 1):
        assert store.get(layer, torch.arange(store.size(layer)))["sources"].tolist() == [0, 0, 0, 2, 2, 2]


# --- retrieving ---------------------------------------------------------------------------------
def test_exact_search_returns_the_brute_force_top_k():
    store = LongTermStore(1, D, H)  # 10k slots: more than one scoring chunk
    keys = rows(10_000, H, 0)
    store.add(0, rows(10_000, D, 1), keys, torch.arange(10_000))
    queries = rows(32, H, 2)
    indices, scores = store.search(0, queries, 50)
    assert indices.tolist() == brute_force_top(keys, queries, 50).tolist()
    expected = torch.sigmoid(queries.double() @ keys[indices].double().T).mean(0)
    assert torch.allclose(scores.double(), expected, atol=1e-6)


def test_exact_search_over_opened_appended_and_deleted_slots_matches_brute_force(tmp_path):
    store = filled(n_writes=30, k=200, layers=1)
    store.save(tmp_path / "ltm")
    store = LongTermStore.open(tmp_path / "ltm")  # memory-mapped base ...
    store.add(0, rows(500, D, 7), rows(500, H, 8), 100 + torch.arange(500) % 5)  # ... plus a RAM tail
    store.remove_sources([3, 17, 101])  # holes in both
    keys = store.get(0, torch.arange(store.size(0)))["keys"]
    queries = rows(8, H, 9)
    assert store.search(0, queries, 40)[0].tolist() == brute_force_top(keys, queries, 40).tolist()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_recalls_at_least_90_percent_of_the_true_top_k(kind):
    centres, keys = clustered(8192, 32)
    store = LongTermStore(1, D, 32, index=kind)
    store.search_settings.min_size = 2000  # index this small layer (default: exact below 20k)
    store.add(0, torch.zeros(len(keys), D), keys, torch.arange(len(keys)))
    recalls = []
    for j in range(5):
        queries = (centres[7 * j] + 0.7 * rows(16, 32, j) / 32**0.5) * 3
        found, _ = store.search(0, queries, 100)
        recalls.append(len(set(found.tolist()) & set(brute_force_top(keys, queries, 100).tolist())) / 100)
    assert store._layers[0].index.index is not None  # the index answered, not an exact fallback
    assert np.mean(recalls) >= 0.9, recalls


def test_search_each_returns_every_query_rows_own_brute_force_top_k_in_one_pass():
    store = filled(n_writes=30, k=200, layers=1)  # 6k merged slots ...
    store.add_pending(0, rows(5, D, 7), rows(5, H, 8) * 4, ids(99, 99, 99, 99, 99), ages=torch.zeros(5), frequency=1.0)
    store.remove_sources([3, 17])  # ... with holes, plus pending slots searched after them
    keys = store.get(0, torch.arange(store.size(0) + store.pending_size(0)))["keys"]
    queries = rows(6, H, 9)
    found = store.search_each(0, queries, 25)
    assert found.shape == (6, 25)
    assert found.tolist() == torch.topk(queries.double() @ keys.double().T, 25, dim=1).indices.tolist()
    assert store.search_each(0, queries[:0], 25).shape == (0, 0)
    assert store.search_each(0, queries, 10**6).shape == (6, len(keys))  # k beyond the layer: all of it
    with pytest.raises(ValueError, match="queries must be a tensor"):
        store.search_each(0, queries[:, :3], 5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_search_each_through_an_index_finds_each_rows_top_k_and_no_deleted_slot(kind):
    centres, keys = clustered(8192, 32)
    store = LongTermStore(1, D, 32, index=kind)
    store.search_settings.min_size = 2000
    store.add(0, torch.zeros(len(keys), D), keys, torch.arange(len(keys)) // 64)
    queries = torch.stack([centres[5 * j] * 3 for j in range(8)])  # each row asks for another group
    store.search_each(0, queries, 50)  # builds the index
    store.remove_sources([5])
    found = store.search_each(0, queries, 50)
    assert store._layers[0].index.index is not None
    live = store.get(0, torch.arange(store.size(0)))["keys"]
    truth = torch.topk(queries @ live.T, 50, dim=1).indices
    recall = np.mean([len(set(f.tolist()) & set(t.tolist())) / 50 for f, t in zip(found, truth)])
    assert recall >= 0.9, recall
    assert not (store.get(0, found.reshape(-1))["sources"] == 5).any()


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_search_never_returns_duplicates_or_deleted_slots(kind):
    centres, keys = clustered(4096, 32)
    store = LongTermStore(1, D, 32, index=kind)
    store.search_settings.min_size = 1000
    store.add(0, torch.zeros(len(keys), D), keys, torch.arange(len(keys)) // 64)
    queries = (centres[4] + 0.7 * rows(16, 32, 0) / 32**0.5) * 3
    best = store.search(0, queries, 300)[0]  # also builds the index before the deletion
    assert (store.get(0, best)["sources"] == 4).sum() == 64
    # The best-matching group and two more go; few enough that the index keeps them as tombstones.
    store.remove_sources([4, 10, 12])
    found, scores = store.search(0, queries, 300)
    got = store.get(0, found)
    assert len(set(found.tolist())) == 300
    assert not torch.isin(got["sources"], ids(4, 10, 12)).any()
    expected = torch.sigmoid(queries @ got["keys"].T).mean(0)
    assert torch.allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_an_index_sheds_deleted_slots_once_they_are_many(kind):
    _, keys = clustered(4096, 32)
    store = LongTermStore(1, D, 32, index=kind)
    store.search_settings.min_size = 1000
    store.add(0, torch.zeros(len(keys), D), keys, torch.arange(len(keys)) % 2)
    store.search(0, keys[:4], 10)
    store.remove_sources([0])  # half: IVF purges its tombstones, HNSW (which cannot) is rebuilt
    store.search(0, keys[:4], 10)
    assert store._layers[0].index.index.ntotal == 2048


def test_search_returns_what_there_is_when_the_layer_holds_fewer_than_k():
    store = filled(n_writes=1, k=5, layers=1)
    found, scores = store.search(0, rows(4, H, 0), 2560)
    assert sorted(found.tolist()) == [0, 1, 2, 3, 4]
    assert scores.shape == (5,)
    assert store.search(0, rows(4, H, 0), 0)[0].shape == (0,)
    assert LongTermStore(1, D, H).search(0, rows(4, H, 0), 10)[0].shape == (0,)


# --- persisting ---------------------------------------------------------------------------------
def test_save_then_open_round_trips_bit_exactly(tmp_path):
    store = filled(n_writes=3, k=4, layers=2, dtype=torch.bfloat16, max_slots=100, min_slots=2)
    store.advance_ages(32)
    store.promote(1, [2], 0.5)
    store.save(tmp_path / "ltm")
    opened = LongTermStore.open(tmp_path / "ltm")
    assert (opened.num_layers, opened.hidden_size, opened.key_dim, opened.dtype) == (2, D, H, torch.bfloat16)
    assert (opened.max_slots, opened.min_slots, opened.index_kind) == (100, 2, "exact")
    for layer in (0, 1):
        everything = torch.arange(store.size(layer))
        before, after = store.get(layer, everything), opened.get(layer, everything)
        for name in before:
            assert torch.equal(before[name].view(torch.int16) if name == "slots" else before[name],
                               after[name].view(torch.int16) if name == "slots" else after[name]), name  # fmt: skip
    opened.add(0, rows(1, D, 0), rows(1, H, 0), ids(5))  # ids continue where they stopped
    assert opened._layers[0].ids[-1] == 12


def test_open_memory_maps_the_arrays_and_reads_no_slots(tmp_path):
    n = 16_384
    store = LongTermStore(1, 2048, H)  # 64 MiB of float16 slots
    store.add(0, torch.ones(n, 2048), rows(n, H, 0), torch.arange(n))
    store.save(tmp_path / "ltm")
    del store
    before = resident_bytes()
    opened = LongTermStore.open(tmp_path / "ltm")
    grown = resident_bytes() - before
    assert isinstance(opened._layers[0].slots.base, np.memmap)
    assert isinstance(opened._layers[0].keys.base, np.memmap)
    assert grown < 8 * 2**20, f"open made {grown / 2**20:.1f} MiB resident for a 64 MiB store"
    assert opened.get(0, [n - 1])["slots"].float().sum().item() == 2048


def test_changes_after_open_never_write_into_the_saved_files(tmp_path):
    filled(n_writes=2, k=3, layers=1).save(tmp_path / "ltm")
    store = LongTermStore.open(tmp_path / "ltm")
    store.add(0, rows(2, D, 9), rows(2, H, 9), ids(9, 9))
    store.promote(0, [0], 3.0)
    store.decay(10.0)  # deletes all but the promoted slot
    again = LongTermStore.open(tmp_path / "ltm")
    assert again.size(0) == 6 and again.get(0, [0])["frequencies"].item() == 10.0
    assert store.size(0) == 1


def test_save_moves_appended_slots_out_of_ram(tmp_path):
    store = filled(n_writes=2, k=3, layers=1)
    assert store._layers[0].slots.tail_len == 6
    store.save(tmp_path / "ltm")
    assert store._layers[0].slots.tail_len == 0
    assert isinstance(store._layers[0].slots.base, np.memmap)
    assert store.get(0, [5])["sources"].item() == 1


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_the_saved_index_is_read_at_the_first_search_not_rebuilt(tmp_path, kind):
    centres, keys = clustered(4096, 32)
    store = LongTermStore(1, D, 32, index=kind)
    store.search_settings.min_size = 1000
    store.add(0, torch.zeros(len(keys), D), keys, torch.arange(len(keys)))
    queries = centres[:2].repeat(4, 1)
    expected = store.search(0, queries, 50)[0]
    store.save(tmp_path / "ltm")
    opened = LongTermStore.open(tmp_path / "ltm")
    opened.search_settings.min_size = 1000
    assert opened._layers[0].index.index is None  # open read nothing
    assert opened.search(0, queries, 50)[0].tolist() == expected.tolist()
    assert opened._layers[0].index.index.ntotal == 4096


def test_a_crash_while_writing_leaves_the_previous_store(tmp_path, monkeypatch):
    path = tmp_path / "ltm"
    filled(n_writes=1, layers=2).save(path)
    bigger = filled(n_writes=3, layers=2)
    written = []

    def crash_on_second_layer(memory, folder):
        if written:
            raise OSError("disk full")
        written.append(folder)
        return write_layer(memory, folder)

    write_layer = ltm_files._write_layer
    monkeypatch.setattr(ltm_files, "_write_layer", crash_on_second_layer)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path)
    assert LongTermStore.open(path).size(0) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ltm"]  # no temporary folder left


def test_a_crash_between_the_renames_leaves_the_previous_store_loadable(tmp_path, monkeypatch):
    path = tmp_path / "ltm"
    filled(n_writes=1).save(path)
    renames, real_rename = [], os.rename

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise OSError("power cut")  # the old store was moved aside, the new one not yet in place
        real_rename(src, dst)

    monkeypatch.setattr(ltm_files.os, "rename", rename)
    with pytest.raises(OSError, match="power cut"):
        filled(n_writes=3).save(path)
    monkeypatch.undo()
    assert not path.exists()
    assert LongTermStore.open(path).size(0) == 4  # read from the moved-aside copy
    filled(n_writes=2).save(path)  # the next save completes and cleans up
    assert LongTermStore.open(path).size(0) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ltm"]


def test_save_refuses_to_replace_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(LTMFileError, match="not a long-term store"):
        filled().save(tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


def test_open_rejects_a_truncated_array(tmp_path):
    filled(n_writes=2, k=4, layers=1).save(tmp_path / "ltm")
    slots = tmp_path / "ltm" / "layer_000" / "slots.npy"
    slots.write_bytes(slots.read_bytes()[:-64])
    with pytest.raises(LTMFileError, match="slots.npy"):
        LongTermStore.open(tmp_path / "ltm")


def test_open_rejects_a_missing_or_foreign_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        LongTermStore.open(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(LTMFileError, match="not a latentmem long-term store"):
        LongTermStore.open(tmp_path / "other")


# --- refusing bad input -------------------------------------------------------------------------
def test_unknown_index_kind_and_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="unknown index kind 'annoy'; choose one of exact, ivf, hnsw"):
        LongTermStore(1, D, H, index="annoy")
    with pytest.raises(ValueError, match="max_slots"):
        LongTermStore(1, D, H, max_slots=10, min_slots=20)
    with pytest.raises(ValueError, match="dtype"):
        LongTermStore(1, D, H, dtype=torch.int8)


def test_wrong_dimensions_are_refused_with_the_expected_shape():
    store = LongTermStore(1, D, H)
    with pytest.raises(ValueError, match=r"slots must be a tensor \[k, 16\], got \[3, 15\]"):
        store.add(0, rows(3, D - 1, 0), rows(3, H, 0), ids(0, 0, 0))
    with pytest.raises(ValueError, match="keys has 2 rows but slots has 3"):
        store.add(0, rows(3, D, 0), rows(2, H, 0), ids(0, 0, 0))
    with pytest.raises(ValueError, match="sources must be an integer tensor of shape"):
        store.add(0, rows(3, D, 0), rows(3, H, 0), torch.zeros(3))
    with pytest.raises(ValueError, match=r"queries must be a tensor \[q, 8\]"):
        store.search(0, rows(4, H + 1, 0), 5)
    assert store.size(0) == 0


def test_bad_layers_indices_and_values_are_refused():
    store = filled(n_writes=1, k=2, layers=2)
    with pytest.raises(IndexError, match="layer 2 is out of range: this store has layers 0..1"):
        store.size(2)
    with pytest.raises(IndexError, match="out of range for a layer holding 2 slots"):
        store.get(0, [2])
    with pytest.raises(ValueError, match="importance must be >= 0"):
        store.add(0, rows(1, D, 0), rows(1, H, 0), ids(0), importance=-1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        store.add(0, rows(1, D, 0), torch.full((1, H), float("nan")), ids(0))
    with pytest.raises(ValueError, match="overflow torch.float16"):
        store.add(0, torch.full((1, D), 1e6), rows(1, H, 0), ids(0))
    assert store.size(0) == 2


# --- the release's bookkeeping (release.py) -----------------------------------------------------
def test_pending_slots_are_searched_and_read_after_the_merged_ones_until_a_merge():
    store = filled(n_writes=1, k=4, layers=1)
    store.add_pending(0, rows(3, D, 7), rows(3, H, 8), ids(5, 5, 5), ages=torch.tensor([2, 1, 0]), frequency=10.0)
    assert (store.size(0), store.pending_size(0)) == (4, 3)
    queries = rows(2, H, 9)
    everything = torch.cat([rows(4, H, 50), rows(3, H, 8)])
    top, _ = store.search(0, queries, 5)
    assert top.tolist() == brute_force_top(everything, queries, 5).tolist()
    got = store.get(0, [5, 0])
    assert torch.equal(got["slots"], torch.stack([rows(3, D, 7)[1], rows(4, D, 0)[0]]).half())
    assert got["ages"].tolist() == [1, 0] and store.sources(0).tolist() == [0] * 4 + [5] * 3
    store.merge_pending(decay=1.0, keep_more_than=0)
    assert (store.size(0), store.pending_size(0)) == (7, 0)
    assert store.layer_stats(0)["frequencies"].tolist() == [9.0] * 7


def test_release_reads_tile_a_small_layer_and_order_oldest_first_as_numpy_argsort_does():
    store = LongTermStore(1, D, H)
    store.add(0, rows(5, D, 0), rows(5, H, 1), ids(0, 0, 0, 0, 0))
    store.set_layer_stats(0, ages=torch.tensor([3.0, 9.0, 3.0, 0.0, 9.0]))  # float ages, as the release saves them
    store.release_reads = True
    assert store.retrievable(0, 8) == 8
    top, _ = store.search(0, rows(2, H, 2), 8)
    tiled = np.array([2, 3, 4, 0, 1, 2, 3, 4])
    ages = np.array([3, 9, 3, 0, 9])[tiled]
    assert top.tolist() == tiled[np.argsort(ages.astype(np.float64))[::-1]].tolist()


def test_merge_that_would_leave_too_few_slots_deletes_nothing_and_undoes_the_decay():
    store = LongTermStore(1, D, H)
    store.add(0, rows(4, D, 0), rows(4, H, 1), ids(0, 0, 0, 0), frequency=1.0)
    store.add_pending(0, rows(2, D, 2), rows(2, H, 3), ids(1, 1), frequency=10.0)
    assert store.merge_pending(decay=1.0, keep_more_than=2) == 0  # 2 survivors are not more than 2
    assert store.layer_stats(0)["frequencies"].tolist() == [1.0] * 4 + [10.0] * 2
    store.add_pending(0, rows(1, D, 4), rows(1, H, 5), ids(2), frequency=10.0)
    assert store.merge_pending(decay=1.0, keep_more_than=2) == 4
    assert store.layer_stats(0)["frequencies"].tolist() == [9.0] * 3


def test_a_copy_shares_memory_mapped_slots_and_changes_independently(tmp_path):
    store = filled(n_writes=2, k=3, layers=1)
    store.save(tmp_path / "s")
    twin = store.copy()
    assert twin._layers[0].slots.base is store._layers[0].slots.base  # no copy of the big table
    twin.decay(20.0)
    twin.add(0, rows(1, D, 9), rows(1, H, 9), ids(9))
    assert (store.size(0), twin.size(0)) == (6, 1)
    assert store.get(0, [5])["frequencies"].tolist() == [10.0]


def test_pending_slots_and_release_state_survive_save_and_open(tmp_path):
    store = filled(n_writes=1, k=2, layers=2)
    store.add_pending(1, rows(2, D, 3), rows(2, H, 4), ids(7, 7), ages=torch.tensor([1, 0]))
    store.release_reads, store.stm_ages = True, np.arange(6).reshape(2, 3)
    store.save(tmp_path / "s")
    opened = LongTermStore.open(tmp_path / "s")
    assert opened.release_reads and np.array_equal(opened.stm_ages, store.stm_ages)
    assert opened.pending_size(1) == 2 and opened.get(1, [2, 3])["ages"].tolist() == [1, 0]
    assert torch.equal(opened.get(1, [3])["slots"], store.get(1, [3])["slots"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_ages_are_rounded_and_impossible_ones_refused(dtype):
    store = filled(n_writes=1, k=3, layers=1)
    store.set_layer_stats(0, ages=torch.tensor([0.0, 8.0, 256.0], dtype=dtype))
    assert store.get(0, [0, 1, 2])["ages"].tolist() == [0, 8, 256]
    for bad, message in ((-1.0, ">= 0"), (0.5, "whole numbers"), (float("nan"), "non-finite")):
        with pytest.raises(ValueError, match=message):
            store.set_layer_stats(0, ages=torch.tensor([bad, 0.0, 0.0], dtype=dtype))

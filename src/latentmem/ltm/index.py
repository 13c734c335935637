"""Scoring and vector indexes for long-term-memory retrieval (M+).

M+ scores a slot against a prompt as the mean over the prompt's query rows of sigmoid(q . key).
`exact` computes that for every slot, in chunks of rows so memory stays bounded however large the
layer. The approximate indexes (FAISS, inner product) only propose candidates, which are then
rescored exactly, so the returned scores are always exact; only the candidate set is approximate.

Why the mean query proposes the candidates: near 0, sigmoid(x) ~ 1/2 + x/4, so the score is about
1/2 + (mean q) . key / 4 and the best slots for the mean query are the best slots overall; away
from 0 the sigmoid bends and the orders drift apart, which over-fetching (`candidate_factor` x k)
absorbs. Measured on random 256-d data, 200k slots, k = 2560, logits of std ~3: the exact top
(4 x k) for the mean query holds 96% (isotropic keys) to 100% (keys clustered by context) of the
true top k; adding each query row's own top hits (`row_hits`) added under 1% at 32 x the cost, so
it is off by default.

Costs to know. An approximate index is built inside `search`, lazily: at the first search once a
layer holds `min_size` slots, and (IVF) again each time the layer has grown 4x, so the lists stay
short. Building 1M keys of 256-d (k-means on 65k samples + assigning every key) takes 1-2 min on 2
cores; later adds are incremental. The index holds its own float32 copy of every key in RAM (1 KB
per slot at h = 256), so unlike the memory-mapped slots and keys it does not scale past RAM. HNSW
needs its search breadth >= the candidates wanted (4 x 2560), which makes it slow at M+'s k; it
suits small k. IVF is the approximate index to use for M+.

Slots are addressed by stable ids (see layer.py), so deleting slots does not renumber the index:
deleted ids stay in it as tombstones that searches filter out, until `sync` purges them (IVF) or
rebuilds (HNSW, which cannot remove). Everything an index needs is derived from the layer, so an
index is also rebuilt lazily: after `open` it is read from its file only at the first search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .table import as_tensor

if TYPE_CHECKING:
    from .layer import LayerMemory

INDEX_KINDS = ("exact", "ivf", "hnsw")
# Rows scored per step: the [chunk, q] logits take 8 MB. Fewer, larger steps beat cache-sized ones
# on a shared 2-core machine, where every parallel op waits for its slowest thread (measured).
SCORE_CHUNK = 65536
BUILD_CHUNK = 65536  # rows read per step when building an index from (memory-mapped) keys


@dataclass
class SearchSettings:
    """How approximate indexes search; change them on a live store (`store.search_settings.nprobe = 64`).

    candidate_factor: the mean query proposes candidate_factor * k slots for exact rescoring.
    row_hits: each query row also proposes its own top `row_hits` slots (0: off, see module doc).
    nprobe: IVF lists scanned; None = 1/16 of the lists, and enough lists to yield the candidates.
    ef_search: HNSW search breadth; None = the number of candidates requested.
    min_size: below this many slots a layer is searched exactly and no index is built (an exact
        scan of 20k slots takes a few milliseconds; an index would only add build time).
    """

    candidate_factor: int = 4
    row_hits: int = 0
    nprobe: int | None = None
    ef_search: int | None = None
    min_size: int = 20_000


def mean_sigmoid_scores(keys: np.ndarray, queries_t: torch.Tensor) -> torch.Tensor:
    """score[m] = mean_q sigmoid(keys[m] . queries[q]) for keys `[m, h]` and queries_t `[h, q]` (float32)."""
    logits = as_tensor(keys) @ queries_t  # [m, q]: keys on the left is the fast layout for small q
    weights = torch.full((queries_t.shape[1],), 1.0 / queries_t.shape[1])
    return logits.sigmoid_() @ weights  # the mean over q as one matrix-vector product (faster than .mean(1))


def exact_scores(layer: LayerMemory, queries_t: torch.Tensor) -> torch.Tensor:
    """Scores of every slot of `layer`, `[n]`, computed chunk by chunk (bounded memory)."""
    n = layer.size
    scores = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, SCORE_CHUNK):
        stop = min(n, start + SCORE_CHUNK)
        scores[start:stop] = mean_sigmoid_scores(layer.keys_at_range(start, stop), queries_t)
    return scores


def row_top_k(layer: LayerMemory, queries_t: torch.Tensor, k: int, positions: np.ndarray | None
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each query's own top k slots of `layer` by q . key: (values, positions), both `[q, k]`, best
    first. Over `positions` only (sorted candidates) or every slot, chunk by chunk (bounded memory:
    a running top k per query is merged with each chunk's)."""
    if positions is not None:
        logits = as_tensor(layer.gather_keys(positions)) @ queries_t  # [m, q]
        top = torch.topk(logits, min(k, len(positions)), dim=0)
        return top.values.T, torch.from_numpy(positions)[top.indices.T]
    best = None
    for start in range(0, layer.size, SCORE_CHUNK):
        stop = min(layer.size, start + SCORE_CHUNK)
        logits = as_tensor(layer.keys_at_range(start, stop)) @ queries_t
        top = torch.topk(logits, min(k, stop - start), dim=0)
        chunk = (top.values.T, top.indices.T + start)
        best = chunk if best is None else merge_row_top_k(best, chunk, k)
    return best


def merge_row_top_k(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The top k per row of two (values, positions) `[q, *]` candidate sets."""
    values, positions = torch.cat([a[0], b[0]], dim=1), torch.cat([a[1], b[1]], dim=1)
    top = torch.topk(values, min(k, values.shape[1]), dim=1)
    return top.values, torch.gather(positions, 1, top.indices)


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("index='ivf'/'hnsw' needs FAISS: pip install faiss-cpu (or use index='exact')") from err
    return faiss


def ivf_lists(n: int) -> int:
    """IVF list count for n keys: about 4 * sqrt(n) (FAISS's guideline), a power of two."""
    return int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(n)))))


class ApproximateIndex:
    """A FAISS inner-product index over one layer's keys, addressed by slot id.

    `indexed_upto`: every id below it was added (or deleted before it could be); ids from it on
    are pending and get added at the next `sync`. `trained_size`: layer size when the index was
    built; an IVF index is retrained once the layer has grown 4x, so its lists stay short.
    """

    def __init__(self, kind: str, dim: int):
        if kind not in ("ivf", "hnsw"):
            raise ValueError(f"unknown approximate index kind {kind!r}; choose 'ivf' or 'hnsw'")
        self.kind, self.dim = kind, dim
        self.index = None
        self.file: Path | None = None  # saved index, read at the first sync (keeps `open` fast)
        self.indexed_upto = 0
        self.trained_size = 0

    def copy(self) -> ApproximateIndex:
        """An independent index over the same ids (a saved, not yet read file is shared)."""
        twin = ApproximateIndex(self.kind, self.dim)
        twin.index = None if self.index is None else _faiss().clone_index(self.index)
        twin.file, twin.indexed_upto, twin.trained_size = self.file, self.indexed_upto, self.trained_size
        return twin

    # --- lifecycle ------------------------------------------------------------------------
    def sync(self, layer: LayerMemory, settings: SearchSettings) -> bool:
        """Bring the index up to date with `layer`; False if the layer is too small to index."""
        if self.index is None and self.file is not None:
            self.index, self.file = _faiss().read_index(str(self.file)), None
        if layer.size < settings.min_size:
            self.index = None  # an exact scan is as fast; rebuilt once the layer grows again
            return False
        stale = self._stale(layer)
        if self.index is None or self._needs_rebuild(layer, stale):
            self._build(layer)
        elif stale and stale > 0.1 * self.index.ntotal:
            self._purge(layer)
        self._add_pending(layer)
        return True

    def _stale(self, layer: LayerMemory) -> int:
        """Index entries whose slot was deleted (the index holds every id below indexed_upto once)."""
        if self.index is None:
            return 0
        live_indexed = int(np.searchsorted(layer.ids, self.indexed_upto))
        return int(self.index.ntotal) - live_indexed

    def _needs_rebuild(self, layer: LayerMemory, stale: int) -> bool:
        if self.kind == "ivf":
            return layer.size > 4 * self.trained_size
        return stale > 0.25 * self.index.ntotal  # HNSW cannot remove entries

    def _build(self, layer: LayerMemory) -> None:
        faiss = _faiss()
        n = layer.size
        if self.kind == "ivf":
            nlist = ivf_lists(n)
            # The coarse quantizer is itself an HNSW graph: assigning 1M keys to 4096 lists by brute
            # force costs ~2 TFLOP, through the graph a few seconds.
            quantizer = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            # k-means cost grows with points x lists; 16 points per list and 10 iterations train
            # 4096 lists in tens of seconds on 2 cores, and candidates are rescored exactly anyway.
            index.cp.max_points_per_centroid, index.cp.min_points_per_centroid, index.cp.niter = 16, 1, 10
            sample = min(n, 16 * nlist)
            rng = np.random.default_rng(n)
            positions = np.sort(rng.choice(n, sample, replace=False))
            # k-means assigns with a flat index: by default FAISS would use the HNSW quantizer and
            # rebuild its graph on every k-means iteration (seconds instead of milliseconds).
            clustering = faiss.IndexFlatIP(self.dim)
            index.clustering_index = clustering
            index.train(np.ascontiguousarray(layer.keys_at(positions), dtype=np.float32))
            index.clustering_index = None  # `clustering` is freed when this function returns
        else:
            index = faiss.IndexIDMap(faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT))
        self.index, self.indexed_upto, self.trained_size = index, 0, n

    def _purge(self, layer: LayerMemory) -> None:
        """Remove tombstones from an IVF index: everything below indexed_upto that is no longer live."""
        faiss = _faiss()
        live = np.ascontiguousarray(layer.ids[: int(np.searchsorted(layer.ids, self.indexed_upto))])
        keep = faiss.IDSelectorBatch(len(live), faiss.swig_ptr(live))
        self.index.remove_ids(faiss.IDSelectorNot(keep))

    def _add_pending(self, layer: LayerMemory) -> None:
        start = int(np.searchsorted(layer.ids, self.indexed_upto))
        for begin in range(start, layer.size, BUILD_CHUNK):
            stop = min(layer.size, begin + BUILD_CHUNK)
            keys = np.ascontiguousarray(layer.keys_at_range(begin, stop), dtype=np.float32)
            self.index.add_with_ids(keys, np.ascontiguousarray(layer.ids[begin:stop]))
        self.indexed_upto = layer.next_id

    # --- search -----------------------------------------------------------------------------
    def candidate_ids(self, queries: np.ndarray, count: int, settings: SearchSettings) -> np.ndarray:
        """Ids proposed for queries `[r, h]` (count each), tombstones and padding (-1) included."""
        faiss = _faiss()
        ntotal = int(self.index.ntotal)
        count = min(count, ntotal)
        if self.kind == "ivf":
            per_list = ntotal / self.index.nlist
            auto = max(self.index.nlist // 16, math.ceil(2 * count / max(per_list, 1.0)))
            self.index.nprobe = min(self.index.nlist, settings.nprobe or auto)
            faiss.downcast_index(self.index.quantizer).hnsw.efSearch = max(64, 2 * self.index.nprobe)
        else:
            faiss.downcast_index(self.index.index).hnsw.efSearch = max(count, settings.ef_search or count)
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), count)
        return ids.reshape(-1)

    def over_fetch(self, layer: LayerMemory, count: int) -> int:
        """Candidates to request so that about `count` live ones come back despite tombstones."""
        live = max(1, int(self.index.ntotal) - self._stale(layer))
        return math.ceil(count * self.index.ntotal / live)

    # --- persistence ------------------------------------------------------------------------
    def write(self, path: Path) -> bool:
        """Write the index to `path` (False if there is none). A not-yet-loaded file is copied as is."""
        if self.index is not None:
            _faiss().write_index(self.index, str(path))
            return True
        if self.file is not None:
            from .files import link_or_copy

            link_or_copy(self.file, path)
            return True
        return False

"""The scorer: from the feature store to the training statistics a method fits on, self-influence and scores.

Plain torch. `train_statistics` reduces each snapshot's kernel (or n x n Gram) and the mean Q over this rank's
train shards and all-reduces them; `self_influence` and `score_queries` stream over the train shards (read ahead
in a thread) and write this rank's query block into its part file (`core/scoring.RankParts`, full columns or a
running top k). `core/features.py` fills the store; `core/pipeline.Attributor` runs the stages and publishes.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .dist import Dist
from .linalg import TrainGram, use_dual_form
from .methods.base import FeatureMethod, TrainStatistics
from .scoring import RankParts, prefetched
from .store import FeatureStore

if TYPE_CHECKING:
    from .pipeline import Snapshot

SCORE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
Progress = Callable[[str, int, int], None]


class Scorer:
    """Statistics, self-influence and this rank's query block of scores, for `method` over the store's shards."""

    def __init__(self, method: FeatureMethod, n_train: int, n_query: int, dist: Dist, parts: RankParts, *,
                 score_dtype: str = "float32", query_chunk: int = 1024, top_k: int | None = None,
                 progress: Progress | None = None):
        self.method, self.n_train, self.n_query, self.dist, self.parts = method, n_train, n_query, dist, parts
        self.score_dtype, self.query_chunk, self.top_k, self.progress = score_dtype, query_chunk, top_k, progress

    def check_kernels(self, stats: TrainStatistics, snapshots: list[Snapshot]) -> None:
        """Kernels and mean loss weights must be finite (named by snapshot) before any inverse is taken."""
        for c, kernel in enumerate(stats.kernels or []):
            if not torch.isfinite(kernel.sum()) and not torch.isfinite(kernel).all():   # the sum first: cheap
                raise ValueError(f"the feature kernel of snapshot {snapshots[c].name!r} is not finite (features too "
                                 "large for float64?): check the model's numerics at that snapshot")
        if stats.loss_weight is not None and not torch.isfinite(stats.loss_weight).all():
            row = int((~torch.isfinite(stats.loss_weight)).nonzero()[0])
            raise ValueError(f"non-finite mean loss weight for train example {row}: its outputs are NaN/inf at some "
                             "snapshot")

    def my_train_shards(self, store: FeatureStore) -> list[int]:
        return [s for s in range(store.num_shards(self.n_train)) if s % self.dist.world_size == self.dist.rank]

    def train_statistics(self, store: FeatureStore, snapshots: list[Snapshot]) -> TrainStatistics:
        device = self.dist.device
        dim = self.feature_dim(store, snapshots[0])
        kernels, q_sum = [], torch.zeros(self.n_train, dtype=torch.float64, device=device)
        dual = getattr(self.method, "supports_dual", False) and use_dual_form(self.n_train, dim)
        for snap in snapshots:
            gram = (TrainGram(self.n_train, dim, dual, SCORE_DTYPES[self.score_dtype], device)
                    if self.method.needs_kernel else None)
            for lo, hi, f, w in store.iter_shards(snap.name, "train", self.my_train_shards(store)):
                if gram is not None:
                    gram.add(lo, hi, f)
                q_sum[lo:hi] += torch.from_numpy(w).to(device, torch.float64)
            if gram is not None:
                kernels.append(gram.reduce(self.dist))
        q_mean = self.dist.all_reduce_sum(q_sum) / len(snapshots)
        return TrainStatistics([s.info for s in snapshots], self.n_train, dim, kernels=None if dual else (kernels or None),
                               train_features=kernels if dual else None, loss_weight=q_mean)

    def feature_dim(self, store: FeatureStore, snap: Snapshot) -> int:
        return int(store.read_shard(snap.name, "train", 0)[0].shape[1])

    def self_influence(self, store: FeatureStore, snapshots: list[Snapshot], weights: torch.Tensor | None) -> np.ndarray:
        device = self.dist.device
        out = torch.zeros(self.n_train, dtype=torch.float64, device=device)
        for c, snap in enumerate(snapshots):
            for lo, hi, f, _ in store.iter_shards(snap.name, "train", self.my_train_shards(store)):
                out[lo:hi] += self.method.self_scores(c, torch.from_numpy(f).to(device), SCORE_DTYPES[self.score_dtype],
                                                      rows=(lo, hi))
        if weights is not None:
            out *= weights.to(device)
        return self.dist.all_reduce_sum(out).cpu().numpy()

    def read_rows(self, store: FeatureStore, snap: str, split: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a split as float64, copying only those rows out of the memory-mapped shards."""
        n = len(store.ids(snap, split))
        parts = []
        for s in range(lo // store.shard_size, math.ceil(hi / store.shard_size)):
            s_lo, s_hi = store.shard_range(s, n)
            parts.append(store.read_features(snap, split, s)[max(lo, s_lo) - s_lo: min(hi, s_hi) - s_lo])
        return torch.from_numpy(np.concatenate(parts)).to(self.dist.device, torch.float64)

    def score_queries(self, store: FeatureStore, snapshots: list[Snapshot], weights: torch.Tensor | None,
                          excluded: dict[str, list[int]]) -> None:
        """Scores of my query block, streamed over the train shards, into this rank's part file: the full
        columns, or with `top_k` each query's running top k (never n_train x n_query in memory)."""
        parts = self.parts
        q_lo, q_hi = parts.block(self.dist.rank)
        if self.dist.rank == 0:
            parts.root.mkdir(exist_ok=True)
        self.dist.barrier()
        device, dtype = self.dist.device, SCORE_DTYPES[self.score_dtype]
        sink = parts.sink(self.dist.rank, self.top_k, excluded["train"])
        w = weights.to(device, dtype) if weights is not None else None
        chunks = list(range(q_lo, q_hi, self.query_chunk))
        shards = list(range(store.num_shards(self.n_train)))
        for i, c_lo in enumerate(chunks):
            c_hi = min(q_hi, c_lo + self.query_chunk)
            # T_c in float64 (the kernel inverse lives there), then one cast: the big matmul runs in `dtype`
            queries = [self.method.transform(c, self.read_rows(store, s.name, "query", c_lo, c_hi))
                       .to(dtype).T.contiguous() for c, s in enumerate(snapshots)]
            sink.begin(c_lo, c_hi)
            for shard, feats in zip(shards, prefetched(lambda s: self._read_train_shard(store, snapshots, s), shards)):
                lo, hi = store.shard_range(shard, self.n_train)
                block = torch.empty(hi - lo, c_hi - c_lo, dtype=dtype, device=device)
                for c, f in enumerate(feats):  # the sum over snapshots accumulates in the GEMM itself (beta = 1)
                    f = torch.from_numpy(f).to(device, dtype)
                    if c == 0:
                        torch.mm(f, queries[0], out=block)
                    else:
                        block.addmm_(f, queries[c])
                if w is not None:
                    block *= w[lo:hi, None]
                if not torch.isfinite(block.sum()):
                    self._raise_non_finite_scores(block, lo, c_lo, snapshots, excluded)
                sink.add(lo, block)
            if self.progress:
                self.progress("score", i + 1, len(chunks))
        sink.close()

    @staticmethod
    def _raise_non_finite_scores(block: torch.Tensor, lo: int, c_lo: int, snapshots: list[Snapshot],
                                 excluded: dict[str, list[int]]) -> None:
        bad = ~torch.isfinite(block)
        bad[[r - lo for r in excluded["train"] if lo <= r < lo + block.shape[0]]] = False
        bad[:, [q - c_lo for q in excluded["query"] if c_lo <= q < c_lo + block.shape[1]]] = False
        if bad.any():
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"non-finite score ({float(block[i, j])}) of train example {lo + i} for query {c_lo + j} "
                             f"(snapshots {[s.name for s in snapshots]}): the features or the fitted method's inverse "
                             "overflow; check the damping and the model's numerics")

    @staticmethod
    def _read_train_shard(store: FeatureStore, snapshots: list[Snapshot], shard: int) -> list[np.ndarray]:
        """One train shard's features at every snapshot, read into memory (this runs in the prefetch thread)."""
        return [store.read_features(s.name, "train", shard, mmap=False) for s in snapshots]

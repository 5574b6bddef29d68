"""Feature sources: what fills a snapshot's train and query shards of the feature store (this rank's share).

`SnapshotFeaturizer` computes features post hoc at the module's current weights (one batched backward per batch
through the layer engine's projectors, or per-example gradients and a dense projection), checks them finite and
records the fingerprint of the data they came from; finished shards are re-verified and reused. With a
`train_source` (`core/windows.CapturedTrainSource`) the train side comes from a `GradientCapture`'s snapshot windows
instead, and only the examples a window lacks are featurized. The scorer (`core/scorer.py`) reads the store; the
orchestration is `core/pipeline.Attributor`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .batches import move_to
from .dist import Dist
from .gradients import PerExampleGradients
from .io import BatchFingerprint, derive_seed
from .methods.base import FeatureMethod
from .outputs import OutputFunction
from .projection import HOOKED_KINDS, RandomProjector
from .sketch import make_projector
from .store import FeatureStore
from .windows import CapturedTrainSource, read_window

Progress = Callable[[str, int, int], None]


class SnapshotFeaturizer:
    """Writes one snapshot's train and query shards (those of this rank: shard % world_size == rank) into a store."""

    def __init__(self, module: nn.Module, method: FeatureMethod, output: OutputFunction, param_names: list[str],
                 projector_kind: str, proj_dim: int, seed: int, dist: Dist, *, batch_size: int = 64,
                 collate_fn: Callable | None = None, num_workers: int = 0, non_finite: str = "raise",
                 train_source: CapturedTrainSource | None = None, progress: Progress | None = None):
        self.module, self.method, self.output, self.param_names = module, method, output, param_names
        self.projector_kind, self.proj_dim, self.seed, self.dist = projector_kind, proj_dim, seed, dist
        self.batch_size, self.collate_fn, self.num_workers = batch_size, collate_fn, num_workers
        self.non_finite, self.train_source, self.progress = non_finite, train_source, progress
        self._data_fingerprints: dict[tuple[str, int], str] = {}  # (split, shard) -> fingerprint, this run's data
        self.captured_rows: dict[str, int] = {}   # snapshot -> train rows taken from the capture (train_source)

    def reset(self) -> None:
        """Forget this run's data fingerprints (the data may have changed since an earlier run)."""
        self._data_fingerprints.clear()
        self.captured_rows.clear()

    def hooked_projector(self, seed: int | None = None, snapshot: str | None = None):
        """The layer-hook projector (tensor sketch / Kronecker): with `train_source` the capture's projection of
        `snapshot`'s window, else seeded with `seed`."""
        if self.train_source is not None:   # the capture's projection of this snapshot's window
            return self.train_source.make_projector(self.module, self.output, snapshot)
        return make_projector(self.projector_kind, self.module, self.output, self.param_names, self.proj_dim,
                              self.seed if seed is None else seed, device=self.dist.device)

    def featurize(self, store: FeatureStore, snap: str, train_dataset: Dataset, query_dataset: Dataset) -> None:
        """Fill my pending shards of snapshot `snap` (the module holds its weights; the store knows the snapshot)."""
        # An independent projection per snapshot (as TRAK's ensembles): averaging over snapshots then also averages
        # out projection noise, and a resumed run recomputes the same one.
        seed = derive_seed(self.seed, snap)
        if self.projector_kind in HOOKED_KINDS:
            # Kronecker-factorized / tensor-sketched features straight from one batched backward: no per-example gradients,
            # no dense projector (`grads(batch)` already returns (B, k) features).
            grads, projector = self.hooked_projector(seed, snap), None
        else:
            grads = PerExampleGradients(self.module, self.output, self.param_names)
            projector = RandomProjector(grads.num_params, self.proj_dim, self.projector_kind, seed,
                                        device=self.dist.device)
        for split, dataset in (("train", train_dataset), ("query", query_dataset)):
            n = len(dataset)
            if split == "train" and self.train_source is not None:
                self._captured_train_shards(store, snap, dataset, grads)
                continue
            self._check_finished_shards(store, snap, split, dataset)
            mine = [s for s in store.pending_shards(snap, split) if s % self.dist.world_size == self.dist.rank]
            for i, shard in enumerate(mine):
                lo, hi = store.shard_range(shard, n)
                feats, qw, data, excluded = self._featurize_rows(dataset, range(lo, hi), grads, projector,
                                                                 f"{split} example", snap)
                self._data_fingerprints[(split, shard)] = data
                store.write_shard(snap, split, shard, feats, qw, data=data, excluded=excluded)
                if self.progress:
                    self.progress(f"featurize {snap}/{split}", i + 1, len(mine))
        self.dist.barrier()

    def _shard_loader(self, dataset: Dataset, rows: Sequence[int]) -> DataLoader:
        return DataLoader(Subset(dataset, rows), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate_fn, num_workers=self.num_workers)

    def _captured_train_shards(self, store: FeatureStore, snap: str, dataset: Dataset, grads: Callable) -> None:
        """My train shards of `snap` from the capture's window (phi = -row / c, Q at the captured step), every
        example the window lacks featurized post hoc at the snapshot's weights (never left at zero)."""
        window = read_window(self.train_source.root, snap, self.train_source.window_steps)
        if window is None:
            warnings.warn(f"captured TRAK: snapshot {snap!r} has no captured window (taken outside the capture?): "
                          "its training features are computed post hoc", RuntimeWarning, stacklevel=3)
        n, captured = len(dataset), 0
        for shard in range(store.num_shards(n)):
            if shard % self.dist.world_size != self.dist.rank:
                continue
            lo, hi = store.shard_range(shard, n)
            k = int(grads.proj_dim)
            feats, weights = np.zeros((hi - lo, k), dtype=np.float32), np.zeros(hi - lo, dtype=np.float32)
            have = np.zeros(hi - lo, dtype=bool)
            if window is not None:
                a, b = np.searchsorted(window.ids, [lo, hi])
                rows = window.ids[a:b] - lo
                feats[rows], weights[rows], have[rows] = window.features[a:b], window.loss_weight[a:b], True
            bad = np.flatnonzero(have & ~(np.isfinite(feats).all(1) & np.isfinite(weights)))
            if len(bad) and self.non_finite == "raise":
                raise ValueError(f"non-finite captured feature or Q for train example {lo + int(bad[0])} at snapshot "
                                 f"{snap!r}: its training step's output or gradient was NaN/inf. Check that example, "
                                 "or pass non_finite='exclude'")
            excluded = [lo + int(b) for b in bad]
            feats[bad], weights[bad] = 0, 0
            missing = np.flatnonzero(~have)
            if len(missing):
                f, w, _, ex = self._featurize_rows(dataset, (lo + missing).tolist(), grads, None,
                                                   "train example", snap)
                feats[missing], weights[missing] = f, w
                excluded += ex
            captured += int(have.sum())
            store.write_shard(snap, "train", shard, feats, weights, data=None, excluded=sorted(excluded))
        total = self.dist.all_reduce_sum(torch.tensor([float(captured)], device=self.dist.device))
        self.captured_rows[snap] = int(total[0])

    def _featurize_rows(self, dataset: Dataset, rows: Sequence[int], grads: Callable,
                        projector: RandomProjector | None, what: str, snap_name: str
                        ) -> tuple[np.ndarray, np.ndarray, str, list[int]]:
        """Features and loss weights of dataset rows `rows` (in order), the fingerprint of the data they came from
        (hashed from the collated batches as they pass: no second read), and the rows excluded as non-finite."""
        rows = list(rows)
        loader = self._shard_loader(dataset, rows)
        n = len(rows)
        feats, weights, pos = None, np.empty(n, dtype=np.float32), 0
        fingerprint, excluded = BatchFingerprint(), []
        was_training = self.module.training
        self.module.eval()
        try:
            for batch in loader:
                fingerprint.update(batch)
                batch = move_to(batch, self.dist.device)
                g = grads(batch)  # (B, p) gradients, or (B, k) features when projector is None (factorized)
                q = self.output.loss_weight(self.module, batch)
                ids = rows[pos:pos + g.shape[0]]
                bad = self._non_finite_rows(g, q, ids, what, snap_name)
                if len(bad):  # only with non_finite="exclude": zero features, zero weight, listed
                    g, q = g.clone(), q.clone()
                    g[bad], q[bad] = 0, 0
                    excluded.extend(ids[int(b)] for b in bad)
                f = projector(g) if projector is not None else g
                if self.method.normalize_features:
                    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
                if feats is None:  # k is known once the first batch is featurized
                    feats = np.empty((n, f.shape[1]), dtype=np.float32)
                feats[pos:pos + f.shape[0]] = f.cpu().numpy()
                weights[pos:pos + f.shape[0]] = q.cpu().numpy()
                pos += g.shape[0]
        finally:
            self.module.train(was_training)
        if pos != n:
            raise ValueError(f"the data loader gave {pos} {what}s for {n} rows from {rows[0] if rows else 0}: the "
                             "dataset's __len__ and its items disagree")
        return feats, weights, fingerprint.hexdigest(), excluded

    def _non_finite_rows(self, g: torch.Tensor, q: torch.Tensor, ids: list[int], what: str, snap_name: str) -> list[int]:
        """Rows of a batch whose gradient or loss weight (TRAK's Q, from the outputs) is NaN/inf: an error naming
        the first, or (non_finite="exclude") their positions in the batch."""
        # fast path: a finite total means every entry is finite (the full check only runs otherwise)
        if torch.isfinite(g.sum()) and torch.isfinite(q.sum()):
            return []
        bad_g = ~torch.isfinite(g).all(dim=1)
        bad = (bad_g | ~torch.isfinite(q)).nonzero().flatten().tolist()
        if self.non_finite == "exclude":
            return bad
        idx = bad[0]
        which = ("gradient" if bool(bad_g[idx]) else
                 f"output (loss weight Q = {float(q[idx])} of output {self.output.name!r}: a NaN/inf logit or output)")
        raise ValueError(
            f"non-finite {which} for {what} {ids[idx]} at snapshot {snap_name!r}: its loss or output is NaN/inf. "
            "Check that example and the model's numerics, or pass non_finite='exclude' to drop such examples "
            "(listed in the manifest); shards finished so far are kept on disk."
        )

    def _check_finished_shards(self, store: FeatureStore, snap: str, split: str, dataset: Dataset) -> None:
        """Reuse a finished shard of mine only if its bytes match its record and its data fingerprint matches this
        run's data (re-read through the loader, no forward pass); otherwise discard it, saying why."""
        n = len(dataset)
        for shard in range(store.num_shards(n)):
            if shard % self.dist.world_size != self.dist.rank or not store.is_done(snap, split, shard):
                continue
            problem = store.check_shard(snap, split, shard)
            if problem is None and store.record(snap, split, shard).get("data") != self._data_fingerprint(
                    dataset, split, shard, *store.shard_range(shard, n)):
                problem = "its examples (inputs, targets or their order) differ from this run's"
            if problem:
                warnings.warn(f"recomputing shard {shard} of {snap}/{split} in {store.root}: {problem}",
                              RuntimeWarning, stacklevel=2)
                store.discard_shard(snap, split, shard)

    def _data_fingerprint(self, dataset: Dataset, split: str, shard: int, lo: int, hi: int) -> str:
        """This run's fingerprint of rows [lo, hi) (cached: computed once per run, whatever the snapshots)."""
        key = (split, shard)
        if key not in self._data_fingerprints:
            fingerprint = BatchFingerprint()
            for batch in self._shard_loader(dataset, range(lo, hi)):
                fingerprint.update(batch)
            self._data_fingerprints[key] = fingerprint.hexdigest()
        return self._data_fingerprints[key]

"""Featurize -> reduce training statistics -> fit -> score, streamed through the feature store.

Plain torch: `Attributor` runs in one process with `LocalDist`, or under DDP with any `Dist` (the
Lightning callback passes its strategy's). Work is split by shard (`shard % world_size == rank`) and by
query block; the kernel and self-influence are all-reduced; rank 0 assembles and publishes the result files.

Never silently wrong: global rank 0 holds the out_dir lock for the whole run; every finished shard is checked
against its record (bytes and the fingerprint of the data it came from) before reuse and recomputed when it
differs; changed settings or weights recompute their features; outputs (TRAK's Q), gradients, kernels, scores and
self-influence are checked finite (an error naming the example and snapshot, or with `non_finite="exclude"` those
examples are dropped and listed in the manifest); the result is staged and published as one unit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import __version__
from .batches import move_to
from .dist import Dist, LocalDist
from .io import BatchFingerprint, derive_seed, tensor_bytes
from .lock import OutDirLock, OutDirLockedError
from .sketch import make_projector
from .linalg import TrainGram, use_dual_form
from .gradients import PerExampleGradients, ParamSelector, select_parameters
from .methods.base import FeatureMethod, SnapshotInfo, TrainStatistics
from .methods.context import ModelContext
from .outputs import OutputFunction, resolve_output
from .projection import HOOKED_KINDS, RandomProjector
from .results import (AttributionResult, ResultStaging, check_finite, load_results,
                      remove_stale_staging)
from .scoring import RankParts, prefetched
from .settings import FeatureSettings
from .store import FeatureStore, ensure_writable_dir
from .windows import CapturedTrainSource, read_window

Progress = Callable[[str, int, int], None]
SCORE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Snapshot:
    """Weights to featurize at: an in-memory state dict, or a file (our snapshot `.pt` or a Lightning `.ckpt`)."""

    name: str
    state_dict: dict | None = None
    path: str | None = None
    lr: float | None = None
    step: int | None = None
    epoch: int | None = None
    extra: dict = field(default_factory=dict)

    def load(self) -> dict:
        if self.state_dict is not None:
            return self.state_dict
        if self.path is None:
            raise ValueError(f"snapshot {self.name!r} has neither a state_dict nor a path")
        obj = torch.load(self.path, map_location="cpu", weights_only=False)
        return obj.get("state_dict", obj) if isinstance(obj, dict) else obj

    @property
    def info(self) -> SnapshotInfo:
        return SnapshotInfo(self.name, self.lr, self.step, self.epoch)


def weights_fingerprint(state_dict: dict) -> str:
    """The identity of a set of weights: SHA-256 of every tensor's name, dtype, shape and bytes (a permutation or
    a single changed weight changes it; about 1 s per 2 GB of weights)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if isinstance(t, torch.Tensor):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(tensor_bytes(t))
    return h.hexdigest()


def _dataset_len(dataset: Dataset, what: str) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"{what} must be a map-style dataset with __len__ (got {type(dataset).__name__})") from err
    if n == 0:
        raise ValueError(f"{what} is empty: pass a dataset with at least one example")
    return n


class Attributor:
    """Computes attribution scores of `method` for a module, a training set and a query set.

    Args:
        module: the model (any nn.Module; its `forward` gives logits for the built-in outputs).
        method: a `FeatureMethod` (e.g. `TRAK()`).
        train_dataset, query_dataset: map-style datasets; rows of the result follow their index order.
        out_dir: where the feature store (`out_dir/features`) and result files go.
        proj_dim, projector, seed: the random projection: "tensorsketch" (default; count sketches from layer hooks,
            as accurate as a dense projection at a fraction of the cost), "rademacher"/"gaussian" (dense),
            "factorized" (Kronecker), "identity" (full gradients).
        params: which parameters to attribute through (names/prefixes/predicate; default all trainable).
        output_fn: overrides the method's output function: a name or a callable (module, batch) -> (B,).
        batch_size, shard_size, query_chunk: memory/throughput knobs; shard_size is the resumption unit.
        collate_fn, num_workers: as for a DataLoader over the datasets.
        dist: collectives (`LocalDist()` by default); `device` comes from it.
        progress: optional callback `(stage, done, total)`.
        self_influence: compute self-influence (one extra T_c per training example: free for TRAK-like methods,
            n_train iterative solves for influence/cg and lissa). When False, `self_influence.npy` holds NaN.
        score_dtype: precision of the big train x query matmul. The kernel, its inverse and the query transform
            T_c are float64 either way; "float32" (default) casts the transformed queries once and multiplies at
            float32 BLAS speed (about 2x float64; error ~1e-6 of |phi_i| |T_c phi_q|, so relatively more where
            scores cancel), "float64" multiplies in float64 (exact reference comparisons). Stored scores are float32.
        top_k: None (default) writes the full (n_train, n_query) matrix `scores.npy`. An int k keeps only each
            query's k highest (proponents) and k lowest (opponents) scores, computed streaming over the train
            shards without ever holding n_train x n_query (`topk_*.npy`, see `core/results.py`); k larger than
            n_train keeps all n_train, ranked.
        non_finite: "raise" (default): a NaN/inf in an output (TRAK's Q), gradient, kernel, score or self-influence
            is an error naming the example and snapshot. "exclude": examples with a non-finite gradient or Q get
            zero features (no effect on the kernel), NaN scores and self-influence (ranked last everywhere), and are
            listed in `manifest["excluded"]`.
        train_source: TRAK's training features from a `GradientCapture`'s snapshot windows (`core/windows.py`,
            `GradientCapture.train_source()`): no second pass over the training set; the capture's projector (kind,
            k, seed, parameters) replaces `projector`/`proj_dim`/`seed`/`params`, and the queries and every training
            example a window lacks are featurized post hoc with it at the snapshot's weights.
    """

    def __init__(self, module: nn.Module, method: FeatureMethod, train_dataset: Dataset, query_dataset: Dataset,
                 out_dir: str | os.PathLike, *, proj_dim: int = 2048, projector: str = "tensorsketch", seed: int = 0,
                 params: ParamSelector = None, output_fn: str | OutputFunction | Callable | None = None,
                 batch_size: int = 64, shard_size: int = 512, query_chunk: int = 1024,
                 collate_fn: Callable | None = None, num_workers: int = 0, dist: Dist | None = None,
                 progress: Progress | None = None, self_influence: bool = True, score_dtype: str = "float32",
                 top_k: int | None = None, non_finite: str = "raise", train_source: CapturedTrainSource | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(method, FeatureMethod):
            raise TypeError(f"method must be a FeatureMethod (e.g. TRAK()), got {type(method).__name__}")
        for name, val in (("batch_size", batch_size), ("shard_size", shard_size), ("query_chunk", query_chunk)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be 'float32' (fast, the default) or 'float64' (for exact reference "
                             f"comparisons), got {score_dtype!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
            raise ValueError(f"top_k must be None (write the full score matrix) or a positive integer (keep each "
                             f"query's top k proponents and opponents), got {top_k!r}")
        self.n_train = _dataset_len(train_dataset, "train_dataset")
        self.n_query = _dataset_len(query_dataset, "query_dataset")
        self.module, self.method = module, method
        self.train_dataset, self.query_dataset = train_dataset, query_dataset
        self.out_dir = Path(out_dir)
        self.dist = dist or LocalDist()
        self.output = resolve_output(output_fn, default=method.output, module=module, method=method,
                                     dataset=train_dataset, collate_fn=collate_fn)  # task detected from the data
        self.train_source = train_source
        if train_source is not None:   # the capture's projection, on both sides
            self._check_train_source(train_source)
            params = list(train_source.param_names)
            projector, proj_dim, seed = (train_source.projector, int(train_source.layout["requested_dim"]),
                                         int(train_source.layout["seed"]))
        self.param_names = select_parameters(module, params)
        choose = getattr(method, "choose_projector", None)  # e.g. influence solvers that need full gradients
        if callable(choose):
            projector = choose(module, self.param_names, projector, self.output)
        self.proj_dim, self.projector_kind, self.seed = proj_dim, projector, seed
        self.batch_size, self.shard_size, self.query_chunk = batch_size, shard_size, query_chunk
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.progress = progress
        self.compute_self_influence = bool(self_influence)
        self.score_dtype = score_dtype
        self.top_k = None if top_k is None else min(top_k, self.n_train)  # more than n_train: all of them, ranked
        self.settings = self._feature_settings(non_finite)  # validates; before any file is written
        self.timings: dict[str, float] = {}
        self._data_fingerprints: dict[tuple[str, int], str] = {}  # (split, shard) -> fingerprint, this run's data
        self.captured_rows: dict[str, int] = {}   # snapshot -> train rows taken from the capture (train_source)
        if self.dist.rank == 0:  # every argument is valid: only now is out_dir created
            ensure_writable_dir(self.out_dir, "out_dir")

    def _check_train_source(self, source: CapturedTrainSource) -> None:
        task = getattr(self.output, "task", None)
        if getattr(self.output, "kind", None) != "margin" or task is None or task.name != source.task or callable(
                getattr(self.method, "prepare", None)):
            raise ValueError(f"train_source: captured training features are margin features of the {source.task} task "
                             f"for methods that use features only (TRAK); this run attributes {self.output.name!r} with "
                             f"{self.method.name!r}: drop train_source")

    def _feature_settings(self, non_finite: str) -> FeatureSettings:
        params = dict(self.module.named_parameters())
        return FeatureSettings(
            projector=self.projector_kind, proj_dim=self.proj_dim, seed=self.seed, output=self.output.name,
            normalize=bool(self.method.normalize_features),
            params=hashlib.sha1(";".join(f"{n}:{tuple(params[n].shape)}" for n in self.param_names).encode()).hexdigest(),
            num_params=int(sum(params[n].numel() for n in self.param_names)), non_finite=non_finite,
            train_features=("post-hoc" if self.train_source is None else f"captured:{self.train_source.layout_hash}"),
        )

    # -- public ----------------------------------------------------------------------------------
    def run(self, snapshots: Sequence[Snapshot] | None = None) -> AttributionResult:
        """Featurize every selected snapshot (resuming), fit, score, publish the result files; all ranks return them.

        Global rank 0 holds the out_dir lock throughout: a second writer into the same out_dir fails here, before
        any work."""
        original = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        if not snapshots:
            snapshots = [Snapshot("final", state_dict=original)]
        snapshots = list(snapshots)
        if self.method.snapshot_policy == "last":
            snapshots = snapshots[-1:]
        self._check_snapshots_readable(snapshots)
        self._data_fingerprints.clear()  # the data may have changed since an earlier run() of this Attributor
        lock = self._acquire_lock()
        try:
            return self._run(snapshots, original)
        finally:
            if lock is not None:
                lock.release()

    def _acquire_lock(self) -> OutDirLock | None:
        """Rank 0 takes the out_dir lock (clearing what killed writers left); every rank learns if it failed."""
        lock, error = None, None
        if self.dist.rank == 0:
            try:
                lock = OutDirLock(self.out_dir).acquire()
                remove_stale_staging(self.out_dir)
                self._parts().remove()
            except OutDirLockedError as err:
                error = err
        failed = self.dist.all_reduce_sum(torch.tensor([1.0 if error else 0.0], device=self.dist.device))
        if error is not None:
            raise error
        if float(failed[0]) > 0:
            raise OutDirLockedError(f"out_dir={str(self.out_dir)!r} is being written by another run (rank 0 could "
                                    "not take its lock): wait for it to finish or use another out_dir")
        return lock

    def _check_snapshots_readable(self, snapshots: list[Snapshot]) -> None:
        """Every rank must read every snapshot file (rank 0 wrote them; other nodes need a shared filesystem)."""
        for snap in snapshots:
            if snap.state_dict is None and snap.path is not None and not os.access(snap.path, os.R_OK):
                raise FileNotFoundError(
                    f"rank {self.dist.rank} cannot read snapshot {snap.name!r} at {snap.path}: "
                    + ("the file does not exist on this node" if not os.path.exists(snap.path) else "permission denied")
                    + ". On several nodes, put the snapshot directory (CheckpointCapture dirpath) on a filesystem "
                    "every node mounts, or copy it to the same path on every node."
                )

    def _run(self, snapshots: list[Snapshot], original: dict) -> AttributionResult:
        device = self.dist.device
        self.module.to(device)
        try:
            store = self._open_store()
            t0 = time.perf_counter()
            # Optional hook for methods that need the model and the training data, not just features (influence
            # functions with explicit/cg/lissa/ekfac curvature): `method.prepare(ModelContext)` runs on every rank
            # right after each snapshot is featurized, while the module holds that snapshot's weights.
            prepare, prepare_s = getattr(self.method, "prepare", None), 0.0
            for c, snap in enumerate(snapshots):
                self._featurize_snapshot(store, snap)
                if callable(prepare):
                    t1 = time.perf_counter()
                    prepare(self._model_context(store, c, snap))
                    prepare_s += time.perf_counter() - t1
            self.timings["featurize_s"] = time.perf_counter() - t0 - prepare_s
            if callable(prepare):
                self.timings["prepare_s"] = prepare_s
        finally:
            self.module.load_state_dict(original)
        t0 = time.perf_counter()
        stats = self._train_statistics(store, snapshots)
        self._check_kernels(stats, snapshots)
        self.method.fit(stats)
        self.timings["fit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        weights = self.method.train_weights()
        excluded = self._excluded_rows(store, snapshots)
        self_influence = (self._self_influence(store, snapshots, weights) if self.compute_self_influence
                          else np.full(self.n_train, np.nan))
        if self.compute_self_influence:
            self_influence[excluded["train"]] = np.nan
            check_finite(f"self-influence (snapshots {[s.name for s in snapshots]})", self_influence,
                         excluded["train"])
        self._score_my_queries(store, snapshots, weights, excluded)
        self.timings["score_s"] = time.perf_counter() - t0
        self.dist.barrier()
        if self.dist.rank == 0:
            self._write_results(store, snapshots, self_influence, excluded)
        self.dist.barrier()
        return load_results(self.out_dir, verify=False)  # just published under our lock: sizes and shapes suffice

    # -- featurization ---------------------------------------------------------------------------
    def _store_settings(self) -> dict:
        """`FeatureSettings.to_dict()`: the store's settings and the manifest's "features" entry."""
        if self.projector_kind in HOOKED_KINDS and self.settings.factorized_layout is None:
            # which layers are factorized and how k is split among them
            self.settings = dataclasses.replace(self.settings,
                                                factorized_layout=self._factorized_projector().layout_hash)
        return self.settings.to_dict()

    def _factorized_projector(self, seed: int | None = None):
        if self.train_source is not None:   # one projection for every snapshot: the capture's
            return self.train_source.make_projector(self.module, self.output)
        return make_projector(self.projector_kind, self.module, self.output, self.param_names, self.proj_dim,
                              self.seed if seed is None else seed, device=self.dist.device)

    def _open_store(self) -> FeatureStore:
        root = self.out_dir / "features" / self.output.name
        settings = self._store_settings()
        if self.dist.rank == 0:  # other settings or shard size than the store's: its features are recomputed
            store = FeatureStore.open(root, settings, self.shard_size)
        self.dist.barrier()
        if self.dist.rank != 0:
            store = FeatureStore(root, settings, self.shard_size, create=False)
        return store

    def _featurize_snapshot(self, store: FeatureStore, snap: Snapshot) -> None:
        state = snap.load()
        try:
            self.module.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"snapshot {snap.name!r} does not fit the module ({str(err).splitlines()[0]}): the checkpoints "
                "belong to another model; pass snapshots of this architecture"
            ) from err
        if self.dist.rank == 0:  # other weights or other example counts than stored: recomputed
            store.register_snapshot(snap.name, weights_fingerprint(state), replace=True)
            store.create(snap.name, "train", np.arange(self.n_train), replace=True)
            store.create(snap.name, "query", np.arange(self.n_query), replace=True)
        self.dist.barrier()
        # An independent projection per snapshot (as TRAK's ensembles): averaging over snapshots then also averages
        # out projection noise, and a resumed run recomputes the same one.
        seed = derive_seed(self.seed, snap.name)
        if self.projector_kind in HOOKED_KINDS:
            # Kronecker-factorized / tensor-sketched features straight from one batched backward: no per-example gradients,
            # no dense projector (`grads(batch)` already returns (B, k) features).
            grads, projector = self._factorized_projector(seed), None
        else:
            grads = PerExampleGradients(self.module, self.output, self.param_names)
            projector = RandomProjector(grads.num_params, self.proj_dim, self.projector_kind, seed,
                                        device=self.dist.device)
        for split, dataset in (("train", self.train_dataset), ("query", self.query_dataset)):
            n = len(dataset)
            if split == "train" and self.train_source is not None:
                self._captured_train_shards(store, snap, grads)
                continue
            self._check_finished_shards(store, snap.name, split, dataset)
            mine = [s for s in store.pending_shards(snap.name, split) if s % self.dist.world_size == self.dist.rank]
            for i, shard in enumerate(mine):
                lo, hi = store.shard_range(shard, n)
                feats, qw, data, excluded = self._featurize_rows(dataset, range(lo, hi), grads, projector,
                                                                 f"{split} example", snap.name)
                self._data_fingerprints[(split, shard)] = data
                store.write_shard(snap.name, split, shard, feats, qw, data=data, excluded=excluded)
                if self.progress:
                    self.progress(f"featurize {snap.name}/{split}", i + 1, len(mine))
        self.dist.barrier()

    def _shard_loader(self, dataset: Dataset, rows: Sequence[int]) -> DataLoader:
        return DataLoader(Subset(dataset, rows), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate_fn, num_workers=self.num_workers)

    def _captured_train_shards(self, store: FeatureStore, snap: Snapshot, grads: Callable) -> None:
        """My train shards of `snap` from the capture's window (phi = -row / c, Q at the captured step), every
        example the window lacks featurized post hoc at the snapshot's weights (never left at zero)."""
        window = read_window(self.train_source.root, snap.name, self.train_source.window_steps)
        if window is None:
            warnings.warn(f"captured TRAK: snapshot {snap.name!r} has no captured window (taken outside the capture?): "
                          "its training features are computed post hoc", RuntimeWarning, stacklevel=3)
        n, captured = self.n_train, 0
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
            if len(bad) and self.settings.non_finite == "raise":
                raise ValueError(f"non-finite captured feature or Q for train example {lo + int(bad[0])} at snapshot "
                                 f"{snap.name!r}: its training step's output or gradient was NaN/inf. Check that example, "
                                 "or pass non_finite='exclude'")
            excluded = [lo + int(b) for b in bad]
            feats[bad], weights[bad] = 0, 0
            missing = np.flatnonzero(~have)
            if len(missing):
                f, w, _, ex = self._featurize_rows(self.train_dataset, (lo + missing).tolist(), grads, None,
                                                   "train example", snap.name)
                feats[missing], weights[missing] = f, w
                excluded += ex
            captured += int(have.sum())
            store.write_shard(snap.name, "train", shard, feats, weights, data=None, excluded=sorted(excluded))
        total = self.dist.all_reduce_sum(torch.tensor([float(captured)], device=self.dist.device))
        self.captured_rows[snap.name] = int(total[0])

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
        if self.settings.non_finite == "exclude":
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

    def _excluded_rows(self, store: FeatureStore, snapshots: list[Snapshot]) -> dict[str, list[int]]:
        """Train / query rows excluded as non-finite at any snapshot (from the shard records), on every rank."""
        out = {}
        for split, n in (("train", self.n_train), ("query", self.n_query)):
            mask = torch.zeros(n, dtype=torch.float64, device=self.dist.device)
            if self.settings.non_finite == "exclude":
                for snap in snapshots:
                    for s in range(store.num_shards(n)):
                        if s % self.dist.world_size == self.dist.rank:
                            mask[store.record(snap.name, split, s).get("excluded", [])] = 1
                mask = self.dist.all_reduce_sum(mask)
            out[split] = mask.nonzero().flatten().cpu().tolist()
        return out

    def _check_kernels(self, stats: TrainStatistics, snapshots: list[Snapshot]) -> None:
        """Kernels and mean loss weights must be finite (named by snapshot) before any inverse is taken."""
        for c, kernel in enumerate(stats.kernels or []):
            if not torch.isfinite(kernel).all():
                raise ValueError(f"the feature kernel of snapshot {snapshots[c].name!r} is not finite (features too "
                                 "large for float64?): check the model's numerics at that snapshot")
        if stats.loss_weight is not None and not torch.isfinite(stats.loss_weight).all():
            row = int((~torch.isfinite(stats.loss_weight)).nonzero()[0])
            raise ValueError(f"non-finite mean loss weight for train example {row}: its outputs are NaN/inf at some "
                             "snapshot")

    def _model_context(self, store: FeatureStore, index: int, snap: Snapshot) -> ModelContext:
        """What `method.prepare` sees (see `methods/context.py`): module at `snap`'s weights, training data, features."""
        mine = self._my_train_shards(store)
        local_rows = np.concatenate([np.arange(*store.shard_range(s, self.n_train)) for s in mine] or
                                    [np.zeros(0, dtype=np.int64)])

        def train_batches(rows, batch_size: int | None = None):
            loader = DataLoader(Subset(self.train_dataset, [int(r) for r in rows]), batch_size=batch_size or self.batch_size,
                                shuffle=False, collate_fn=self.collate_fn, num_workers=self.num_workers)
            return (move_to(batch, self.dist.device) for batch in loader)

        def train_features():
            return ((lo, hi, f) for lo, hi, f, _ in store.iter_shards(snap.name, "train", mine))

        return ModelContext(
            module=self.module, param_names=self.param_names, output=self.output, dist=self.dist,
            snapshot_index=index, snapshot=snap.info, n_train=self.n_train, local_rows=local_rows,
            train_batches=train_batches, train_features=train_features,
            projector={"projector": self.projector_kind, "proj_dim": self.proj_dim, "seed": self.seed},
            batch_size=self.batch_size,
        )

    # -- statistics, scoring ---------------------------------------------------------------------
    def _my_train_shards(self, store: FeatureStore) -> list[int]:
        return [s for s in range(store.num_shards(self.n_train)) if s % self.dist.world_size == self.dist.rank]

    def _train_statistics(self, store: FeatureStore, snapshots: list[Snapshot]) -> TrainStatistics:
        device = self.dist.device
        dim = self._feature_dim(store, snapshots[0])
        kernels, q_sum = [], torch.zeros(self.n_train, dtype=torch.float64, device=device)
        dual = getattr(self.method, "supports_dual", False) and use_dual_form(self.n_train, dim)
        for snap in snapshots:
            gram = (TrainGram(self.n_train, dim, dual, SCORE_DTYPES[self.score_dtype], device)
                    if self.method.needs_kernel else None)
            for lo, hi, f, w in store.iter_shards(snap.name, "train", self._my_train_shards(store)):
                if gram is not None:
                    gram.add(lo, hi, f)
                q_sum[lo:hi] += torch.from_numpy(w).to(device, torch.float64)
            if gram is not None:
                kernels.append(gram.reduce(self.dist))
        q_mean = self.dist.all_reduce_sum(q_sum) / len(snapshots)
        return TrainStatistics([s.info for s in snapshots], self.n_train, dim, kernels=None if dual else (kernels or None),
                               train_features=kernels if dual else None, loss_weight=q_mean)

    def _feature_dim(self, store: FeatureStore, snap: Snapshot) -> int:
        return int(store.read_shard(snap.name, "train", 0)[0].shape[1])

    def _self_influence(self, store: FeatureStore, snapshots: list[Snapshot], weights: torch.Tensor | None) -> np.ndarray:
        device = self.dist.device
        out = torch.zeros(self.n_train, dtype=torch.float64, device=device)
        for c, snap in enumerate(snapshots):
            for lo, hi, f, _ in store.iter_shards(snap.name, "train", self._my_train_shards(store)):
                out[lo:hi] += self.method.self_scores(c, torch.from_numpy(f).to(device), SCORE_DTYPES[self.score_dtype],
                                                      rows=(lo, hi))
        if weights is not None:
            out *= weights.to(device)
        return self.dist.all_reduce_sum(out).cpu().numpy()

    def _read_rows(self, store: FeatureStore, snap: str, split: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a split as float64, copying only those rows out of the memory-mapped shards."""
        n = len(store.ids(snap, split))
        parts = []
        for s in range(lo // store.shard_size, math.ceil(hi / store.shard_size)):
            s_lo, s_hi = store.shard_range(s, n)
            parts.append(store.read_features(snap, split, s)[max(lo, s_lo) - s_lo: min(hi, s_hi) - s_lo])
        return torch.from_numpy(np.concatenate(parts)).to(self.dist.device, torch.float64)

    def _parts(self) -> RankParts:
        return RankParts(self.out_dir, self.n_train, self.n_query, self.dist.world_size)

    def _score_my_queries(self, store: FeatureStore, snapshots: list[Snapshot], weights: torch.Tensor | None,
                          excluded: dict[str, list[int]]) -> None:
        """Scores of my query block, streamed over the train shards, into this rank's part file: the full
        columns, or with `top_k` each query's running top k (never n_train x n_query in memory)."""
        parts = self._parts()
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
            queries = [self.method.transform(c, self._read_rows(store, s.name, "query", c_lo, c_hi))
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

    def _write_results(self, store: FeatureStore, snapshots: list[Snapshot], self_influence: np.ndarray,
                       excluded: dict[str, list[int]]) -> None:
        """Assemble the ranks' parts into a staging directory and publish it as one unit (`ResultStaging`)."""
        staging, parts = ResultStaging(self.out_dir), self._parts()
        try:
            if self.top_k:
                parts.assemble_topk(staging, excluded)
            else:
                parts.assemble_scores(staging, excluded)
            staging.save("self_influence.npy", self_influence.astype(np.float32))
            staging.save("train_ids.npy", store.ids(snapshots[0].name, "train"))
            staging.save("query_ids.npy", store.ids(snapshots[0].name, "query"))
            staging.publish(self._manifest(store, snapshots, excluded))
        finally:
            staging.discard()
            parts.remove()

    def _manifest(self, store: FeatureStore, snapshots: list[Snapshot], excluded: dict[str, list[int]]) -> dict:
        return {
            "lightning_attrib_version": __version__,
            **self.method.describe(),
            "output": self.output.name,
            "projector": self.projector_kind, "proj_dim": self._feature_dim(store, snapshots[0]), "seed": self.seed,
            "params": self.param_names if len(self.param_names) <= 64 else f"{len(self.param_names)} tensors",
            "num_params": self.settings.num_params,
            "features": self._store_settings(),
            "n_train": self.n_train, "n_query": self.n_query,
            "snapshots": [vars(s.info) for s in snapshots],
            "world_size": self.dist.world_size,
            "constant_self_influence": self.method.constant_self_influence,
            "self_influence_computed": self.compute_self_influence,
            "score_dtype": self.score_dtype,
            "top_k": self.top_k,
            "non_finite": self.settings.non_finite,
            "excluded": excluded,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "train_features": ("post-hoc: featurized at every snapshot" if self.train_source is None else
                               {**self.train_source.describe(), "captured_rows": dict(self.captured_rows),
                                "post_hoc_rows": {k: self.n_train - v for k, v in self.captured_rows.items()}}),
            "sign": "positive = the training example helps the query (raises its output / lowers its loss)",
        }

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
import os
import time
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
from .io import tensor_bytes
from .lock import OutDirLock, OutDirLockedError
from .features import SnapshotFeaturizer
from .gradients import ParamSelector, select_parameters
from .methods.base import FeatureMethod, SnapshotInfo, TrainStatistics
from .methods.context import ModelContext
from .outputs import OutputFunction, resolve_output
from .projection import HOOKED_KINDS
from .results import (AttributionResult, ResultStaging, check_finite, load_results,
                      remove_stale_staging)
from .scorer import SCORE_DTYPES, Scorer
from .scoring import RankParts
from .settings import FeatureSettings
from .store import FeatureStore, ensure_writable_dir
from .windows import CapturedTrainSource

Progress = Callable[[str, int, int], None]


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
        # the stages: feature source -> scorer -> (rank 0) result writer
        self.featurizer = SnapshotFeaturizer(
            module, method, self.output, self.param_names, self.projector_kind, self.proj_dim, self.seed, self.dist,
            batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers, non_finite=non_finite,
            train_source=train_source, progress=progress)
        self.scorer = Scorer(method, self.n_train, self.n_query, self.dist, self._parts(), score_dtype=score_dtype,
                             query_chunk=query_chunk, top_k=self.top_k, progress=progress)
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
        self.featurizer.reset()  # the data may have changed since an earlier run() of this Attributor
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
        self.scorer.check_kernels(stats, snapshots)
        self.method.fit(stats)
        self.timings["fit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        weights = self.method.train_weights()
        excluded = self._excluded_rows(store, snapshots)
        self_influence = (self.scorer.self_influence(store, snapshots, weights) if self.compute_self_influence
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
        return self.featurizer.hooked_projector(seed)

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
        self.featurizer.featurize(store, snap.name, self.train_dataset, self.query_dataset)

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
        return self.scorer.my_train_shards(store)

    def _train_statistics(self, store: FeatureStore, snapshots: list[Snapshot]) -> TrainStatistics:
        return self.scorer.train_statistics(store, snapshots)

    def _feature_dim(self, store: FeatureStore, snap: Snapshot) -> int:
        return self.scorer.feature_dim(store, snap)

    def _parts(self) -> RankParts:
        return RankParts(self.out_dir, self.n_train, self.n_query, self.dist.world_size)

    def _score_my_queries(self, store: FeatureStore, snapshots: list[Snapshot], weights: torch.Tensor | None,
                          excluded: dict[str, list[int]]) -> None:
        """Scores of my query block into this rank's part file (`Scorer.score_queries`)."""
        self.scorer.score_queries(store, snapshots, weights, excluded)

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
                               {**self.train_source.describe(), "captured_rows": dict(self.featurizer.captured_rows),
                                "post_hoc_rows": {k: self.n_train - v for k, v in self.featurizer.captured_rows.items()}}),
            "sign": "positive = the training example helps the query (raises its output / lowers its loss)",
        }

"""What a model-based method sees before `fit`: the module at a snapshot's weights and the training data.

Most methods score from stored features alone. Influence functions with an explicit, conjugate-gradient,
LiSSA or EK-FAC solver also need the curvature of the training loss, i.e. the model and the training
data. Such a method defines `prepare(context: ModelContext)`; `Attributor.run` calls it once per
selected snapshot, right after that snapshot is featurized (the module then holds its weights) and
before `fit`. `prepare` runs on every rank (it is collective, like `fit`'s kernel reduction):

* sums over `local_rows` (this rank's training rows) followed by `dist.all_reduce_sum` are sums over the
  whole training set, exactly like the TRAK kernel;
* `train_batches(rows)` with rows of every rank (`range(n_train)`) lets a rank see the whole training
  set without collectives (what the iterative solvers use, so that `transform` stays rank-local).

The module must not be modified, and its weights are restored after `prepare` returns: a method that
needs them later (e.g. for Hessian-vector products during scoring) keeps its own copy.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from .base import SnapshotInfo


@dataclass
class ModelContext:
    """The module at one snapshot, its training data and the pipeline's settings (see the module docstring).

    Attributes:
        module: the model, loaded with the snapshot's weights, on `dist.device` (do not modify it).
        param_names: the attributed parameters, in the order their gradients are flattened in the features.
        output: the `OutputFunction` whose per-example gradients the features are (e.g. the loss).
        dist: collectives (`all_reduce_sum`, `barrier`, `rank`, `world_size`, `device`).
        snapshot_index, snapshot: which snapshot (index into the selected snapshots) and its info.
        n_train: size of the whole training set.
        local_rows: this rank's training rows (its feature shards); disjoint across ranks, covering all rows.
        train_batches: `train_batches(rows, batch_size=None)` -> iterable of training batches (rows in the given
            order, on `dist.device`, collated like the featurization batches).
        train_features: `train_features()` -> iterator of `(lo, hi, features)` over this rank's stored training
            features at this snapshot (float32 numpy, rows lo..hi of the training set).
        projector: the feature projection settings: {"projector": kind, "proj_dim": k, "seed": seed}.
        batch_size: the Attributor's batch size (a default for methods' own passes over the data).
    """

    module: nn.Module
    param_names: list[str]
    output: Any
    dist: Any
    snapshot_index: int
    snapshot: SnapshotInfo
    n_train: int
    local_rows: np.ndarray
    train_batches: Callable[..., Iterable[Any]]
    train_features: Callable[[], Iterator[tuple[int, int, np.ndarray]]]
    projector: dict = field(default_factory=dict)
    batch_size: int = 64

    def all_rows(self) -> Sequence[int]:
        return range(self.n_train)

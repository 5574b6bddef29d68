"""TracIn-CP (Pruthi et al. 2020): score(i, q) = sum_c lr_c * grad L(z_i; theta_c) . grad L(z_q; theta_c).

Sum over the captured checkpoints c of the learning rate at c times the dot product of loss gradients (or of
their projections). Positive = the training example helps the query: a gradient step on z_i lowers z_q's loss
by about lr * g_i . g_q. Self-influence sum_c lr_c ||g_i||^2 flags hard or mislabeled examples.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import FeatureMethod, TrainStatistics


class TracIn(FeatureMethod):
    """TracIn-CP over every captured snapshot.

    Args:
        lr: learning rate(s) to weight the checkpoints with: a float for all, a sequence (one per snapshot), or
            None to use each snapshot's recorded `SnapshotInfo.lr` (an error names any snapshot without one).
    """

    name = "tracin"
    output = "loss"
    snapshot_policy = "all"

    def __init__(self, lr: float | Sequence[float] | None = None):
        if lr is not None:
            values = [lr] if isinstance(lr, (int, float)) else list(lr)
            if any(not isinstance(v, (int, float)) or v <= 0 for v in values):
                raise ValueError(f"lr must be a positive number or a sequence of them, got {lr!r}")
        self.lr = lr
        self.lrs: list[float] = []

    def fit(self, stats: TrainStatistics) -> None:
        n = len(stats.snapshots)
        if self.lr is None:
            missing = [s.name for s in stats.snapshots if s.lr is None]
            if missing:
                raise ValueError(
                    f"TracIn needs the learning rate at every checkpoint; snapshots {missing} have none recorded. "
                    "Capture snapshots with their lr, or pass TracIn(lr=...) (a float or one value per snapshot)."
                )
            self.lrs = [float(s.lr) for s in stats.snapshots]
        elif isinstance(self.lr, (int, float)):
            self.lrs = [float(self.lr)] * n
        else:
            if len(self.lr) != n:
                raise ValueError(f"TracIn(lr=...) has {len(self.lr)} values for {n} snapshots: pass one per snapshot")
            self.lrs = [float(v) for v in self.lr]

    def transform(self, snapshot_index: int, features: torch.Tensor) -> torch.Tensor:
        return features.double() * self.lrs[snapshot_index]

    def describe(self) -> dict:
        return {"method": self.name, "lr": self.lrs,
                "lr_source": "snapshots" if self.lr is None else "argument"}

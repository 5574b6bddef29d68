"""The interface every feature-based attribution method implements.

All methods here score linearly in the per-snapshot features phi_c (projected gradients):

    score[i, q] = w_i * sum_c  phi_c(z_i) . T_c(phi_c(z_q))

so one streaming scorer (`core.scoring`) serves TRAK, TracIn, gradient similarity and projected
influence functions. A method says which output function its features are gradients of, which
snapshots it uses, whether it needs the training kernel sum_i phi_i phi_i^T, and then implements
`fit` (from reduced training statistics), `transform` (T_c) and `train_weights` (w).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class SnapshotInfo:
    """One set of weights the features were computed at (a captured checkpoint or the final model)."""

    name: str
    lr: float | None = None
    step: int | None = None
    epoch: int | None = None


@dataclass
class TrainStatistics:
    """Everything a method may fit on, already reduced over all training shards (and DDP ranks)."""

    snapshots: list[SnapshotInfo]
    n_train: int
    proj_dim: int
    kernels: list[torch.Tensor] | None = None   # per snapshot, (k, k) float64: sum_i phi_i phi_i^T
    train_features: list[torch.Tensor] | None = None  # dual form instead (n_train < 1.1 k): per snapshot Phi (n, k), in the score dtype
    loss_weight: torch.Tensor | None = None     # (n_train,) float64: per-example Q averaged over snapshots
    extras: dict = field(default_factory=dict)


class FeatureMethod(ABC):
    """A method that scores from stored features; see the module docstring for the scoring rule."""

    name: str = "method"
    output: str = "margin"          # output function whose gradients are the features ("margin" / "loss")
    snapshot_policy: str = "all"    # "all" captured snapshots, or "last" (the final weights)
    needs_kernel: bool = False
    supports_dual: bool = False     # fit() also takes `train_features` (n x k rows) instead of k x k kernels when n < k
    needs_loss_weight: bool = False
    normalize_features: bool = False  # cosine-style methods: features are scaled to unit norm before use
    constant_self_influence: bool = False

    @abstractmethod
    def fit(self, stats: TrainStatistics) -> None:
        """Prepare T_c and w from the training statistics."""

    @abstractmethod
    def transform(self, snapshot_index: int, features: torch.Tensor) -> torch.Tensor:
        """T_c: map (m, k) float64 features of snapshot c to what training features are dotted with."""

    def self_scores(self, snapshot_index: int, features: torch.Tensor, dtype: torch.dtype = torch.float64,
                    rows: tuple[int, int] | None = None) -> torch.Tensor:
        """phi_i . T_c(phi_i) per row, float64 (self-influence before w); `dtype` is the precision a method may
        use for its big product (TRAK: a float32 triangular solve, squares summed in float64); `rows` = (lo, hi)
        says `features` are training rows [lo, hi) of snapshot c (TRAK's dual form then reads them off G)."""
        f = features.double()
        return (f * self.transform(snapshot_index, f)).sum(dim=1)

    def train_weights(self) -> torch.Tensor | None:
        """w: (n_train,) per-training-example multiplier, or None for ones."""
        return None

    def describe(self) -> dict:
        """Parameters to record in the manifest (damping actually used, etc.)."""
        return {"method": self.name}

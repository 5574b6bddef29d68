"""TRAK (Park et al. 2023): score = Qbar_i * mean_c phi_c(z_i)^T (Phi_c^T Phi_c + lambda_c I)^-1 phi_c(z_q)."""
from __future__ import annotations

import torch

from ..linalg import (ILL_CONDITIONED, DampedInverse, DualDampedInverse, IllConditionedKernelWarning,
                      check_damping)
from .base import FeatureMethod, TrainStatistics

__all__ = ["TRAK", "solve_damped", "resolve_damping", "IllConditionedKernelWarning", "ILL_CONDITIONED",
           "DEFAULT_DAMPING_RATIO"]

# Default damping: lambda = DEFAULT_DAMPING_RATIO * trace(K) / k, i.e. relative to the kernel's mean eigenvalue.
# Chosen from the leave-one-out sweep recorded in benchmarks/RESULTS.md (lambda = 0 is near-noise when k >= n).
DEFAULT_DAMPING_RATIO = 1.0


def solve_damped(kernel: torch.Tensor, damping: float, what: str = "kernel") -> torch.Tensor:
    """The explicit inverse of (kernel + damping I) in float64 (Cholesky; see `core.linalg.DampedInverse`)."""
    return DampedInverse(kernel, damping, what).matrix()


def resolve_damping(kernel: torch.Tensor, damping: float | None, damping_ratio: float, dim: int | None = None) -> float:
    """Absolute damping if given, else `damping_ratio` times the kernel's mean eigenvalue trace(K)/k.

    `kernel` may also be the training rows Phi (n, k) of the dual form (trace(Phi^T Phi) = ||Phi||_F^2); then
    pass `dim` = k."""
    if damping is not None:
        return float(damping)
    k = dim if dim is not None else kernel.shape[0]
    # trace(Phi^T Phi) = ||Phi||_F^2, accumulated in float64 without a float64 copy of the rows
    trace = (torch.trace(kernel.double()).item() if dim is None
             else torch.linalg.vector_norm(kernel, dtype=torch.float64).item() ** 2)
    return float(damping_ratio * trace / k)


class TRAK(FeatureMethod):
    """TRAK with margin-gradient features, float64 damped kernel inverse per snapshot, and the Q term.

    The inverse is held as a Cholesky factor (no eigendecomposition); below n = 1.1 k training examples (the
    measured crossover, `core.linalg.use_dual_form`) the pipeline hands the training rows instead of the kernel and
    the n x n dual form is used.
    """

    name = "trak"
    output = "margin"
    snapshot_policy = "all"
    needs_kernel = True
    needs_loss_weight = True
    supports_dual = True

    def __init__(self, damping: float | None = None, damping_ratio: float = DEFAULT_DAMPING_RATIO, use_q: bool = True):
        check_damping(damping, "damping")
        check_damping(damping_ratio, "damping_ratio")
        self.damping, self.damping_ratio, self.use_q = damping, damping_ratio, use_q
        self._inverses: list[DampedInverse | DualDampedInverse] = []
        self._weights: torch.Tensor | None = None
        self.damping_used: list[float] = []
        self.form = "primal"

    def fit(self, stats: TrainStatistics) -> None:
        what = "TRAK kernel Phi^T Phi"
        if stats.train_features:
            self.damping_used = [resolve_damping(F, self.damping, self.damping_ratio, dim=F.shape[1])
                                 for F in stats.train_features]
            self._inverses = []
            for F, lam in zip(stats.train_features, self.damping_used):
                if lam > 0:
                    self._inverses.append(DualDampedInverse(F, lam, what))
                else:  # damping 0: the primal pseudo-inverse (the dual needs damping > 0)
                    F = F.double()
                    self._inverses.append(DampedInverse(F.T @ F, lam, what))
            self.form = "dual" if all(isinstance(i, DualDampedInverse) for i in self._inverses) else "primal"
        elif stats.kernels:
            self.damping_used = [resolve_damping(K, self.damping, self.damping_ratio) for K in stats.kernels]
            self._inverses = [DampedInverse(K, lam, what) for K, lam in zip(stats.kernels, self.damping_used)]
            self.form = "primal"
        else:
            raise ValueError("TRAK needs the training kernel (or the training features) of at least one snapshot")
        self._weights = stats.loss_weight.double() if (self.use_q and stats.loss_weight is not None) else None

    def transform(self, snapshot_index: int, features: torch.Tensor) -> torch.Tensor:
        return self._inverses[snapshot_index].apply(features) / len(self._inverses)

    def self_scores(self, snapshot_index: int, features: torch.Tensor, dtype: torch.dtype = torch.float64,
                    rows: tuple[int, int] | None = None) -> torch.Tensor:
        inv = self._inverses[snapshot_index]
        if rows is not None and isinstance(inv, DualDampedInverse):   # the training rows themselves: from G
            return inv.train_quadratic()[rows[0]:rows[1]].to(features.device) / len(self._inverses)
        return inv.quadratic(features, dtype) / len(self._inverses)

    def train_weights(self) -> torch.Tensor | None:
        return self._weights

    def describe(self) -> dict:
        return {"method": self.name, "damping": self.damping_used, "damping_rule":
                ("absolute" if self.damping is not None else f"{self.damping_ratio} * trace(K)/k per snapshot"),
                "use_q": self.use_q, "kernel_form": self.form,
                "condition_number": [float(i.condition) if i.condition < float("inf") else None for i in self._inverses]}

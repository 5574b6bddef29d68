"""TRAK (Park et al. 2023): score = Qbar_i * mean_c phi_c(z_i)^T (Phi_c^T Phi_c + lambda_c I)^-1 phi_c(z_q)."""
from __future__ import annotations

import warnings

import torch

from .base import FeatureMethod, TrainStatistics

# Default damping: lambda = DEFAULT_DAMPING_RATIO * trace(K) / k, i.e. relative to the kernel's mean eigenvalue.
# Chosen from the leave-one-out sweep recorded in benchmarks/RESULTS.md (lambda = 0 is near-noise when k >= n).
DEFAULT_DAMPING_RATIO = 1.0
ILL_CONDITIONED = 1e10


class IllConditionedKernelWarning(UserWarning):
    """The damped kernel is close to singular: scores may be dominated by noise."""


def solve_damped(kernel: torch.Tensor, damping: float, what: str = "kernel") -> torch.Tensor:
    """Inverse of (kernel + damping I) in float64: Cholesky, else an eigendecomposition with a clear warning."""
    k = kernel.shape[0]
    mat = kernel.double() + damping * torch.eye(k, dtype=torch.float64, device=kernel.device)
    evals = torch.linalg.eigvalsh(mat)
    cond = (evals.max() / evals.min().clamp_min(1e-300)).item() if evals.max() > 0 else float("inf")
    if not (cond < ILL_CONDITIONED):
        warnings.warn(
            f"the damped {what} is ill-conditioned (condition number {cond:.2e} with damping {damping:.3g}); "
            "scores may be noise. Increase the damping (damping_ratio) or reduce proj_dim.",
            IllConditionedKernelWarning, stacklevel=3,
        )
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    warnings.warn(
        f"Cholesky of the damped {what} failed (not positive definite at damping {damping:.3g}); falling back to an "
        "eigendecomposition that drops non-positive directions. Increase the damping to avoid this.",
        IllConditionedKernelWarning, stacklevel=3,
    )
    evals, evecs = torch.linalg.eigh(mat)
    inv = torch.where(evals > evals.max() * 1e-12, 1.0 / evals, torch.zeros_like(evals))
    return (evecs * inv) @ evecs.T


def resolve_damping(kernel: torch.Tensor, damping: float | None, damping_ratio: float) -> float:
    """Absolute damping if given, else `damping_ratio` times the kernel's mean eigenvalue trace(K)/k."""
    if damping is not None:
        return float(damping)
    return float(damping_ratio * torch.trace(kernel.double()).item() / kernel.shape[0])


class TRAK(FeatureMethod):
    """TRAK with margin-gradient features, float64 damped kernel inverse per snapshot, and the Q term."""

    name = "trak"
    output = "margin"
    snapshot_policy = "all"
    needs_kernel = True
    needs_loss_weight = True

    def __init__(self, damping: float | None = None, damping_ratio: float = DEFAULT_DAMPING_RATIO, use_q: bool = True):
        if damping is not None and damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if damping_ratio < 0:
            raise ValueError(f"damping_ratio must be >= 0, got {damping_ratio}")
        self.damping, self.damping_ratio, self.use_q = damping, damping_ratio, use_q
        self._inverses: list[torch.Tensor] = []
        self._weights: torch.Tensor | None = None
        self.damping_used: list[float] = []

    def fit(self, stats: TrainStatistics) -> None:
        if not stats.kernels:
            raise ValueError("TRAK needs the training kernel of at least one snapshot")
        self.damping_used = [resolve_damping(K, self.damping, self.damping_ratio) for K in stats.kernels]
        self._inverses = [solve_damped(K, lam, "TRAK kernel Phi^T Phi") for K, lam in zip(stats.kernels, self.damping_used)]
        self._weights = stats.loss_weight.double() if (self.use_q and stats.loss_weight is not None) else None

    def transform(self, snapshot_index: int, features: torch.Tensor) -> torch.Tensor:
        inv = self._inverses[snapshot_index].to(features.device)
        return features.double() @ inv / len(self._inverses)

    def train_weights(self) -> torch.Tensor | None:
        return self._weights

    def describe(self) -> dict:
        return {"method": self.name, "damping": self.damping_used, "damping_rule":
                ("absolute" if self.damping is not None else f"{self.damping_ratio} * trace(K)/k per snapshot"),
                "use_q": self.use_q}

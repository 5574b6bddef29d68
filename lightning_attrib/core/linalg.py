"""Fit-end numerics of kernel methods: damped inverses without an eigendecomposition, and training Gram data
accumulated from float32 shards.

`DampedInverse` holds (K + lambda I)^-1 of a training kernel K = Phi^T Phi (k x k) as a float64 Cholesky factor;
`DualDampedInverse` holds the same operator through the n x n Gram matrix G = Phi Phi^T (Woodbury), cheaper
when n_train < k. Both apply the operator to rows (`apply`) and give the quadratic forms x^T (K + lambda I)^-1 x
(`quadratic`) used for self-influence. The condition number is bounded for free from the trace (K is PSD:
lambda_max(K) <= trace(K), so cond <= (trace + lambda) / lambda = k + 1 at the default lambda = trace(K) / k),
and estimated by a few power / inverse iterations only when that bound is not already small.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

ILL_CONDITIONED = 1e10
POWER_ITERATIONS = 30


class IllConditionedKernelWarning(UserWarning):
    """The damped kernel is close to singular: scores may be dominated by noise."""


def check_damping(value: float | None, name: str = "damping") -> None:
    """Refuse a damping that is NaN, infinite or negative (None = the default rule) with a message saying what to pass."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0 (or None for the default), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (or None for the default rule), got {value!r}")


def condition_bound(trace: float, damping: float) -> float:
    """Upper bound on cond(K + damping I) for a PSD K with this trace (inf when damping is 0)."""
    return (trace + damping) / damping if damping > 0 else math.inf


def estimate_condition(mat: torch.Tensor, chol: torch.Tensor, iterations: int = POWER_ITERATIONS) -> float:
    """cond(mat) estimated by power iteration (largest eigenvalue) and inverse iteration through the Cholesky
    factor (smallest): O(k^2) per iteration instead of an O(k^3) eigendecomposition. A lower bound, tight in practice."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = mat.shape[0]
    hi = torch.randn(k, 1, generator=gen, dtype=mat.dtype).to(mat.device)
    lo = hi.clone()
    lam_max = lam_min = 0.0
    for _ in range(iterations):
        hi = mat @ hi
        lam_max = float(hi.norm())
        hi /= max(lam_max, 1e-300)
        lo = torch.cholesky_solve(lo, chol)
        inv_norm = float(lo.norm())
        lo /= max(inv_norm, 1e-300)
        lam_min = 1.0 / max(inv_norm, 1e-300)
    return lam_max / lam_min if lam_min > 0 else math.inf


def _warn_ill_conditioned(cond: float, damping: float, what: str) -> None:
    warnings.warn(
        f"the damped {what} is ill-conditioned (condition number about {cond:.2e} with damping {damping:.3g}); "
        "scores may be noise. Increase the damping (damping_ratio) or reduce proj_dim.",
        IllConditionedKernelWarning, stacklevel=4,
    )


class DampedInverse:
    """(K + damping I)^-1 of a PSD k x k matrix in float64, as a Cholesky factor (or, when Cholesky fails, an
    eigendecomposition that drops non-positive directions, with a warning)."""

    def __init__(self, kernel: torch.Tensor, damping: float, what: str = "kernel"):
        k = kernel.shape[0]
        mat = kernel.double() + damping * torch.eye(k, dtype=torch.float64, device=kernel.device)
        self.chol: torch.Tensor | None = None
        self.evecs = self.inv_evals = None
        chol, info = torch.linalg.cholesky_ex(mat)
        bound = condition_bound(float(torch.trace(kernel.double())), damping)
        if int(info) == 0:
            self.chol = chol
            self.condition = bound if bound < ILL_CONDITIONED else estimate_condition(mat, chol)
            if not self.condition < ILL_CONDITIONED:
                _warn_ill_conditioned(self.condition, damping, what)
            return
        warnings.warn(
            f"Cholesky of the damped {what} failed (not positive definite at damping {damping:.3g}); falling back to "
            "an eigendecomposition that drops non-positive directions. Increase the damping to avoid this.",
            IllConditionedKernelWarning, stacklevel=3,
        )
        evals, self.evecs = torch.linalg.eigh(mat)
        keep = evals > evals.max() * 1e-12
        self.inv_evals = torch.where(keep, 1.0 / evals, torch.zeros_like(evals))
        self.condition = math.inf

    def matrix(self) -> torch.Tensor:
        """The explicit (k, k) inverse (for callers that need the matrix itself)."""
        if self.chol is not None:
            return torch.cholesky_inverse(self.chol)
        return (self.evecs * self.inv_evals) @ self.evecs.T

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x (m, k) -> rows of x (K + damping I)^-1, float64."""
        x = x.double()
        if self.chol is not None:
            return torch.cholesky_solve(x.T, self.chol).T
        return ((x @ self.evecs) * self.inv_evals) @ self.evecs.T

    def quadratic(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """x_i^T (K + damping I)^-1 x_i per row, float64: ||L^-1 x_i||^2, the triangular solve in `dtype`
        (float32: cond(L) = sqrt(cond) keeps the error ~1e-7 relative), the squares summed in float64."""
        if self.chol is None:
            x = x.double()
            return ((x @ self.evecs).pow(2) * self.inv_evals).sum(1)
        y = torch.linalg.solve_triangular(self.chol.to(dtype), x.to(dtype).T, upper=False)
        return y.double().pow(2).sum(0)


class DualDampedInverse:
    """The same operator (Phi^T Phi + damping I)^-1 from the training rows Phi (n, k) when n < k (damping > 0):
    Woodbury, (I - Phi^T (G + damping I)^-1 Phi) / damping with G = Phi Phi^T, n x n instead of k x k."""

    def __init__(self, rows: torch.Tensor, damping: float, what: str = "kernel"):
        if not damping > 0:
            raise ValueError("the dual form needs damping > 0 (at damping 0 use the primal k x k pseudo-inverse)")
        self.rows, self.damping = rows.double(), float(damping)
        self.gram = self.rows @ self.rows.T
        self.inner = DampedInverse(self.gram, self.damping, f"{what} (dual form, n x n)")
        self.condition = self.inner.condition
        self._train_quadratic: torch.Tensor | None = None

    def train_quadratic(self) -> torch.Tensor:
        """phi_i^T (Phi^T Phi + damping I)^-1 phi_i for every training row i at once, from G alone:
        (||phi_i||^2 - ||L^-1 g_i||^2) / damping with L L^T = G + damping I (one n x n triangular solve, no n x k work)."""
        if self._train_quadratic is None:
            if self.inner.chol is None:
                self._train_quadratic = self.quadratic(self.rows)
            else:
                y = torch.linalg.solve_triangular(self.inner.chol, self.gram, upper=False)
                self._train_quadratic = (torch.diagonal(self.gram) - y.pow(2).sum(0)) / self.damping
        return self._train_quadratic

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return (x - self.inner.apply(x @ self.rows.T) @ self.rows) / self.damping

    def quadratic(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        x = x.double()
        return (x.pow(2).sum(1) - self.inner.quadratic(x @ self.rows.T)) / self.damping


DUAL_MAX_RATIO = 0.75


def use_dual_form(n_train: int, dim: int) -> bool:
    """Whether the n x n dual form is cheaper than the k x k primal. Dual ~ 2n^2 k + 4/3 n^3 flops (G, its
    Cholesky, the self-influence solve), primal ~ 4n k^2 + k^3 / 3 (kernel, Cholesky, self-influence); measured
    crossover n ~ 0.8 k (k = 2048, one CPU thread, kernel + inverse + all self-influence + 200 queries:
    n = 500 dual 0.13 s vs primal 1.13 s, n = 1500 0.66 vs 0.97 s, n = 1800 1.34 vs 0.87 s)."""
    return n_train < DUAL_MAX_RATIO * dim


class TrainGram:
    """One snapshot's training Gram data, accumulated from float32 feature shards: the kernel
    K = sum_i phi_i phi_i^T (k, k), or with `dual` the rows Phi themselves (n, k); float64 either way.

    With `dtype=float32` each shard's Phi_s^T Phi_s is a float32 GEMM (about 2x float64 BLAS, ~1e-7 relative per
    shard) added into the float64 kernel; `float64` multiplies in float64 (exact reference comparisons).
    """

    def __init__(self, n_train: int, dim: int, dual: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.dual, self.dtype, self.device = dual, dtype, device
        shape = (n_train, dim) if dual else (dim, dim)
        self.value = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, lo: int, hi: int, features: np.ndarray) -> None:
        f = torch.from_numpy(np.asarray(features))
        if self.dual:
            self.value[lo:hi] = f.to(self.device, torch.float64)
            return
        f = f.to(self.device, self.dtype)
        self.value += (f.T @ f).double()

    def reduce(self, dist) -> torch.Tensor:
        """Summed over ranks (each rank filled its own rows / added its own shards)."""
        return dist.all_reduce_sum(self.value)

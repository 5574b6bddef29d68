"""Fit-end numerics of kernel methods: damped inverses without an eigendecomposition, and training Gram data
accumulated from float32 shards.

`DampedInverse` holds (K + lambda I)^-1 of a training kernel K = Phi^T Phi (k x k) as a float64 Cholesky factor;
`DualDampedInverse` holds the same operator through the n x n Gram matrix G = Phi Phi^T (Woodbury), cheaper
when n_train < 1.1 k (`use_dual_form`). Both apply the operator to rows (`apply`) and give the quadratic forms
x^T (K + lambda I)^-1 x (`quadratic`) used for self-influence. The condition number is bounded for free from the trace (K is PSD:
lambda_max(K) <= trace(K), so cond <= (trace + lambda) / lambda = k + 1 at the default lambda = trace(K) / k),
and estimated by a few power / inverse iterations only when that bound is not already small.

Gram matrices (K = Phi^T Phi, G = Phi Phi^T) are symmetric: on the CPU they are formed with BLAS `syrk` (one
triangle, half a GEMM's flops) in the features' precision, summed in float64 (`gram_lower`) and mirrored once.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

ILL_CONDITIONED = 1e10
POWER_ITERATIONS = 30
_SYRK = {torch.float32: "ssyrk", torch.float64: "dsyrk"}


def gram_lower(x: torch.Tensor, rows: bool) -> torch.Tensor:
    """The lower triangle of x x^T (`rows=True`, (n, n) from x (n, k)) or x^T x (`rows=False`, (k, k)), in x's
    dtype, as a C-contiguous tensor; its strict upper triangle holds zeros or the mirror image (read the lower
    triangle only, or `symmetrize_`). On the CPU one BLAS syrk (half the flops of a GEMM), elsewhere one GEMM."""
    if x.device.type == "cpu" and x.dtype in _SYRK and x.is_contiguous() and x.numel():
        from scipy.linalg import blas

        a = x.numpy().T   # (k, n) Fortran-ordered view of the row-major x: no copy
        # syrk: trans=0 -> a a^T = x^T x (k, k); trans=1 -> a^T a = x x^T (n, n); Fortran upper triangle, rest
        # zero. Its transpose is the C-ordered lower triangle (the matrix is symmetric).
        return torch.from_numpy(getattr(blas, _SYRK[x.dtype])(1.0, a, trans=1 if rows else 0).T)
    return x @ x.T if rows else x.T @ x


def symmetrize_(mat: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Copy the lower triangle of a square matrix onto its upper triangle, in place (blocks of `block` rows: a
    cache-friendly transpose, about 3x faster than `tril + tril.T`); returns `mat`."""
    n = mat.shape[0]
    for i in range(0, n, block):
        diag = mat[i:i + block, i:i + block]
        diag.copy_(torch.tril(diag) + torch.tril(diag, -1).T)
        for j in range(i + block, n, block):
            mat[i:i + block, j:j + block] = mat[j:j + block, i:i + block].T
    return mat


def inverse_diagonal(chol: torch.Tensor) -> torch.Tensor:
    """diag((L L^T)^-1) from the lower Cholesky factor L: squared column norms of L^-1 (one triangular inverse,
    n^3/3 flops: a third of a triangular solve against an n x n right-hand side)."""
    if chol.device.type == "cpu" and chol.dtype in (torch.float32, torch.float64):
        from scipy.linalg import lapack

        # L^T is the Fortran-ordered view of the row-major L: its inverse (L^-1)^T has L^-1's columns as rows
        inv_t, info = (lapack.dtrtri if chol.dtype == torch.float64 else lapack.strtri)(chol.numpy().T, lower=0)
        if info == 0:
            return torch.from_numpy(inv_t).pow(2).sum(1)
    return _inverse_diagonal_torch(chol)


def _inverse_diagonal_torch(chol: torch.Tensor) -> torch.Tensor:
    """`inverse_diagonal` on any device (GPU): L^-1 by a triangular solve against the identity."""
    eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False).pow(2).sum(0)


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


def _damped(kernel: torch.Tensor, damping: float) -> torch.Tensor:
    """A float64 copy of `kernel` with `damping` added to its diagonal (no k x k identity)."""
    mat = kernel.to(torch.float64, copy=True)
    mat.diagonal().add_(damping)
    return mat


def _cholesky_(mat: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(lower Cholesky factor, LAPACK info) of a symmetric positive definite float64 matrix, reading its lower
    triangle. On the CPU LAPACK potrf factors `mat` in place (it is overwritten and the factor shares its memory:
    none of the column-major copies torch.linalg.cholesky_ex makes, 0.21 -> 0.17 s at n = 2000); elsewhere
    torch.linalg.cholesky_ex."""
    if mat.device.type == "cpu" and mat.dtype == torch.float64 and mat.is_contiguous():
        from scipy.linalg import lapack

        # the row-major lower triangle is the upper triangle of the Fortran-ordered transpose view: factor that
        factor, info = lapack.dpotrf(mat.numpy().T, lower=0, clean=1, overwrite_a=1)
        if np.shares_memory(factor, mat.numpy()):
            return mat, int(info)   # U = L^T in Fortran order is L in row-major order
        return torch.from_numpy(np.ascontiguousarray(factor.T)), int(info)
    chol, info = torch.linalg.cholesky_ex(mat)
    return chol, int(info)


class DampedInverse:
    """(K + damping I)^-1 of a PSD k x k matrix in float64, as a Cholesky factor (or, when Cholesky fails, an
    eigendecomposition that drops non-positive directions, with a warning)."""

    def __init__(self, kernel: torch.Tensor, damping: float, what: str = "kernel"):
        trace = float(torch.trace(kernel.double()))   # no copy when float64
        bound = condition_bound(trace, damping)
        self.chol: torch.Tensor | None = None
        self.evecs = self.inv_evals = None
        self._chol_as: dict[torch.dtype, torch.Tensor] = {}
        mat = _damped(kernel, damping)
        if bound < ILL_CONDITIONED:   # the usual case: mat is not needed after its factorization
            chol, info = _cholesky_(mat)
            mat = None if info == 0 else _damped(kernel, damping)   # overwritten: rebuilt for the fallback
        else:                         # keep mat to estimate the condition number
            chol, info = torch.linalg.cholesky_ex(mat)
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
        if dtype not in self._chol_as:   # cast once, not per shard
            self._chol_as[dtype] = self.chol.to(dtype)
        y = torch.linalg.solve_triangular(self._chol_as[dtype], x.to(dtype).T, upper=False)
        return y.double().pow(2).sum(0)


class DualDampedInverse:
    """The same operator (Phi^T Phi + damping I)^-1 from the training rows Phi (n, k) when n < 1.1 k (damping > 0):
    Woodbury, (I - Phi^T (G + damping I)^-1 Phi) / damping with G = Phi Phi^T, n x n instead of k x k.

    The products with Phi run in Phi's dtype (float32 rows, the pipeline's default: float32 BLAS summed into
    float64, as the primal kernel's; float64 rows: float64 throughout); G + damping I, its Cholesky factor and
    every solve are float64."""

    def __init__(self, rows: torch.Tensor, damping: float, what: str = "kernel"):
        if not damping > 0:
            raise ValueError("the dual form needs damping > 0 (at damping 0 use the primal k x k pseudo-inverse)")
        self.rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.double()
        self.damping = float(damping)
        self.gram = symmetrize_(gram_lower(self.rows, rows=True).double())
        self.inner = DampedInverse(self.gram, self.damping, f"{what} (dual form, n x n)")
        self.condition = self.inner.condition
        self._train_quadratic: torch.Tensor | None = None

    def train_quadratic(self) -> torch.Tensor:
        """phi_i^T (Phi^T Phi + damping I)^-1 phi_i for every training row i at once, from G alone: the diagonal
        of G (G + damping I)^-1 = I - damping (G + damping I)^-1, i.e. 1 - damping * diag((G + damping I)^-1)
        (one n x n triangular inverse, no n x k work)."""
        if self._train_quadratic is None:
            if self.inner.chol is None:
                self._train_quadratic = self.quadratic(self.rows)
            else:
                self._train_quadratic = 1.0 - self.damping * inverse_diagonal(self.inner.chol)
        return self._train_quadratic

    def _times_rows_t(self, x: torch.Tensor) -> torch.Tensor:
        """x Phi^T (m, n) in float64, multiplied in Phi's dtype."""
        return (x.to(self.rows.dtype) @ self.rows.T).double()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        back = (self.inner.apply(self._times_rows_t(x)).to(self.rows.dtype) @ self.rows).double()
        return (x - back) / self.damping

    def quadratic(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Any rows (the training rows' own values come cheaper and more accurately from `train_quadratic`: the
        difference below cancels, so float32 rows give ~1e-5 relative here, as the primal float32 solve does)."""
        x = x.double()
        return (x.pow(2).sum(1) - self.inner.quadratic(self._times_rows_t(x))) / self.damping


DUAL_MAX_RATIO = 1.1


def use_dual_form(n_train: int, dim: int) -> bool:
    """Whether the n x n dual form is cheaper than the k x k primal. Dual ~ n^2 k (G by syrk, float32) +
    2/3 n^3 (Cholesky and triangular inverse, float64), primal ~ n k^2 (kernel by syrk) + k^3 / 3 (Cholesky) +
    n k^2 (self-influence solves, float32). Measured crossover n ~ 1.1 k (`benchmarks/bench_fit_end.py
    --crossover`, k = 2048, one thread, CPU s per snapshot for kernel + inverse + all self-influence + 200
    queries: n = 1500 dual 0.22 vs primal 0.42, 2000 0.36 vs 0.47, 2200 0.52 vs 0.54, 2500 0.67 vs 0.55)."""
    return n_train < DUAL_MAX_RATIO * dim


class TrainGram:
    """One snapshot's training Gram data, accumulated from float32 feature shards: the kernel
    K = sum_i phi_i phi_i^T (k, k) in float64, or with `dual` the rows Phi themselves (n, k) in `dtype`.

    With `dtype=float32` each shard's Phi_s^T Phi_s is a float32 syrk/GEMM (about 2x float64 BLAS, ~1e-7 relative
    per shard) added into the float64 kernel, and the dual rows stay float32 (their products with Phi run in
    float32 in `DualDampedInverse`); `float64` multiplies in float64 (exact reference comparisons).
    """

    def __init__(self, n_train: int, dim: int, dual: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.dual, self.dtype, self.device = dual, dtype, device
        # dual: the rows, exactly as stored; primal: the kernel's lower triangle (mirrored when read)
        self._acc = torch.zeros((n_train, dim) if dual else (dim, dim), dtype=dtype if dual else torch.float64,
                                device=device)

    @property
    def value(self) -> torch.Tensor:
        return self._acc if self.dual else symmetrize_(self._acc)   # idempotent: adds only touch the lower half

    def add(self, lo: int, hi: int, features: np.ndarray) -> None:
        f = torch.from_numpy(np.asarray(features)).to(self.device, self.dtype)
        if self.dual:
            self._acc[lo:hi] = f
            return
        self._acc += gram_lower(f.contiguous(), rows=False)

    def reduce(self, dist) -> torch.Tensor:
        """Summed over ranks (each rank filled its own rows / added its own shards)."""
        return dist.all_reduce_sum(self.value)

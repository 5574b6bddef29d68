"""Fit-end numerics: Cholesky-held damped inverses (no eigendecomposition), the n x n dual form, float32 Gram
accumulation, TRAK's damping validation."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor
from lightning_attrib.core import linalg as linalg_mod
from lightning_attrib.core import scorer as scorer_mod
from lightning_attrib.core.dist import LocalDist
from lightning_attrib.core.linalg import (DampedInverse, DualDampedInverse, IllConditionedKernelWarning, TrainGram,
                                          estimate_condition, gram_lower, inverse_diagonal, symmetrize_, use_dual_form)
from lightning_attrib.core.methods.trak import solve_damped


def _rows(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, k, dtype=torch.float64)


def test_damped_inverse_matches_explicit_solve_without_eigendecomposition(monkeypatch):
    phi, x = _rows(300, 64), _rows(7, 64, seed=1)
    kernel = phi.T @ phi
    lam = float(torch.trace(kernel)) / 64
    ref = torch.linalg.solve(kernel + lam * torch.eye(64, dtype=torch.float64), x.T).T

    def forbidden(*a, **kw):
        raise AssertionError("an eigendecomposition ran")

    monkeypatch.setattr(torch.linalg, "eigvalsh", forbidden)
    monkeypatch.setattr(torch.linalg, "eigh", forbidden)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = DampedInverse(kernel, lam)
    torch.testing.assert_close(inv.apply(x), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(inv.quadratic(x), (x * ref).sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(inv.quadratic(x, torch.float32), (x * ref).sum(1), rtol=1e-5, atol=0)
    assert inv.condition <= 64 + 1     # the free bound at damping trace(K)/k
    torch.testing.assert_close(solve_damped(kernel, lam), torch.linalg.inv(kernel + lam * torch.eye(64, dtype=torch.float64)))


def test_condition_estimate_and_warning_on_near_singular_kernel():
    phi = _rows(20, 64)                # rank 20 < 64: only the damping keeps it invertible
    kernel = phi.T @ phi
    mat = kernel + 1e-9 * torch.eye(64, dtype=torch.float64)
    true = torch.linalg.eigvalsh(mat)
    chol = torch.linalg.cholesky(mat)
    est = estimate_condition(mat, chol)
    assert 0.5 < est / float(true[-1] / true[0]) <= 1.0 + 1e-6
    with pytest.warns(IllConditionedKernelWarning, match="ill-conditioned"):
        DampedInverse(kernel, 1e-9)


def test_failed_cholesky_falls_back_to_the_positive_directions():
    # not PSD (a user's kernel): the in-place factorization fails, the matrix is rebuilt for the eigen fallback
    evals = torch.tensor([4.0, 3.0, -9.0, 2.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(_rows(4, 4))
    kernel = (q * evals) @ q.T
    damping = float(torch.trace(kernel)) / 4          # 0 < damping < 9: one direction stays negative
    with pytest.warns(IllConditionedKernelWarning, match="Cholesky of the damped kernel failed"):
        inv = DampedInverse(kernel, damping)
    shifted = evals + damping
    keep = shifted > 0
    want = (q[:, keep] / shifted[keep]) @ q[:, keep].T
    x = _rows(3, 4, seed=5)
    torch.testing.assert_close(inv.apply(x), x @ want, rtol=1e-10, atol=1e-12)
    assert inv.condition == math.inf


def test_dual_form_equals_primal():
    phi, x = _rows(40, 256), _rows(9, 256, seed=2)
    lam = float((phi * phi).sum()) / 256 * 0.3
    primal, dual = DampedInverse(phi.T @ phi, lam), DualDampedInverse(phi, lam)
    for got, want in ((dual.apply(x), primal.apply(x)), (dual.quadratic(phi), primal.quadratic(phi)),
                      (dual.train_quadratic(), primal.quadratic(phi))):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6
    # float32 rows (the pipeline's default): products in float32 BLAS, solves in float64; against the primal
    # form of the same (float32-rounded) rows
    phi32 = phi.float()
    primal32, dual32 = DampedInverse(phi32.double().T @ phi32.double(), lam), DualDampedInverse(phi32, lam)
    for got, want, tol in ((dual32.apply(x), primal32.apply(x), 1e-6),
                           (dual32.train_quadratic(), primal32.quadratic(phi32), 1e-6),
                           (dual32.quadratic(phi32), primal32.quadratic(phi32), 2e-5)):  # cancels: ~ float32 solve
        assert got.dtype == torch.float64
        assert float((got - want).abs().max() / want.abs().max()) < tol
    assert use_dual_form(40, 256) and use_dual_form(2000, 2048) and not use_dual_form(2500, 2048)
    with pytest.raises(ValueError, match="damping > 0"):
        DualDampedInverse(phi, 0.0)


def test_float32_gram_accumulation_is_close_to_float64():
    phi = _rows(1000, 96).float().numpy()
    exact, fast = TrainGram(1000, 96, dual=False, dtype=torch.float64), TrainGram(1000, 96, dual=False)
    for lo in range(0, 1000, 256):
        exact.add(lo, min(lo + 256, 1000), phi[lo:lo + 256])
        fast.add(lo, min(lo + 256, 1000), phi[lo:lo + 256])
    rel = float((fast.value - exact.value).abs().max() / exact.value.abs().max())
    assert 0 < rel < 1e-6
    torch.testing.assert_close(exact.value, torch.from_numpy(phi).double().T @ torch.from_numpy(phi).double(),
                               rtol=1e-12, atol=0)
    assert torch.equal(exact.value, exact.value.T) and torch.equal(fast.value, fast.value.T)   # both triangles
    rows = TrainGram(1000, 96, dual=True)   # the dual rows: exactly the stored float32 features
    rows.add(0, 1000, phi)
    assert torch.equal(rows.reduce(LocalDist()), torch.from_numpy(phi))
    rows64 = TrainGram(1000, 96, dual=True, dtype=torch.float64)
    rows64.add(0, 1000, phi)
    torch.testing.assert_close(rows64.reduce(LocalDist()), torch.from_numpy(phi).double(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [True, False])
def test_gram_lower_and_inverse_diagonal_match_dense_references(dtype, rows):
    x = _rows(37, 53).to(dtype)
    want = (x.double() @ x.double().T) if rows else (x.double().T @ x.double())
    got = symmetrize_(gram_lower(x, rows=rows).double(), block=16)   # blocks that do not divide 37 or 53
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert float((got - want).abs().max() / want.abs().max()) < tol
    mat = want + float(torch.trace(want)) / want.shape[0] * torch.eye(want.shape[0], dtype=torch.float64)
    chol = torch.linalg.cholesky(mat)
    torch.testing.assert_close(inverse_diagonal(chol), torch.diagonal(torch.linalg.inv(mat)), rtol=1e-10, atol=0)
    # the paths taken off the CPU (GPU): one GEMM (here forced by a non-contiguous input), a triangular solve
    strided = x.T.contiguous().T
    got = symmetrize_(gram_lower(strided, rows=rows).double())
    assert float((got - want).abs().max() / want.abs().max()) < tol
    torch.testing.assert_close(linalg_mod._inverse_diagonal_torch(chol), torch.diagonal(torch.linalg.inv(mat)),
                               rtol=1e-10, atol=0)


def _problem(n=45, nq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n + nq, 6, generator=g), torch.randint(0, 3, (n + nq,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


@pytest.mark.parametrize("damping", [None, 0.05])
def test_pipeline_dual_form_equals_primal(tmp_path, monkeypatch, damping):
    model, train, query = _problem()
    kw = dict(proj_dim=128, projector="rademacher", score_dtype="float64")
    dual = Attributor(model, TRAK(damping=damping), train, query, tmp_path / "dual", **kw).run()
    monkeypatch.setattr(scorer_mod, "use_dual_form", lambda n, k: False)
    primal = Attributor(model, TRAK(damping=damping), train, query, tmp_path / "primal", **kw).run()
    assert dual.manifest["kernel_form"] == "dual" and primal.manifest["kernel_form"] == "primal"
    for a, b in ((dual.scores, primal.scores), (dual.self_influence, primal.self_influence)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-6
    np.testing.assert_allclose(dual.manifest["damping"], primal.manifest["damping"], rtol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, -math.inf])
@pytest.mark.parametrize("arg", ["damping", "damping_ratio"])
def test_trak_refuses_non_finite_or_negative_damping(arg, bad):
    with pytest.raises(ValueError, match=f"{arg} must be a finite number >= 0"):
        TRAK(**{arg: bad})

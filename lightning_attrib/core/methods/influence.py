"""Influence functions (Koh & Liang 2017) with five ways to apply the inverse curvature.

Score and scale (positive = the training example helps the query):

    score(i, q) = grad L(z_q)^T (M + lambda I)^-1 grad L(z_i) / n_train

where L is the per-example loss at the final weights, n_train the training-set size, lambda the damping and
M the curvature of the MEAN training loss plus its L2 term (see `curvature.py`):

    M = (1/n) sum_i m(z_i) + D,   D = diag(weight_decay).

Removing example i moves the optimum of (1/n) sum_j L(z_j) + theta^T D theta / 2 by about
(M^-1 grad L(z_i)) / n, so score(i, q) ~ loss_q(trained without i) - loss_q(trained on all): the leave-one-out
loss change, positive when removing i hurts q. Self-influence is score(i, i).

Solvers (`solver=`):

* "explicit":  M formed exactly in float64 over the attributed parameters (p <= `max_params`), damped and inverted
               once (Cholesky; `trak.solve_damped`). Cost O(p^2) memory, p/`rhs_chunk` vmapped Hessian-vector
               products per training batch, O(p^3) inversion.
* "cg":        conjugate gradient on M + lambda I from batched Hessian-vector products over the whole training set,
               per right-hand side (every query, and every training example for self-influence): cost
               ~ iterations x (n_train + n_query) HVPs over the training set, batched `rhs_chunk` at a time.
* "lissa":     the stochastic Neumann series (Agarwal et al. 2017) h_j = g + (I - (M_b + lambda I)/scale) h_{j-1},
               estimate h_depth / scale, averaged over `lissa_repeats`; minibatches M_b of `lissa_batch_size` are
               drawn with a fixed seed per repeat, so the estimate is one fixed linear operator for every vector.
               `scale` defaults to 2 x the largest eigenvalue of M + lambda I (power iteration). Cost depth x repeats
               minibatch HVPs per block of right-hand sides. Truncation acts like extra damping on directions with
               eigenvalue below ~scale/depth.
* "ekfac":     eigenvalue-corrected K-FAC (`ekfac.py`): approximates the GGN / Fisher (never the Hessian) per layer
               (nn.Linear, nn.Conv2d). Cheap to apply; two passes over the data to fit.
* "projected": H ~ Phi^T Phi / n + weight_decay + lambda I with Phi the stored (projected) loss-gradient features,
               i.e. the empirical Fisher in feature space, from the training kernel the pipeline already reduces;
               works with any projector. Only a float weight_decay (added as weight_decay * I, exact for the identity
               projector, the Johnson-Lindenstrauss approximation of P^T D P otherwise).

explicit / cg / lissa / ekfac work on full gradients: run them with `projector="identity"`. They need the model and
the training data, which the pipeline hands to `prepare(context)` (see `context.py`) before `fit`. Under DDP,
explicit and EK-FAC sum their statistics over ranks like the TRAK kernel; cg and lissa let every rank iterate the
whole training set for its own right-hand sides (no collectives while scoring; the data pass is replicated, the
solves are split).

Damping: `damping=` (absolute), else `damping_ratio` x the mean eigenvalue of the empirical Fisher of the
attributed parameters, trace((1/n) sum_i g_i g_i^T) / p = mean_i ||g_i||^2 / p (from the stored features; for
"projected", trace(K) / (n k) in feature space). Every solver uses the same rule, so they invert the same matrix.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..batches import batch_size_of
from .base import FeatureMethod, TrainStatistics
from .context import ModelContext
from .curvature import (MATRICES, BatchSource, Curvature, ModelFunction, conjugate_gradient, decay_vector,
                        power_iteration)
from .ekfac import EKFAC
from .trak import solve_damped

SOLVERS = ("explicit", "cg", "lissa", "ekfac", "projected")
DEFAULT_MATRIX = {"explicit": "hessian", "cg": "hessian", "lissa": "hessian", "ekfac": "ggn", "projected": "empirical_fisher"}
# lambda = DEFAULT_DAMPING_RATIO * mean eigenvalue of the empirical Fisher. Small: with the model's L2 term passed as
# weight_decay the matrix is already well conditioned. Digits LR (tests/test_methods_influence.py), explicit solver,
# LOO Pearson: ratio 0.01 -> 0.998, 0.1 -> 0.998, 1.0 -> 0.994; 0 -> 0.14 (softmax leaves a flat direction, and
# float32 feature noise along it is amplified without damping).
DEFAULT_DAMPING_RATIO = 0.1
DEFAULT_MAX_PARAMS = 5000


class ConvergenceWarning(UserWarning):
    """An iterative inverse-curvature solver stopped before reaching its tolerance."""


class InfluenceFunction(FeatureMethod):
    """Influence functions of the loss at the final weights; see the module docstring for solvers, scale and sign.

    Args:
        solver: "explicit", "cg", "lissa", "ekfac" or "projected".
        damping: absolute lambda (>= 0); None uses `damping_ratio` (see the module docstring).
        damping_ratio: lambda relative to the mean eigenvalue of the empirical Fisher.
        weight_decay: the training objective's L2 term, as a float (every attributed parameter) or a mapping
            {parameter name: coefficient} (e.g. {"weight": 1e-2} when biases are not decayed); adds D to M.
        matrix: curvature: "hessian" | "ggn" | "empirical_fisher" (defaults: hessian for explicit/cg/lissa, ggn for
            ekfac, empirical_fisher for projected, which supports only that).
        max_params: the explicit solver refuses larger parameter counts.
        cg_tol, cg_max_iter: relative residual and iteration cap per right-hand side.
        lissa_depth, lissa_scale, lissa_repeats, lissa_batch_size, seed: LiSSA settings (scale None: automatic).
        batch_size: training batch size for curvature passes (None: the Attributor's).
        rhs_chunk: right-hand sides (or identity columns) per vmapped curvature product.
        dtype: compute dtype of curvature products (None: float64 for explicit, the model's dtype otherwise).
    """

    name = "influence"
    output = "loss"
    snapshot_policy = "last"

    def __init__(self, solver: str = "explicit", damping: float | None = None,
                 damping_ratio: float = DEFAULT_DAMPING_RATIO, weight_decay: float | Mapping[str, float] = 0.0,
                 matrix: str | None = None, max_params: int = DEFAULT_MAX_PARAMS, cg_tol: float = 1e-8,
                 cg_max_iter: int = 1000, lissa_depth: int = 1000, lissa_scale: float | None = None,
                 lissa_repeats: int = 1, lissa_batch_size: int = 64, seed: int = 0, batch_size: int | None = None,
                 rhs_chunk: int = 256, dtype: torch.dtype | None = None):
        if solver not in SOLVERS:
            raise ValueError(f"unknown influence solver {solver!r}: use one of {SOLVERS}")
        matrix = matrix or DEFAULT_MATRIX[solver]
        if matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {MATRICES}, got {matrix!r}")
        if solver == "ekfac" and matrix == "hessian":
            raise ValueError("solver='ekfac' approximates the GGN/Fisher, not the Hessian: use matrix='ggn' or "
                             "'empirical_fisher' (or solver='explicit'/'cg' for the Hessian)")
        if solver == "projected" and matrix != "empirical_fisher":
            raise ValueError("solver='projected' uses the empirical Fisher of the stored features (matrix='empirical_fisher')")
        if solver == "projected" and isinstance(weight_decay, Mapping):
            raise ValueError("solver='projected' supports a float weight_decay only (added as weight_decay * I in "
                             "feature space)")
        if damping is not None and damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if damping_ratio < 0:
            raise ValueError(f"damping_ratio must be >= 0, got {damping_ratio}")
        for nm, val in (("max_params", max_params), ("cg_max_iter", cg_max_iter), ("lissa_depth", lissa_depth),
                        ("lissa_repeats", lissa_repeats), ("lissa_batch_size", lissa_batch_size), ("rhs_chunk", rhs_chunk)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{nm} must be a positive integer, got {val!r}")
        if cg_tol <= 0:
            raise ValueError(f"cg_tol must be > 0, got {cg_tol}")
        if lissa_scale is not None and lissa_scale <= 0:
            raise ValueError(f"lissa_scale must be > 0, got {lissa_scale}")
        self.solver, self.matrix, self.damping, self.damping_ratio = solver, matrix, damping, damping_ratio
        self.weight_decay = dict(weight_decay) if isinstance(weight_decay, Mapping) else float(weight_decay)
        self.max_params, self.cg_tol, self.cg_max_iter = max_params, cg_tol, cg_max_iter
        self.lissa_depth, self.lissa_scale, self.lissa_repeats = lissa_depth, lissa_scale, lissa_repeats
        self.lissa_batch_size, self.seed, self.batch_size, self.rhs_chunk = lissa_batch_size, seed, batch_size, rhs_chunk
        self.dtype = dtype
        self.needs_kernel = solver == "projected"   # the pipeline reduces Phi^T Phi only for the projected solver
        self._solvers: dict[int, Any] = {}
        self._n_train: int | None = None
        self.damping_used: list[float] = []
        self.info: dict[str, Any] = {}

    # -- model-based preparation (called by Attributor.run before fit) -----------------------------------
    def prepare(self, ctx: ModelContext) -> None:
        if ctx.snapshot_index == 0:          # a fresh run: forget solvers of an earlier one
            self._solvers, self.damping_used, self.info = {}, [], {}
        if self.solver == "projected":
            return
        if ctx.projector.get("projector") != "identity":
            raise ValueError(
                f"InfluenceFunction(solver={self.solver!r}) works on full gradients: run the Attributor with "
                f"projector='identity' (got {ctx.projector.get('projector')!r}), or use solver='projected' for "
                "projected features"
            )
        named = dict(ctx.module.named_parameters())
        numels = [named[n].numel() for n in ctx.param_names]
        p = int(sum(numels))
        if self.solver == "explicit" and p > self.max_params:
            raise ValueError(
                f"solver='explicit' forms the {p} x {p} curvature matrix; that is above max_params={self.max_params}. "
                "Use solver='cg', 'lissa', 'ekfac' or 'projected', restrict params=, or raise max_params."
            )
        device = ctx.dist.device
        damping = self._damping_from_features(ctx, p)
        decay = decay_vector(ctx.param_names, numels, self.weight_decay, device=device)
        bs = self.batch_size or ctx.batch_size
        reduce = ctx.dist.all_reduce_sum
        if self.solver == "ekfac":
            ek = EKFAC(ctx.module, ctx.param_names, ctx.output, self.matrix)
            ek.fit(lambda: ctx.train_batches(ctx.local_rows, bs), reduce, ctx.n_train, decay)
            self._solvers[ctx.snapshot_index] = _EKFACSolver(ek, damping)
        else:
            dtype = self.dtype or (torch.float64 if self.solver == "explicit" else None)
            fn = ModelFunction(ctx.module, ctx.param_names, ctx.output, dtype=dtype)
            curv = Curvature(fn, self.matrix, decay, ctx.n_train, chunk=self.rhs_chunk)
            if self.solver == "explicit":
                mat = curv.dense(ctx.train_batches(ctx.local_rows, bs), reduce=reduce)
                self._solvers[ctx.snapshot_index] = _ExplicitSolver(
                    solve_damped(mat, damping, f"influence matrix ({self.matrix})"))
            else:
                # every rank sees the whole training set: transform stays free of collectives (see module docstring)
                source = BatchSource(lambda: ctx.train_batches(ctx.all_rows(), bs))
                if self.solver == "cg":
                    self._solvers[ctx.snapshot_index] = _CGSolver(curv, source, damping, self.cg_tol, self.cg_max_iter,
                                                                  self.rhs_chunk, self.info)
                else:
                    scale = self.lissa_scale
                    if scale is None:
                        top = power_iteration(lambda V: curv.matvec(V, source) + damping * V, p, seed=self.seed,
                                              device=device)
                        scale = 2.0 * top
                    self.info["lissa_scale"] = scale
                    self._solvers[ctx.snapshot_index] = _LiSSASolver(
                        curv, ctx.train_batches, ctx.n_train, damping, scale, self.lissa_depth, self.lissa_repeats,
                        self.lissa_batch_size, self.seed)
        self.damping_used.append(damping)

    def _damping_from_features(self, ctx: ModelContext, p: int) -> float:
        if self.damping is not None:
            return float(self.damping)
        total = torch.zeros((), dtype=torch.float64, device=ctx.dist.device)
        for _, _, f in ctx.train_features():
            ft = torch.from_numpy(f).to(ctx.dist.device, torch.float64)
            total += (ft * ft).sum()
        total = ctx.dist.all_reduce_sum(total)
        return float(self.damping_ratio * total.item() / (ctx.n_train * p))

    # -- FeatureMethod ------------------------------------------------------------------------------
    def fit(self, stats: TrainStatistics) -> None:
        self._n_train = stats.n_train
        if self.solver == "projected":
            if not stats.kernels:
                raise ValueError("solver='projected' needs the training kernel of the features")
            self._solvers, self.damping_used = {}, []
            for c, K in enumerate(stats.kernels):
                k = K.shape[0]
                mat = K.double() / stats.n_train + float(self.weight_decay) * torch.eye(k, dtype=torch.float64,
                                                                                        device=K.device)
                lam = (float(self.damping) if self.damping is not None
                       else float(self.damping_ratio * torch.trace(K.double()).item() / (stats.n_train * k)))
                self._solvers[c] = _ExplicitSolver(solve_damped(mat, lam, "projected influence matrix"))
                self.damping_used.append(lam)
            return
        missing = [c for c in range(len(stats.snapshots)) if c not in self._solvers]
        if missing:
            raise ValueError(
                f"InfluenceFunction(solver={self.solver!r}) needs the model and the training data: run it through "
                "Attributor(...).run(), which calls prepare(context) before fit"
            )

    def transform(self, snapshot_index: int, features: torch.Tensor) -> torch.Tensor:
        out = self._solvers[snapshot_index].apply(features.to(torch.float64))
        return out / (self._n_train * len(self._solvers))

    def describe(self) -> dict:
        d = {
            "method": self.name, "solver": self.solver, "matrix": self.matrix,
            "damping": self.damping_used,
            "damping_rule": ("absolute" if self.damping is not None else
                             f"{self.damping_ratio} * mean_i ||g_i||^2 / p (mean eigenvalue of the empirical Fisher)"),
            "weight_decay": self.weight_decay,
            "scale": "grad L(z_q)^T (M + lambda I)^-1 grad L(z_i) / n_train ~ loss_q(without i) - loss_q(all)",
        }
        if self.solver == "explicit":
            d["max_params"] = self.max_params
        if self.solver == "cg":
            d.update(cg_tol=self.cg_tol, cg_max_iter=self.cg_max_iter)
        if self.solver == "lissa":
            d.update(lissa_depth=self.lissa_depth, lissa_repeats=self.lissa_repeats,
                     lissa_batch_size=self.lissa_batch_size, seed=self.seed)
        d.update({k: v for k, v in self.info.items()})
        return d


class _ExplicitSolver:
    def __init__(self, inverse: torch.Tensor):
        self.inverse = inverse

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return V @ self.inverse.to(V.device)


class _EKFACSolver:
    def __init__(self, ekfac: EKFAC, damping: float):
        self.ekfac, self.damping = ekfac, damping

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return self.ekfac.apply(V, self.damping)


class _CGSolver:
    def __init__(self, curv: Curvature, source: BatchSource, damping: float, tol: float, max_iter: int, chunk: int,
                 info: dict):
        self.curv, self.source, self.damping = curv, source, damping
        self.tol, self.max_iter, self.chunk, self.info = tol, max_iter, chunk, info

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(V)
        for lo in range(0, V.shape[0], self.chunk):
            X, iters, resid = conjugate_gradient(lambda P: self.curv.matvec(P, self.source) + self.damping * P,
                                                 V[lo:lo + self.chunk], self.tol, self.max_iter)
            out[lo:lo + self.chunk] = X
            self.info["cg_max_iterations"] = max(self.info.get("cg_max_iterations", 0), int(iters.max()))
            bad = int((resid > self.tol).sum())
            if bad:
                warnings.warn(f"conjugate gradient stopped after {self.max_iter} iterations for {bad} vector(s) "
                              f"(relative residual up to {float(resid.max()):.2e} > cg_tol={self.tol:g}); raise "
                              "cg_max_iter or the damping", ConvergenceWarning, stacklevel=2)
        return out


class _LiSSASolver:
    def __init__(self, curv: Curvature, train_batches, n_train: int, damping: float, scale: float, depth: int,
                 repeats: int, batch_size: int, seed: int):
        self.curv, self.train_batches, self.n_train = curv, train_batches, n_train
        self.damping, self.scale, self.depth, self.repeats, self.batch_size, self.seed = (
            damping, scale, depth, repeats, batch_size, seed)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(torch.float64)
        decay = self.curv.decay.to(V.device)
        estimate = torch.zeros_like(V)
        for r in range(self.repeats):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
            rows = torch.randint(0, self.n_train, (self.depth * self.batch_size,), generator=gen).tolist()
            h = V.clone()
            for batch in self.train_batches(rows, self.batch_size):
                hv = torch.zeros_like(h)
                for lo in range(0, h.shape[0], self.curv.chunk):
                    hv[lo:lo + self.curv.chunk] = self.curv.batch_products(h[lo:lo + self.curv.chunk], batch).double()
                mh = hv / batch_size_of(batch) + decay * h + self.damping * h
                h = V + h - mh / self.scale
            if not torch.isfinite(h).all() or h.norm() > 1e12 * max(V.norm().item(), 1e-300):
                raise ValueError(f"LiSSA diverged (scale={self.scale:.3g}): raise lissa_scale or the damping")
            estimate += h / self.scale
        return estimate / self.repeats

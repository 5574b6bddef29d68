"""Influence functions (Koh & Liang 2017) with five ways to apply the inverse curvature.

Score and scale (positive = the training example helps the query):

    score(i, q) = grad L(z_q)^T (M + lambda I)^-1 grad L(z_i) / n_train

where L is the per-example loss at the final weights, n_train the training-set size, lambda the damping and
M the curvature of the MEAN training loss plus its L2 term (see `curvature.py`):

    M = (1/n) sum_i m(z_i) + D,   D = diag(weight_decay).

Removing example i moves the optimum of (1/n) sum_j L(z_j) + theta^T D theta / 2 by about
(M^-1 grad L(z_i)) / n, so score(i, q) ~ loss_q(trained without i) - loss_q(trained on all): the leave-one-out
loss change, positive when removing i hurts q. Self-influence is score(i, i).

Solvers (`solver=`, small registered classes in `SOLVERS`, kronfluence-style strategies):

* "auto" (default): chosen per run from the model (`choose_solver`, measured in benchmarks/bench_layers.py):
               "explicit" when p <= `max_params` (5000), else "projected" (as accurate as EK-FAC on flipped-label
               detection for an MLP, a BatchNorm CNN and a transformer, 4-17x faster). The explicit matrix is the
               GGN for the built-in loss (PSD; the Hessian for logistic regression), the empirical Fisher otherwise.
               `describe()` records the choice and why.

* "explicit":  M formed exactly in float64 over the attributed parameters (p <= `max_params`), damped and inverted
               once (Cholesky; `trak.solve_damped`). Cost O(p^2) memory, O(p^3) inversion, and per training batch:
               C per-example gradient passes for the GGN (C classes; `Curvature.ggn_factors`), one for the empirical
               Fisher, p/`rhs_chunk` vmapped Hessian-vector products for the Hessian.
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
               of the layer engine (Linear, Conv1d/2d, Embedding, MultiheadAttention, HF Conv1D, and norm layers'
               affine parameters, handled exactly per block). Cheap to apply; two passes over the data to fit.
* "projected": H ~ Phi^T Phi / n + weight_decay + lambda I with Phi the stored (projected) loss-gradient features,
               i.e. the empirical Fisher in feature space, from the training kernel the pipeline already reduces;
               works with any projector. Only a float weight_decay (added as weight_decay * I, exact for the identity
               projector, the Johnson-Lindenstrauss approximation of P^T D P otherwise).

explicit / cg / lissa / ekfac work on full gradients: their class says so (`needs_gradients`), and
`InfluenceFunction.choose_projector`, which the pipeline calls before featurizing, switches the features to
`projector="identity"` (no user setting needed). cg and lissa print their progress to stderr every
`progress_every_s` seconds and stop at `cg_max_iter` / `lissa_depth` or after `time_limit_s` with a
`ConvergenceWarning` saying what to change. They need the model and
the training data, which the pipeline hands to `prepare(context)` (see `context.py`) before `fit`. Under DDP,
explicit and EK-FAC sum their statistics over ranks like the TRAK kernel; cg and lissa let every rank iterate the
whole training set for its own right-hand sides (no collectives while scoring; the data pass is replicated, the
solves are split).

Damping: `damping=` (absolute), else `damping_ratio` x the mean eigenvalue of the empirical Fisher of the
attributed parameters, trace((1/n) sum_i g_i g_i^T) / p = mean_i ||g_i||^2 / p (from the stored features; for
"projected", trace(K) / (n k) in feature space). Every solver uses the same rule, so they invert the same matrix.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..batches import batch_size_of
from ..io import derive_seed
from ..outputs import CrossEntropyLoss
from .base import FeatureMethod, TrainStatistics
from .context import ModelContext
from .curvature import (MATRICES, BatchSource, Curvature, ModelFunction, conjugate_gradient, decay_vector,
                        power_iteration)
from ..layers import LayerEngine
from .ekfac import EKFAC, check_supported
from .trak import solve_damped

# lambda = DEFAULT_DAMPING_RATIO * mean eigenvalue of the empirical Fisher (as TRAK's default ratio). Digits LR
# (tests/test_methods_influence.py), explicit solver, LOO Pearson with the model's L2 term passed as weight_decay:
# ratio 0.01 -> 0.998, 0.1 -> 0.998, 1.0 -> 0.994; 0 -> 0.14 (softmax leaves a flat direction, and float32 feature
# noise along it is amplified without damping). Zero-config (no weight_decay: the damping stands in for the L2 term),
# 20 removals: ratio 0.1 -> 0.70, 1.0 -> 0.977, 3.0 -> 0.996, 10 -> 0.970. 1.0 serves both cases.
DEFAULT_DAMPING_RATIO = 1.0
DEFAULT_MAX_PARAMS = 5000


class ConvergenceWarning(UserWarning):
    """An iterative inverse-curvature solver stopped before reaching its tolerance."""


# -- solvers: one small class each, registered by name -------------------------------------------------------------
SOLVERS: dict[str, type["InverseCurvature"]] = {}


def register(cls: type["InverseCurvature"]) -> type["InverseCurvature"]:
    SOLVERS[cls.name] = cls
    return cls


class InverseCurvature(ABC):
    """One way to apply (M + lambda I)^-1 to (m, p) float64 rows; built once per snapshot by `build`."""

    name = "?"
    needs_gradients = True              # features must be full per-example gradients (projector "identity")
    default_matrix = "hessian"
    matrices: tuple[str, ...] = MATRICES

    @classmethod
    def build(cls, method: "InfluenceFunction", ctx: ModelContext, matrix: str, damping: float,
              decay: torch.Tensor) -> "InverseCurvature":
        """The solver at `ctx`'s snapshot (model-based solvers; "projected" is built from the kernel in fit)."""
        raise NotImplementedError

    @abstractmethod
    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """(m, p) float64 rows of (M + lambda I)^-1 V^T."""


@register
class ExplicitInverse(InverseCurvature):
    """M formed exactly in float64 (p <= max_params), damped and inverted once (Cholesky)."""

    name = "explicit"

    def __init__(self, inverse: torch.Tensor):
        self.inverse = inverse

    @classmethod
    def build(cls, method, ctx, matrix, damping, decay):
        p = int(decay.numel())
        if p > method.max_params:
            raise ValueError(
                f"solver='explicit' forms the {p} x {p} curvature matrix; that is above max_params={method.max_params}. "
                "Use solver='auto', 'cg', 'lissa', 'ekfac' or 'projected', restrict params=, or raise max_params.")
        fn = ModelFunction(ctx.module, ctx.param_names, ctx.output, dtype=method.dtype or torch.float64)
        curv = Curvature(fn, matrix, decay, ctx.n_train, chunk=method.rhs_chunk)
        bs = method.batch_size or ctx.batch_size
        mat = curv.dense(ctx.train_batches(ctx.local_rows, bs), reduce=ctx.dist.all_reduce_sum)
        return cls(solve_damped(mat, damping, f"influence matrix ({matrix})"))

    def apply(self, V):
        return V @ self.inverse.to(V.device)


@register
class EKFACInverse(InverseCurvature):
    """Eigenvalue-corrected K-FAC of the GGN / empirical Fisher over the layer engine's layers (`ekfac.py`)."""

    name = "ekfac"
    default_matrix = "ggn"
    matrices = ("ggn", "empirical_fisher")

    def __init__(self, ekfac: EKFAC, damping: float):
        self.ekfac, self.damping = ekfac, damping

    @classmethod
    def build(cls, method, ctx, matrix, damping, decay):
        ek = EKFAC(ctx.module, ctx.param_names, ctx.output, matrix)
        bs = method.batch_size or ctx.batch_size
        ek.fit(lambda: ctx.train_batches(ctx.local_rows, bs), ctx.dist.all_reduce_sum, ctx.n_train, decay)
        method.info["ekfac_layers"] = ek.layer_kinds
        return cls(ek, damping)

    def apply(self, V):
        return self.ekfac.apply(V, self.damping)


class _Progress:
    """Rate-limited progress lines on stderr and the time limit of an iterative solver."""

    def __init__(self, what: str, every_s: float | None, limit_s: float | None):
        self.what, self.every_s, self.limit_s = what, every_s, limit_s
        self.t0 = self.last = time.monotonic()

    def tick(self, text: str) -> bool:
        """Report `text` when due; False once the time limit is reached."""
        now = time.monotonic()
        if self.every_s is not None and now - self.last >= self.every_s:
            print(f"[lightning_attrib] influence/{self.what}: {text} ({now - self.t0:.0f} s)", file=sys.stderr, flush=True)
            self.last = now
        return self.limit_s is None or now - self.t0 < self.limit_s

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


@register
class ConjugateGradientInverse(InverseCurvature):
    """CG on M + lambda I from batched curvature products over the whole training set, per right-hand side."""

    name = "cg"

    def __init__(self, curv: Curvature, source: BatchSource, damping: float, method: "InfluenceFunction"):
        self.curv, self.source, self.damping, self.method = curv, source, damping, method

    @classmethod
    def build(cls, method, ctx, matrix, damping, decay):
        fn = ModelFunction(ctx.module, ctx.param_names, ctx.output, dtype=method.dtype)
        curv = Curvature(fn, matrix, decay, ctx.n_train, chunk=method.rhs_chunk)
        bs = method.batch_size or ctx.batch_size
        # every rank sees the whole training set: transform stays free of collectives (see the module docstring)
        return cls(curv, BatchSource(lambda: ctx.train_batches(ctx.all_rows(), bs)), damping, method)

    def apply(self, V):
        m, info = self.method, self.method.info
        out = torch.empty_like(V)
        progress = _Progress("cg", m.progress_every_s, m.time_limit_s)
        for lo in range(0, V.shape[0], m.rhs_chunk):
            def tick(it: int, resid: torch.Tensor) -> bool:
                return progress.tick(f"vectors {lo}-{min(V.shape[0], lo + m.rhs_chunk)} of {V.shape[0]}, iteration "
                                     f"{it}/{m.cg_max_iter}, max relative residual {float(resid.max()):.2e} "
                                     f"(target {m.cg_tol:g})")
            X, iters, resid = conjugate_gradient(lambda P: self.curv.matvec(P, self.source) + self.damping * P,
                                                 V[lo:lo + m.rhs_chunk], m.cg_tol, m.cg_max_iter, on_iteration=tick)
            out[lo:lo + m.rhs_chunk] = X
            info["cg_max_iterations"] = max(info.get("cg_max_iterations", 0), int(iters.max()))
            bad = int((resid > m.cg_tol).sum())
            if bad:
                timed_out = m.time_limit_s is not None and progress.elapsed >= m.time_limit_s
                why = (f"the time limit time_limit_s={m.time_limit_s:g}" if timed_out
                       else f"{m.cg_max_iter} iterations (cg_max_iter)")
                warnings.warn(f"conjugate gradient stopped after {why} for {bad} vector(s) (relative residual up to "
                              f"{float(resid.max()):.2e} > cg_tol={m.cg_tol:g}); raise cg_max_iter / time_limit_s or "
                              "the damping, or use solver='ekfac' or 'projected' (faster on large models)",
                              ConvergenceWarning, stacklevel=2)
                if timed_out:   # what is left gets zero iterations: say so once and stop solving
                    info["cg_time_limit_hit"] = True
                    progress.limit_s = 0.0
        return out


@register
class LiSSAInverse(InverseCurvature):
    """Stochastic Neumann series (Agarwal et al. 2017) with seeded minibatches: one fixed linear operator."""

    name = "lissa"

    def __init__(self, curv: Curvature, ctx: ModelContext, damping: float, scale: float, method: "InfluenceFunction"):
        self.curv, self.train_batches, self.n_train = curv, ctx.train_batches, ctx.n_train
        self.damping, self.scale, self.method = damping, scale, method

    @classmethod
    def build(cls, method, ctx, matrix, damping, decay):
        fn = ModelFunction(ctx.module, ctx.param_names, ctx.output, dtype=method.dtype)
        curv = Curvature(fn, matrix, decay, ctx.n_train, chunk=method.rhs_chunk)
        scale = method.lissa_scale
        if scale is None:
            bs = method.batch_size or ctx.batch_size
            source = BatchSource(lambda: ctx.train_batches(ctx.all_rows(), bs))
            top = power_iteration(lambda V: curv.matvec(V, source) + damping * V, int(decay.numel()),
                                  seed=derive_seed(method.seed, "lissa-power") % 2**63, device=ctx.dist.device)
            scale = 2.0 * top
        method.info["lissa_scale"] = scale
        return cls(curv, ctx, damping, scale, method)

    def apply(self, V):
        m = self.method
        V = V.to(torch.float64)
        decay = self.curv.decay.to(V.device)
        estimate = torch.zeros_like(V)
        progress = _Progress("lissa", m.progress_every_s, m.time_limit_s)
        for r in range(m.lissa_repeats):
            gen = torch.Generator().manual_seed(derive_seed(m.seed, "lissa", r) % 2**63)
            rows = torch.randint(0, self.n_train, (m.lissa_depth * m.lissa_batch_size,), generator=gen).tolist()
            h = V.clone()
            for j, batch in enumerate(self.train_batches(rows, m.lissa_batch_size)):
                hv = torch.zeros_like(h)
                for lo in range(0, h.shape[0], self.curv.chunk):
                    hv[lo:lo + self.curv.chunk] = self.curv.batch_products(h[lo:lo + self.curv.chunk], batch).double()
                mh = hv / batch_size_of(batch) + decay * h + self.damping * h
                h = V + h - mh / self.scale
                if not progress.tick(f"repeat {r + 1}/{m.lissa_repeats}, depth {j + 1}/{m.lissa_depth}"):
                    warnings.warn(f"LiSSA stopped at depth {j + 1}/{m.lissa_depth} of repeat {r + 1} after the time "
                                  f"limit time_limit_s={m.time_limit_s:g}: the truncated series acts like extra damping. "
                                  "Raise time_limit_s, lower lissa_depth, or use solver='ekfac' or 'projected'",
                                  ConvergenceWarning, stacklevel=2)
                    m.info["lissa_time_limit_hit"] = True
                    break
            if not torch.isfinite(h).all() or h.norm() > 1e12 * max(V.norm().item(), 1e-300):
                raise ValueError(f"LiSSA diverged (scale={self.scale:.3g}): raise lissa_scale or the damping")
            estimate += h / self.scale
            if m.info.get("lissa_time_limit_hit"):
                return estimate / (r + 1)
        return estimate / m.lissa_repeats


@register
class ProjectedInverse(InverseCurvature):
    """H ~ Phi^T Phi / n + weight_decay + lambda I from the stored (projected) features' kernel: any projector."""

    name = "projected"
    needs_gradients = False
    default_matrix = "empirical_fisher"
    matrices = ("empirical_fisher",)

    def __init__(self, inverse: torch.Tensor):
        self.inverse = inverse

    def apply(self, V):
        return V @ self.inverse.to(V.device)


def choose_solver(module: nn.Module, param_names: list[str], max_params: int = DEFAULT_MAX_PARAMS) -> tuple[str, str]:
    """("explicit" | "projected", why): the automatic choice, by the number of attributed parameters p.

    Measured (benchmarks/bench_layers.py, 1,000 digits / token examples, 10% flipped labels, self-influence AUROC):
    EK-FAC and the projected solver (k = 2048 tensor sketch) tie (MLP 85k params 0.990 / 0.990, BatchNorm CNN 15k
    0.963 / 0.967, transformer 71k 0.837 / 0.838) while EK-FAC takes 4-17x longer (its features are full gradients);
    so: the exact damped inverse while p x p fits (p <= max_params), else the projected features' Fisher. EK-FAC
    stays available as solver="ekfac".
    """
    named = dict(module.named_parameters())
    p = int(sum(named[n].numel() for n in param_names))
    if p <= max_params:
        return "explicit", f"{p} parameters <= max_params={max_params}: the exact damped inverse"
    return "projected", (f"{p} parameters > max_params={max_params}: the projected features' Fisher (as accurate "
                         "as EK-FAC on flipped-label detection, several times faster; benchmarks/bench_layers.py)")


class InfluenceFunction(FeatureMethod):
    """Influence functions of the loss at the final weights; see the module docstring for solvers, scale and sign.

    Args:
        solver: "auto" (default), "explicit", "cg", "lissa", "ekfac" or "projected" (`SOLVERS`).
        damping: absolute lambda (finite, >= 0); None uses `damping_ratio` (see the module docstring).
        damping_ratio: lambda relative to the mean eigenvalue of the empirical Fisher.
        weight_decay: the training objective's L2 term, as a float (every attributed parameter) or a mapping
            {parameter name: coefficient} (e.g. {"weight": 1e-2} when biases are not decayed); adds D to M.
        matrix: curvature: "hessian" | "ggn" | "empirical_fisher" (None: the solver's default; hessian for
            explicit/cg/lissa, ggn for ekfac, empirical_fisher for projected; "auto" picks ggn for the built-in loss).
        max_params: the explicit solver refuses larger parameter counts ("auto" uses it as its threshold).
        cg_tol, cg_max_iter: relative residual and iteration cap per right-hand side.
        lissa_depth, lissa_scale, lissa_repeats, lissa_batch_size, seed: LiSSA settings (scale None: automatic).
        time_limit_s: cg / lissa stop after this many seconds per solve (None: no limit), with a ConvergenceWarning.
        progress_every_s: seconds between progress lines of cg / lissa on stderr (None: silent).
        batch_size: training batch size for curvature passes (None: the Attributor's).
        rhs_chunk: right-hand sides (or identity columns) per vmapped curvature product.
        dtype: compute dtype of curvature products (None: float64 for explicit, the model's dtype otherwise).
    """

    name = "influence"
    output = "loss"
    snapshot_policy = "last"

    def __init__(self, solver: str = "auto", damping: float | None = None,
                 damping_ratio: float = DEFAULT_DAMPING_RATIO, weight_decay: float | Mapping[str, float] = 0.0,
                 matrix: str | None = None, max_params: int = DEFAULT_MAX_PARAMS, cg_tol: float = 1e-8,
                 cg_max_iter: int = 1000, lissa_depth: int = 1000, lissa_scale: float | None = None,
                 lissa_repeats: int = 1, lissa_batch_size: int = 64, seed: int = 0, batch_size: int | None = None,
                 rhs_chunk: int = 256, dtype: torch.dtype | None = None, time_limit_s: float | None = 600.0,
                 progress_every_s: float | None = 10.0):
        if solver != "auto" and solver not in SOLVERS:
            raise ValueError(f"unknown influence solver {solver!r}: use 'auto' or one of {tuple(SOLVERS)}")
        if matrix is not None and matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {MATRICES}, got {matrix!r}")
        if solver == "ekfac" and matrix == "hessian":
            raise ValueError("solver='ekfac' approximates the GGN/Fisher, not the Hessian: use matrix='ggn' or "
                             "'empirical_fisher' (or solver='explicit'/'cg' for the Hessian)")
        if solver == "projected" and matrix not in (None, "empirical_fisher"):
            raise ValueError("solver='projected' uses the empirical Fisher of the stored features (matrix='empirical_fisher')")
        if solver == "projected" and isinstance(weight_decay, Mapping):
            raise ValueError("solver='projected' supports a float weight_decay only (added as weight_decay * I in "
                             "feature space)")
        for nm, val in (("damping", damping), ("damping_ratio", damping_ratio), ("cg_tol", cg_tol),
                        ("lissa_scale", lissa_scale), ("time_limit_s", time_limit_s),
                        ("progress_every_s", progress_every_s)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val)):
                raise ValueError(f"{nm} must be a finite number, got {val!r}")
        if not isinstance(weight_decay, Mapping) and not math.isfinite(float(weight_decay)):
            raise ValueError(f"weight_decay must be finite, got {weight_decay!r}")
        if damping is not None and damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if damping_ratio < 0:
            raise ValueError(f"damping_ratio must be >= 0, got {damping_ratio}")
        for nm, val in (("max_params", max_params), ("cg_max_iter", cg_max_iter), ("lissa_depth", lissa_depth),
                        ("lissa_repeats", lissa_repeats), ("lissa_batch_size", lissa_batch_size), ("rhs_chunk", rhs_chunk)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{nm} must be a positive integer, got {val!r}")
        if cg_tol <= 0:
            raise ValueError(f"cg_tol must be > 0, got {cg_tol}")
        if lissa_scale is not None and lissa_scale <= 0:
            raise ValueError(f"lissa_scale must be > 0, got {lissa_scale}")
        if time_limit_s is not None and time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0 (or None for no limit), got {time_limit_s}")
        self.solver_requested, self.matrix_requested = solver, matrix
        self.damping, self.damping_ratio = damping, damping_ratio
        self.weight_decay = dict(weight_decay) if isinstance(weight_decay, Mapping) else float(weight_decay)
        self.max_params = max_params
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        self.lissa_depth, self.lissa_scale, self.lissa_repeats = lissa_depth, lissa_scale, lissa_repeats
        self.lissa_batch_size, self.seed, self.batch_size, self.rhs_chunk = lissa_batch_size, seed, batch_size, rhs_chunk
        self.dtype, self.time_limit_s, self.progress_every_s = dtype, time_limit_s, progress_every_s
        self.solver_reason = "chosen by the user" if solver != "auto" else None
        self._resolve(solver, None)
        self._solvers: dict[int, InverseCurvature] = {}
        self._n_train: int | None = None
        self.damping_used: list[float] = []
        self.info: dict[str, Any] = {}

    def _resolve(self, solver: str, output: Any) -> None:
        """Fix the solver (and its matrix) this run uses; "auto" stays open until the model is known."""
        self.solver = solver
        if solver == "auto":
            self.matrix, self.needs_kernel = None, False
            return
        cls = SOLVERS[solver]
        matrix = self.matrix_requested
        if matrix is None:
            matrix = cls.default_matrix
            if self.solver_requested == "auto" and "ggn" in cls.matrices:
                matrix = "ggn" if isinstance(output, CrossEntropyLoss) else "empirical_fisher"
        self.matrix = matrix
        self.needs_kernel = not cls.needs_gradients   # the pipeline reduces Phi^T Phi for the projected solver only

    def choose_projector(self, module: nn.Module, param_names: list[str], projector: str, output: Any = None) -> str:
        """Called by the pipeline before featurizing: resolves "auto" for this model, and returns the projector the
        solver needs ("identity" for full-gradient solvers, else the requested one)."""
        if self.solver_requested == "auto":
            name, self.solver_reason = choose_solver(module, param_names, self.max_params)
            if name == "projected" and projector == "identity":
                # full gradients requested: the projected solver would invert a p x p kernel; EK-FAC works on them
                try:
                    check_supported(LayerEngine(module, param_names))
                except ValueError as err:
                    raise ValueError(
                        f"influence with projector='identity' on {self.solver_reason.split(':')[0]}: the automatic "
                        f"solver would be EK-FAC, which cannot run here ({err}). Use a projector such as "
                        "'tensorsketch' (the default), restrict params=, or pick solver= yourself.") from None
                name = "ekfac"
                self.solver_reason += "; full gradients requested (projector='identity'), so EK-FAC instead"
            self._resolve(name, output)
        self._check_model(module, param_names)
        return "identity" if SOLVERS[self.solver].needs_gradients else projector

    def _check_model(self, module: nn.Module, param_names: list[str]) -> None:
        """Configuration errors the model shows before any featurization (explicit too large, EK-FAC unsupported)."""
        named = dict(module.named_parameters())
        p = int(sum(named[n].numel() for n in param_names))
        if self.solver == "explicit" and p > self.max_params:
            raise ValueError(
                f"solver='explicit' forms the {p} x {p} curvature matrix; that is above max_params={self.max_params}. "
                "Use solver='auto', 'cg', 'lissa', 'ekfac' or 'projected', restrict params=, or raise max_params.")
        if self.solver == "ekfac":
            check_supported(LayerEngine(module, param_names))

    # -- model-based preparation (called by Attributor.run before fit) -----------------------------------
    def prepare(self, ctx: ModelContext) -> None:
        if ctx.snapshot_index == 0:          # a fresh run: forget solvers of an earlier one
            self._solvers, self.damping_used, self.info = {}, [], {}
        features = ctx.projector.get("projector")
        if self.solver == "auto":            # not resolved by choose_projector (called outside the pipeline)
            if features == "identity":
                self.choose_projector(ctx.module, ctx.param_names, features, ctx.output)
            else:
                self.solver_reason = f"features are projected ({features!r}): the projected features' Fisher"
                self._resolve("projected", ctx.output)
        cls = SOLVERS[self.solver]
        if not cls.needs_gradients:
            return
        if features != "identity":
            raise ValueError(
                f"InfluenceFunction(solver={self.solver!r}) works on full gradients: run the Attributor with "
                f"projector='identity' (got {features!r}), or use solver='projected' for projected features")
        if self.matrix not in cls.matrices:
            raise ValueError(f"solver={self.solver!r} supports matrix in {cls.matrices}, got {self.matrix!r}")
        named = dict(ctx.module.named_parameters())
        numels = [named[n].numel() for n in ctx.param_names]
        damping = self._damping_from_features(ctx, int(sum(numels)))
        decay = decay_vector(ctx.param_names, numels, self.weight_decay, device=ctx.dist.device)
        self._solvers[ctx.snapshot_index] = cls.build(self, ctx, self.matrix, damping, decay)
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
        if self.solver == "auto":
            self._resolve("projected", None)
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
                self._solvers[c] = ProjectedInverse(solve_damped(mat, lam, "projected influence matrix"))
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
            "method": self.name, "solver": self.solver, "solver_requested": self.solver_requested,
            "solver_reason": self.solver_reason, "matrix": self.matrix,
            "damping": self.damping_used,
            "damping_rule": ("absolute" if self.damping is not None else
                             f"{self.damping_ratio} * mean_i ||g_i||^2 / p (mean eigenvalue of the empirical Fisher)"),
            "weight_decay": self.weight_decay,
            "scale": "grad L(z_q)^T (M + lambda I)^-1 grad L(z_i) / n_train ~ loss_q(without i) - loss_q(all)",
        }
        if self.solver == "explicit":
            d["max_params"] = self.max_params
        if self.solver == "cg":
            d.update(cg_tol=self.cg_tol, cg_max_iter=self.cg_max_iter, time_limit_s=self.time_limit_s)
        if self.solver == "lissa":
            d.update(lissa_depth=self.lissa_depth, lissa_repeats=self.lissa_repeats,
                     lissa_batch_size=self.lissa_batch_size, seed=self.seed, time_limit_s=self.time_limit_s)
        if self.solver == "ekfac":
            d["ekfac_norm_layers"] = "handled: their affine parameters are blocks with d_in = 1 (exact per block)"
        d.update({k: v for k, v in self.info.items()})
        return d

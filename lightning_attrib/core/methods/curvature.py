"""Curvature of the training loss over the attributed parameters, as batched matrix-vector products.

The matrix an influence function inverts is

    M = (1/n) sum_i m(z_i) + D,        D = diag(weight decay of each attributed parameter entry)

with m(z) one of (all for the per-example output f, normally the loss, at the snapshot weights theta):

* "hessian":          d^2 f(z; theta) / d theta^2 (forward-over-reverse Hessian-vector products);
* "ggn":              the generalized Gauss-Newton J^T (d^2 CE / d logits^2) J = J^T (diag(p) - p p^T) J, which for
                      softmax cross-entropy is also the true Fisher (expectation over labels drawn from the model).
                      It needs the built-in "loss" output (cross-entropy on `module(inputs)` logits);
* "empirical_fisher": grad f(z) grad f(z)^T (gradients at the observed labels).

For a model linear in its parameters (logistic regression) "hessian" and "ggn" coincide.
Everything is evaluated with `torch.func.functional_call` on a private copy of the snapshot weights
(`ModelFunction`), in eval mode, so the user's module, its `.grad` and its weights are never touched.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from ..batches import tensor_leaves, unpack_batch
from ..gradients import no_attention_fast_path, per_example_gradients
from ..layers import explicit_attention
from ..outputs import CrossEntropyLoss

MATRICES = ("hessian", "ggn", "empirical_fisher")


def cast_batch(batch: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors of a (nested) batch cast to `dtype` (labels and masks keep theirs)."""
    if dtype is None:
        return batch
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, batch)


class _Bound(nn.Module):
    """Lets `functional_call` swap the weights of `module` while `fn(module, batch)` runs it."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.module, batch)


def _logits(module: nn.Module, batch: Any) -> torch.Tensor:
    inputs, _ = unpack_batch(batch)
    return module(inputs)


class ModelFunction:
    """A pure-function view of the module at a snapshot: flat attributed parameters -> outputs / logits.

    Keeps a private copy (optionally cast to `dtype`) of every parameter and buffer, so later changes to the
    module's weights do not affect it. The flat parameter vector follows `param_names` order, each tensor
    flattened row-major: the layout of the pipeline's gradient features.
    """

    def __init__(self, module: nn.Module, param_names: list[str], output_fn, dtype: torch.dtype | None = None):
        named = dict(module.named_parameters())
        self.param_names = list(param_names)
        self.shapes = [tuple(named[n].shape) for n in self.param_names]
        self.numels = [named[n].numel() for n in self.param_names]
        self.num_params = int(sum(self.numels))
        self.dtype = dtype or named[self.param_names[0]].dtype

        def own(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().clone()
            return t.to(self.dtype) if t.is_floating_point() else t

        self.theta = torch.cat([own(named[n]).reshape(-1) for n in self.param_names])
        chosen = set(self.param_names)
        self.fixed = {f"module.{n}": own(p) for n, p in named.items() if n not in chosen}
        self.fixed.update({f"module.{n}": own(b) for n, b in module.named_buffers()})
        self.module, self.output_fn = module, output_fn
        self._out = _Bound(module, output_fn)
        self._logit = _Bound(module, _logits)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.numels)
        return {f"module.{n}": t.view(s) for n, t, s in zip(self.param_names, parts, self.shapes)}

    def _call(self, bound: nn.Module, flat: torch.Tensor, batch: Any) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            # the attention fast path's nested-tensor kernels and the fused attention kernel have no torch.func rules
            with no_attention_fast_path(), explicit_attention(self.module):
                return functional_call(bound, {**self.fixed, **self.unflatten(flat)}, (batch,))
        finally:
            self.module.train(was_training)

    def outputs(self, flat: torch.Tensor, batch: Any) -> torch.Tensor:
        """(B,) per-example outputs f(z; theta)."""
        return self._call(self._out, flat, cast_batch(batch, self.dtype))

    def logits(self, flat: torch.Tensor, batch: Any) -> torch.Tensor:
        return self._call(self._logit, flat, cast_batch(batch, self.dtype))

    def per_example_grads(self, batch: Any) -> torch.Tensor:
        """(B, p) gradients of f(z_i) at the snapshot weights."""
        return per_example_gradients(lambda flat, ex: self._call(self._out, flat, ex), self.theta,
                                     cast_batch(batch, self.dtype))


def decay_vector(param_names: list[str], numels: list[int], weight_decay: float | Mapping[str, float],
                 dtype=torch.float64, device=None) -> torch.Tensor:
    """(p,) per-entry weight decay: a float applies to every attributed parameter, a mapping {name: coefficient}
    to the named ones (others get 0; e.g. {"weight": 1e-2} for an L2 term that leaves the bias out)."""
    if isinstance(weight_decay, Mapping):
        unknown = sorted(set(weight_decay) - set(param_names))
        if unknown:
            raise ValueError(f"weight_decay names {unknown} are not attributed parameters; attributed: {param_names[:20]}")
        coefs = [float(weight_decay.get(n, 0.0)) for n in param_names]
    else:
        coefs = [float(weight_decay)] * len(param_names)
    if any(c < 0 for c in coefs):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return torch.cat([torch.full((k,), c, dtype=dtype, device=device) for c, k in zip(coefs, numels)])


class BatchSource:
    """Re-iterable training batches; kept in memory after the first pass when they total <= `cache_bytes`."""

    def __init__(self, make: Callable[[], Iterable[Any]], cache_bytes: int = 256 * 2**20):
        self.make, self.cache_bytes = make, cache_bytes
        self._cache: list | None = None

    def __iter__(self):
        if self._cache is not None:
            yield from self._cache
            return
        kept: list | None = []
        size = 0
        for batch in self.make():
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in tensor_leaves(batch))
                if size <= self.cache_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            self._cache = kept


class Curvature:
    """Products with M = (1/n) sum_i m(z_i) + D (see the module docstring) for blocks of vectors.

    `batch_products(V, batch)` gives sum over the batch of m(z) v for each row v of V (in the model
    function's dtype); `matvec(V, batches)` gives the float64 rows of M V^T over the given batches.
    """

    def __init__(self, fn: ModelFunction, matrix: str, decay: torch.Tensor, n_train: int, chunk: int = 256):
        if matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {MATRICES}, got {matrix!r}")
        if matrix == "ggn" and not isinstance(fn.output_fn, CrossEntropyLoss):
            raise ValueError(
                "matrix='ggn' needs the built-in 'loss' output (softmax cross-entropy on module(inputs) logits), "
                f"got output {getattr(fn.output_fn, 'name', fn.output_fn)!r}; use matrix='hessian' or 'empirical_fisher'"
            )
        self.fn, self.matrix, self.n_train, self.chunk = fn, matrix, n_train, chunk
        self.decay = decay.to(torch.float64)

    def batch_products(self, V: torch.Tensor, batch: Any) -> torch.Tensor:
        fn, theta = self.fn, self.fn.theta
        V = V.to(fn.dtype)
        if self.matrix == "hessian":
            def total(t):
                return fn.outputs(t, batch).sum()

            g = grad(total)
            return vmap(lambda v: jvp(g, (theta,), (v,))[1])(V)
        if self.matrix == "ggn":
            def logit_fn(t):
                return fn.logits(t, batch)

            z, pull = vjp(logit_fn, theta)
            p = torch.softmax(z.detach(), dim=-1)

            def one(v):
                jv = jvp(logit_fn, (theta,), (v,))[1]
                u = p * jv - p * (p * jv).sum(dim=-1, keepdim=True)
                return pull(u)[0]

            return vmap(one)(V)
        G = fn.per_example_grads(batch)
        return (V @ G.T) @ G

    def matvec(self, V: torch.Tensor, batches: Iterable[Any], reduce: Callable | None = None) -> torch.Tensor:
        """(m, p) float64 rows of M V^T; `reduce` (an all-reduce) is applied to the data sum when given."""
        out = torch.zeros(V.shape, dtype=torch.float64, device=V.device)
        for batch in batches:
            for lo in range(0, V.shape[0], self.chunk):
                out[lo:lo + self.chunk] += self.batch_products(V[lo:lo + self.chunk], batch).to(torch.float64)
        if reduce is not None:
            out = reduce(out)
        return out / self.n_train + V.to(torch.float64) * self.decay.to(V.device)

    def ggn_factors(self, batch: Any) -> Iterable[torch.Tensor]:
        """(B, p) per-example gradients u_c of the pseudo-outputs sqrt(p_c) (p - e_c)^T z, c = 1..C: sum_c u_c u_c^T is
        the example's GGN J^T (diag(p) - p p^T) J. C per-example gradient passes instead of p Jacobian products."""
        fn = self.fn
        with torch.no_grad():
            z = fn.logits(fn.theta, batch)
        prob = torch.softmax(z.double(), dim=-1)
        eye = torch.eye(z.shape[-1], dtype=torch.float64, device=z.device)
        for c in range(z.shape[-1]):
            w = (prob[..., c:c + 1].sqrt() * (prob - eye[c])).to(fn.dtype)
            yield per_example_gradients(lambda t, ex: (fn.logits(t, ex[0]) * ex[1]).sum(), fn.theta, (batch, w))

    def dense(self, batches: Iterable[Any], reduce: Callable | None = None) -> torch.Tensor:
        """The explicit (p, p) float64 matrix M: from the GGN factors (`ggn_factors`) or the per-example gradients
        (empirical Fisher), else from products with identity columns (Hessian)."""
        p = self.fn.num_params
        device = self.fn.theta.device
        rows = torch.zeros(p, p, dtype=torch.float64, device=device)
        for batch in batches:
            if self.matrix != "hessian":
                factors = (self.ggn_factors(batch) if self.matrix == "ggn"
                           else [self.fn.per_example_grads(cast_batch(batch, self.fn.dtype))])
                for U in factors:
                    U = U.to(torch.float64)
                    rows += U.T @ U
                continue
            for lo in range(0, p, self.chunk):
                hi = min(p, lo + self.chunk)
                eye = torch.zeros(hi - lo, p, dtype=self.fn.dtype, device=device)
                eye[torch.arange(hi - lo), torch.arange(lo, hi)] = 1
                rows[lo:hi] += self.batch_products(eye, batch).to(torch.float64)
        if reduce is not None:
            rows = reduce(rows)
        mat = rows / self.n_train
        mat = 0.5 * (mat + mat.T)
        return mat + torch.diag(self.decay.to(device))


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, tol: float, max_iter: int,
                       on_iteration: Callable[[int, torch.Tensor], bool] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve A X_j = B_j for every row j of B (A symmetric positive definite, given by `matvec` on row blocks).

    Each row runs its own CG recurrence and stops once ||r|| <= tol * ||b||, so a row's solution does not depend
    on the other rows it is batched with. `on_iteration(iteration, relative residuals)` is called after every
    iteration (progress); returning False stops all rows there. Returns (X, iterations per row, final relative
    residual per row).
    """
    B = B.to(torch.float64)
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(dim=1)
    b_norm = rs.sqrt()
    target = tol * b_norm
    iters = torch.zeros(B.shape[0], dtype=torch.long)
    active = rs.sqrt() > target
    for _ in range(max_iter):
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            break
        AP = matvec(P[idx])
        pap = (P[idx] * AP).sum(dim=1)
        if (pap <= 0).any():
            raise ValueError(
                "conjugate gradient met a non-positive curvature direction: the damped matrix is not positive definite "
                "(the Hessian of a non-convex model can be indefinite). Increase the damping or use matrix='ggn'."
            )
        alpha = rs[idx] / pap
        X[idx] += alpha[:, None] * P[idx]
        R[idx] -= alpha[:, None] * AP
        rs_new = (R[idx] * R[idx]).sum(dim=1)
        P[idx] = R[idx] + (rs_new / rs[idx])[:, None] * P[idx]
        rs[idx] = rs_new
        iters[idx.cpu()] += 1
        active[idx] = rs_new.sqrt() > target[idx]
        if on_iteration is not None and not on_iteration(int(iters.max()), rs.sqrt() / b_norm.clamp_min(1e-300)):
            break
    return X, iters, (rs.sqrt() / b_norm.clamp_min(1e-300)).cpu()


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, iters: int = 20, seed: int = 0,
                    device=None) -> float:
    """Largest eigenvalue (Rayleigh quotient) of a symmetric PSD operator, from a seeded random start."""
    v = torch.randn(1, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float((v * w).sum())
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
    return lam

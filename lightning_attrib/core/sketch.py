"""Projected per-example gradients from layer factors (issue #8, #13): the Kronecker projector and the tensor sketch.

Both are thin users of the layer engine (`core/layers.py`): one batched forward + backward gives, per hooked layer,
the terms (A_t, D_t) of its per-example gradient G = sum_t D_t A_t^T (d_out x d_in, the bias as an input column of
ones), and each projector turns them into features without forming G (unless that is cheaper). Parameters the engine
does not hook ("rest") go through `torch.func` per-example gradients and a dense seeded `RandomProjector`.

Kronecker (`KroneckerProjector`, `projector="factorized"`): vec(P_out^T G P_in) =
vec(sum_t (P_out^T D_t)(P_in^T A_t)^T), k_out x k_in per layer, the layers' blocks side by side.

    How `proj_dim` is split (recorded in `layout`; the feature dim is exactly `proj_dim` unless that exceeds the number
    of selected parameters: then every block is kept exact, dim = num params)
    1. Blocks (each layer, plus one block for the rest) get shares of proj_dim by water-filling: proportional to a
       weight (`allocation="equal"`: 1 per block, like LoGra's fixed per-layer size; `"params"`: the block's
       parameter count), capped at the block's parameter count (a block that fits whole is kept exactly).
    2. A layer with share s takes k_out ~ k_in ~ sqrt(s). If a side is no larger than sqrt(s) it is kept whole
       (identity, so that side is exact: e.g. the 10 logits of a classifier head) and the other side gets s // d.
       Otherwise both sides are random and the k_out x k_in grid, chosen just >= s, is truncated to its first s
       entries (rescaled by sqrt(k_out k_in / s), which keeps E[P P^T] = I).
    3. The few dims lost by rounding identity-side layers down go to the rest block, else to a layer re-planned
       with random sides, so the total is exact.
    Entries are +-1/sqrt(k) (`RandomProjector` conventions). The estimate of <G1, G2> is a product of two JL
    estimates, so at equal k it is noisier than a dense projection; the tensor sketch is not.

Tensor sketch (`TensorSketchProjector`, `projector="tensorsketch"`, Pham & Pagh 2013): with count sketches C_out
(bucket h_out(o), sign s_out(o)) and C_in of width s = proj_dim,

    feature = sum_t circular_convolution(C_out D_t, C_in A_t) = irfft(sum_t rfft(C_out D_t) * rfft(C_in A_t))

is exactly the count sketch of vec(G) with bucket (h_out(o) + h_in(i)) mod s and sign s_out(o) s_in(i): unbiased,
with the variance of a dense projection to s dims. Every layer is sketched to the full width and the sketches (and
the rest's dense projection) are summed: one count sketch of the whole gradient, no split of proj_dim to tune. Where
forming G is cheaper (convolutions with few channels, small layers: `_via_gradient`) G is formed and scattered with
the pair hash instead: the same numbers.

Seeds: every matrix and hash comes from `core.io.derive_seed(seed, layer name, side, ...)`, so features depend on
(seed, module names and shapes, proj_dim, allocation) only, never on batch size or device.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .gradients import PerExampleGradients, select_parameters
from .io import derive_seed
from .layers import Layer, LayerEngine, Term
from .projection import DENSE_KINDS, RandomProjector

ALLOCATIONS = ("equal", "params")
FACTOR_KINDS = ("rademacher", "gaussian")


@dataclass
class LayerPlan:
    """How one hooked layer is projected: feature block = vec(P_out^T G P_in)[:dim] * scale (Kronecker), or its
    count sketch of width dim (tensor sketch)."""

    name: str                 # module name
    kind: str                 # layer kind (core.layers.KINDS): "linear", "conv2d", "embedding", "norm", "mha", ...
    param_names: list[str]    # full parameter names, in the layer's G layout order
    d_out: int
    d_in: int                 # columns of G (input features, plus 1 when the bias is folded in)
    has_bias: bool
    k_out: int = 0
    k_in: int = 0
    out_identity: bool = False
    in_identity: bool = False
    dim: int = 0
    scale: float = 1.0
    tensor_sketch: bool = False

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in


@dataclass
class _Rest:
    """Parameters the layer engine does not hook: per-example gradients (torch.func) and a dense projection."""

    param_names: list[str] = field(default_factory=list)
    numel: int = 0
    dim: int = 0


def plan_layer(d_out: int, d_in: int, share: int, exact: bool) -> tuple[int, bool, int, bool, int]:
    """(k_out, out_identity, k_in, in_identity, dim) for a d_out x d_in gradient and a share of dims.

    With `exact=False` an identity side may round the dim down to a multiple of it; `exact=True` always
    returns dim == min(share, d_out * d_in).
    """
    cap = d_out * d_in
    if share <= 0:
        return 1, False, 1, False, 0
    if share >= cap:
        return d_out, True, d_in, True, cap
    root = math.sqrt(share)
    if d_out <= root and (not exact or share % d_out == 0):
        return d_out, True, share // d_out, False, d_out * (share // d_out)
    if d_in <= root and (not exact or share % d_in == 0):
        return share // d_in, False, d_in, True, d_in * (share // d_in)
    k_out = min(d_out, max(1, round(root)))
    k_in = min(d_in, math.ceil(share / k_out))
    k_out = min(d_out, math.ceil(share / k_in))
    return k_out, False, k_in, False, share


def water_fill(total: int, caps: list[int], weights: list[float]) -> list[int]:
    """Integer shares summing to min(total, sum(caps)): proportional to weights, each capped at its cap."""
    n = len(caps)
    alloc = [0.0] * n
    active = [i for i in range(n) if caps[i] > 0]
    remaining = float(min(total, sum(caps)))
    while active:
        wsum = sum(weights[i] for i in active)
        full = [i for i in active if remaining * weights[i] / wsum >= caps[i]]
        if not full:
            for i in active:
                alloc[i] = remaining * weights[i] / wsum
            break
        for i in full:
            alloc[i] = caps[i]
            remaining -= caps[i]
        active = [i for i in active if i not in full]
    ints = [min(caps[i], int(math.floor(alloc[i] + 1e-9))) for i in range(n)]
    short = int(min(total, sum(caps))) - sum(ints)
    order = sorted(range(n), key=lambda i: -(alloc[i] - math.floor(alloc[i] + 1e-9)))
    for i in order:
        if short <= 0:
            break
        if ints[i] < caps[i]:
            ints[i] += 1
            short -= 1
    return ints


class HookedProjector:
    """Shared part of the hook-based projectors: layer engine, rest (dense fallback), layout, `features(batch)`.

    Subclasses plan `self.layers` (`_plan`) and turn one layer's terms into its feature block (`_combine`).
    """

    sketch = "?"
    summed = False   # True: all blocks share the same proj_dim columns (tensor sketch); False: side by side

    def __init__(self, module: nn.Module, output_fn: Callable | None, param_names: Iterable[str] | None = None,
                 proj_dim: int = 2048, seed: int = 0, device: str | torch.device | None = None,
                 accept: Callable[[Layer], bool] | None = None, kind: str = "rademacher"):
        if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive integer (e.g. 2048), got {proj_dim!r}")
        if kind not in FACTOR_KINDS:
            raise ValueError(f"kind must be one of {FACTOR_KINDS}, got {kind!r}")
        self.module, self.output_fn, self.kind = module, output_fn, kind
        self.param_names = list(param_names) if param_names is not None else select_parameters(module)
        self.requested_dim, self.seed = proj_dim, int(seed)
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.engine = LayerEngine(module, self.param_names, accept)
        self.layers = [LayerPlan(la.name, la.kind, list(la.param_names), la.d_out, la.d_in, la.has_bias)
                       for la in self.engine.layers]
        params = dict(module.named_parameters())
        self.fallback = _Rest(list(self.engine.rest), int(sum(params[n].numel() for n in self.engine.rest)))
        self._plan()
        self.num_params = sum(layer.numel for layer in self.layers) + self.fallback.numel
        self._mats: dict[tuple, Any] = {}
        self._fallback_grads: PerExampleGradients | None = None
        self._fallback_proj: RandomProjector | None = None

    def _plan(self) -> None:
        raise NotImplementedError

    @property
    def layout(self) -> dict:
        """Everything the features depend on besides the weights: JSON-able, recorded in store settings."""
        return {"projector": "factorized", "proj_dim": self.proj_dim, "requested_dim": self.requested_dim,
                "seed": self.seed, "allocation": getattr(self, "allocation", "equal"), "kind": self.kind,
                "sketch": self.sketch, "layers": [asdict(layer) for layer in self.layers],
                "fallback": {"params": self.fallback.param_names, "numel": self.fallback.numel,
                             "dim": self.fallback.dim}}

    @property
    def layout_hash(self) -> str:
        return hashlib.sha1(json.dumps(self.layout, sort_keys=True).encode()).hexdigest()

    def __call__(self, batch: Any) -> torch.Tensor:
        return self.features(batch)

    def features(self, batch: Any) -> torch.Tensor:
        """(B, proj_dim) float32 projected per-example gradients of `output_fn` for `batch` (on the module's device)."""
        was_training = self.module.training
        self.module.eval()
        try:
            feats = self._hooked(batch) if any(layer.dim for layer in self.layers) else None
            if self.fallback.dim:
                dense = self._dense_fallback(batch)
                feats = dense if feats is None else (feats + dense if self.summed else torch.cat([feats, dense], dim=1))
        finally:
            self.module.train(was_training)
        return feats.float()

    def _hooked(self, batch: Any) -> torch.Tensor:
        out, records = self.engine.run(self.output_fn, batch)
        plans = {layer.name: layer for layer in self.layers}
        width = self.proj_dim if self.summed else sum(layer.dim for layer in self.layers)
        feats = torch.zeros(out.shape[0], width, device=out.device, dtype=torch.float32)
        offsets, lo = {}, 0
        for layer in self.layers:
            offsets[layer.name] = lo
            lo += 0 if self.summed else layer.dim
        self._combine(feats, [(plans[la.name], terms) for la, terms in records if plans[la.name].dim], offsets)
        return feats

    def _combine(self, feats: torch.Tensor, records: list[tuple[LayerPlan, list[Term]]], offsets: dict,
                 scale: float = 1.0) -> None:
        """Add `scale` times the records' feature blocks into `feats` (B, width) (the capture passes the loss scale)."""
        raise NotImplementedError

    def _dense_fallback(self, batch: Any) -> torch.Tensor:
        if self._fallback_grads is None:
            self._fallback_grads = PerExampleGradients(self.module, self.output_fn, self.fallback.param_names)
            exact = self.fallback.dim >= self.fallback.numel and not self.summed
            self._fallback_proj = RandomProjector(self.fallback.numel, self.fallback.dim,
                                                  "identity" if exact else self.kind,
                                                  seed=derive_seed(self.seed, "fallback"), device=self.device)
        return self._fallback_proj(self._fallback_grads(batch))

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._mats:
            self._mats[key] = make()
        return self._mats[key]


class KroneckerProjector(HookedProjector):
    """Features vec(P_out^T G P_in) per layer, side by side (see the module docstring for the plan of proj_dim).

    Args: module, output_fn, param_names (default: all trainable), proj_dim, seed; allocation "equal" | "params";
    kind "rademacher" | "gaussian" (factor entries); device (default: the parameters'); accept: veto of layers.
    """

    sketch = "kronecker"
    summed = False

    def __init__(self, module, output_fn, param_names=None, proj_dim: int = 2048, seed: int = 0,
                 allocation: str = "equal", kind: str = "rademacher", device=None, accept=None):
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        self.allocation = allocation
        super().__init__(module, output_fn, param_names, proj_dim, seed, device, accept, kind)

    def _plan(self) -> None:
        blocks: list[Any] = list(self.layers) + ([self.fallback] if self.fallback.numel else [])
        caps = [b.numel for b in blocks]
        weights = [1.0 if self.allocation == "equal" else float(b.numel) for b in blocks]
        shares = water_fill(self.requested_dim, caps, weights)
        deficit = 0
        for layer, share in zip(self.layers, shares):
            layer.k_out, layer.out_identity, layer.k_in, layer.in_identity, layer.dim = plan_layer(
                layer.d_out, layer.d_in, share, exact=False)
            deficit += share - layer.dim
        if self.fallback.numel:
            self.fallback.dim = shares[-1]
            take = min(deficit, self.fallback.numel - self.fallback.dim)
            self.fallback.dim += take
            deficit -= take
        for layer in sorted(self.layers, key=lambda la: la.out_identity or la.in_identity):
            if deficit <= 0:
                break
            before = layer.dim
            layer.k_out, layer.out_identity, layer.k_in, layer.in_identity, layer.dim = plan_layer(
                layer.d_out, layer.d_in, min(layer.numel, before + deficit), exact=True)
            deficit -= layer.dim - before
        for layer in self.layers:
            layer.scale = math.sqrt(layer.k_out * layer.k_in / layer.dim) if layer.dim else 1.0
        self.proj_dim = sum(layer.dim for layer in self.layers) + self.fallback.dim

    def factor(self, layer: LayerPlan, side: str, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None) -> torch.Tensor | None:
        """P_in (d_in x k_in) or P_out (d_out x k_out) of `layer`; None for an identity side."""
        device = self.device if device is None else device

        def make():
            d, k, ident = ((layer.d_in, layer.k_in, layer.in_identity) if side == "in"
                           else (layer.d_out, layer.k_out, layer.out_identity))
            if ident:
                return None
            mat = RandomProjector(d, k, self.kind, seed=derive_seed(self.seed, layer.name, side)).matrix()
            return mat.to(device, dtype)
        return self._cached((layer.name, side, dtype, device), make)

    def layer_matrix(self, layer: LayerPlan, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The explicit (d_out * d_in, dim) matrix of a layer on the row-major flattened G (tests, tiny layers)."""
        p_out = self.factor(layer, "out", dtype)
        p_in = self.factor(layer, "in", dtype)
        p_out = torch.eye(layer.d_out, dtype=dtype, device=self.device) if p_out is None else p_out
        p_in = torch.eye(layer.d_in, dtype=dtype, device=self.device) if p_in is None else p_in
        return torch.kron(p_out, p_in)[:, :layer.dim] * layer.scale

    def _combine(self, feats, records, offsets, scale=1.0):
        n = feats.shape[0]
        for layer, terms in records:
            block = 0
            for term in terms:
                dt, dev = term.dtype, term.device
                p_out, p_in = self.factor(layer, "out", dt, dev), self.factor(layer, "in", dt, dev)
                d_proj = term.out_dense(layer.d_out) if p_out is None else term.out_times(p_out)
                a_proj = term.in_times(p_in)
                if a_proj.shape[-1] < d_proj.shape[-1]:   # the bmm with the wider output rows (2-3x faster when narrow)
                    outer = torch.bmm(a_proj.transpose(1, 2), d_proj).transpose(1, 2)
                else:
                    outer = torch.bmm(d_proj.transpose(1, 2), a_proj)
                block = block + outer.reshape(n, -1)
            start = offsets[layer.name]
            feats[:, start:start + layer.dim].add_(block[:, :layer.dim], alpha=layer.scale * scale)


class TensorSketchProjector(HookedProjector):
    """Features = one count sketch of the whole gradient (see the module docstring): every layer sketched to the full
    width proj_dim by FFT of its sides' count sketches, plus the rest's dense projection, summed."""

    sketch = "tensor"
    summed = True

    def __init__(self, module, output_fn, param_names=None, proj_dim: int = 2048, seed: int = 0, device=None,
                 accept=None, kind: str = "rademacher"):
        super().__init__(module, output_fn, param_names, proj_dim, seed, device, accept, kind)

    def _plan(self) -> None:
        k = self.requested_dim
        for layer in self.layers:
            layer.k_out = layer.k_in = layer.dim = k
            layer.tensor_sketch, layer.scale = True, 1.0
        self.fallback.dim = k if self.fallback.numel else 0
        self.proj_dim = k

    def count_sketch(self, layer: LayerPlan, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(buckets in [0, s), signs +-1) of a layer's side, from (seed, layer name, side)."""
        d = layer.d_in if side == "in" else layer.d_out
        gen = torch.Generator().manual_seed(derive_seed(self.seed, layer.name, side, "tensor"))
        buckets = torch.randint(0, layer.dim, (d,), generator=gen)
        signs = torch.randint(0, 2, (d,), generator=gen).float().mul_(2).sub_(1)
        return buckets, signs

    def _pair_hash(self, layer: LayerPlan, dtype: torch.dtype, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket (h_out(o) + h_in(i)) mod s and sign s_out(o) s_in(i) of every (o, i), row-major like vec(G)."""
        def make():
            h_out, s_out = self.count_sketch(layer, "out")
            h_in, s_in = self.count_sketch(layer, "in")
            buckets = ((h_out[:, None] + h_in[None, :]) % layer.dim).reshape(-1)
            return buckets.to(device), (s_out[:, None] * s_in[None, :]).reshape(-1).to(device, dtype)
        return self._cached((layer.name, "pairs", dtype, device), make)

    def layer_matrix(self, layer: LayerPlan, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The explicit (d_out * d_in, dim) count-sketch matrix of a layer on the row-major flattened G."""
        buckets, signs = self._pair_hash(layer, dtype, self.device)
        mat = torch.zeros(layer.numel, layer.dim, dtype=dtype, device=self.device)
        mat[torch.arange(layer.numel, device=self.device), buckets] = signs
        return mat

    def _side(self, layer: LayerPlan, side: str, dtype: torch.dtype, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
        def make():
            buckets, signs = self.count_sketch(layer, side)
            return buckets.to(device), signs.to(device, dtype)
        return self._cached((layer.name, side, "cs", dtype, device), make)

    def _sketch_rows(self, x: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor, s: int) -> torch.Tensor:
        """Count sketch of (..., d) rows -> (..., s) (a scatter-add, no d x s matrix)."""
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_zeros(flat.shape[0], s).scatter_add_(1, buckets.expand(flat.shape[0], -1), flat * signs)
        return out.reshape(*x.shape[:-1], s)

    def _sketch_out(self, layer: LayerPlan, term: Term) -> torch.Tensor:
        """(B, T, s): C_out D_t (a one-hot row's sketch is one signed bucket; a row block uses its rows' hashes)."""
        buckets, signs = self._side(layer, "out", term.dtype, term.device)
        s = layer.dim
        if term.index is not None:
            idx = term.index.clamp_min(0)
            val = signs[idx] * (term.index >= 0).to(signs.dtype)
            return term.a.new_zeros(*idx.shape, s).scatter_(-1, buckets[idx][..., None], val[..., None])
        rows = slice(term.row0, term.row0 + term.d.shape[-1])
        return self._sketch_rows(term.d, buckets[rows], signs[rows], s)

    @staticmethod
    def _via_gradient(layer: LayerPlan, positions: int) -> bool:
        """Form the per-example gradient (T * d_out * d_in flops, then a scatter of d_out * d_in) instead of
        sketching every position and its FFT (T * (d_in + d_out + 2 s log s)): cheaper for convolutions with
        many positions and few channels, and for small layers; the result is the same count sketch."""
        s_log_s = layer.dim * max(1.0, math.log2(layer.dim))
        fft = positions * (layer.d_in + layer.d_out + 2 * s_log_s) + s_log_s
        return (positions + 4) * layer.d_out * layer.d_in <= fft

    def _scatter_one_hot(self, layer: LayerPlan, term: Term) -> torch.Tensor:
        """(B, s) sketch of sum_t e_{index_t} A_t^T: the circular convolution of a one-hot row's signed bucket with
        C_in A_t is C_in A_t shifted by h_out(index_t), so it is one scatter of B * T * d_in values (no FFT)."""
        b_out, s_out = self._side(layer, "out", term.dtype, term.device)
        b_in, s_in = self._side(layer, "in", term.dtype, term.device)
        idx = term.index.clamp_min(0)
        sign = s_out[idx] * (term.index >= 0).to(s_out.dtype)                       # (B, T)
        buckets = (b_out[idx][..., None] + b_in) % layer.dim                         # (B, T, d_in)
        vals = term.a * sign[..., None] * s_in
        n = term.a.shape[0]
        return vals.new_zeros(n, layer.dim).scatter_add_(1, buckets.reshape(n, -1), vals.reshape(n, -1))

    def _pair_hash_block(self, layer: LayerPlan, rows: slice, cols: slice | torch.Tensor, dtype: torch.dtype,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair hash of G[rows, cols] in `Term.gradient_blocks`' transposed (col, row) order, flattened (cached
        for a slice of columns; gathered from the cached transposed hash for an index tensor)."""
        def transposed():
            buckets, signs = self._pair_hash(layer, dtype, device)
            return (buckets.view(layer.d_out, layer.d_in).t().contiguous(),
                    signs.view(layer.d_out, layer.d_in).t().contiguous())
        def pick():
            b_t, s_t = self._cached((layer.name, "pairs-t", dtype, device), transposed)
            return b_t[cols, rows].reshape(-1), s_t[cols, rows].reshape(-1)
        if isinstance(cols, torch.Tensor):   # a convolution's kernel-row columns: a small gather per call
            return pick()
        return self._cached((layer.name, "pairs", rows.start, rows.stop, cols.start, cols.stop, cols.step, dtype,
                             device), pick)

    def _scatter_gradient(self, layer: LayerPlan, term: Term, out: torch.Tensor, scale: float) -> None:
        """out (B, s) += scale * count sketch of this term's per-example gradient, formed block by block
        (`Term.gradient_blocks`) and added with the pair hash (index_add_: ~1.5x a scatter_add_ here)."""
        rows = slice(term.row0, term.row0 + term.d.shape[-1])
        for cols, block in term.gradient_blocks():
            buckets, signs = self._pair_hash_block(layer, rows, cols, block.dtype, block.device)
            # the scale goes into the signs: index_add_ with alpha != 1 takes a ~30x slower path on CPU
            vals = block.mul_((signs if scale == 1.0 else signs * scale).view(block.shape[1:])).reshape(block.shape[0], -1)
            if out.dtype == vals.dtype:
                out.index_add_(1, buckets, vals)
            else:
                out.add_(vals.new_zeros(out.shape).index_add_(1, buckets, vals).to(out.dtype))

    def add_rank_one(self, layer: LayerPlan, out: torch.Tensor, d: torch.Tensor, a: torch.Tensor,
                     spectrum: torch.Tensor | None = None) -> None:
        """out (B, s) += the count sketches of rank-one gradients d_b a_b^T (d: (B, d_out), a: (B, d_in)): formed and
        scattered where that is cheaper (`_via_gradient` at one position: small layers, e.g. a classifier head),
        else by FFT of the sides' sketches, added into `spectrum` (B, s // 2 + 1) when given (the caller inverts
        the sum of several layers once) or inverted here."""
        s = layer.dim
        if type(self)._via_gradient(layer, 1):
            buckets, signs = self._pair_hash(layer, d.dtype, d.device)
            g = (d[:, :, None] * a[:, None, :]).reshape(d.shape[0], -1).mul_(signs)
            if out.dtype == g.dtype:
                out.index_add_(1, buckets, g)
            else:
                out.add_(g.new_zeros(out.shape).index_add_(1, buckets, g).to(out.dtype))
            return
        b_out, s_out = self._side(layer, "out", d.dtype, d.device)
        b_in, s_in = self._side(layer, "in", a.dtype, a.device)
        spec = torch.fft.rfft(self._sketch_rows(d, b_out, s_out, s), dim=1) * torch.fft.rfft(
            self._sketch_rows(a, b_in, s_in, s), dim=1)
        if spectrum is not None:
            spectrum.add_(spec)
        else:
            out += torch.fft.irfft(spec, n=s, dim=1).to(out.dtype)

    def _combine(self, feats, records, offsets, scale=1.0):
        spectrum = None   # FFT-path layers: spectra add up, one inverse FFT at the end
        for layer, terms in records:
            for term in terms:
                if term.index is not None:   # one-hot rows (embeddings): their sketch is one signed bucket
                    feats.add_(self._scatter_one_hot(layer, term).float(), alpha=scale)
                    continue
                if type(self)._via_gradient(layer, term.positions):
                    self._scatter_gradient(layer, term, feats, scale)
                    continue
                b_in, s_in = self._side(layer, "in", term.dtype, term.device)
                spec = (torch.fft.rfft(self._sketch_out(layer, term), dim=2)
                        * torch.fft.rfft(self._sketch_rows(term.a, b_in, s_in, layer.dim), dim=2)).sum(dim=1)
                spectrum = spec if spectrum is None else spectrum.add_(spec)
        if spectrum is not None:
            feats.add_(torch.fft.irfft(spectrum, n=self.proj_dim, dim=1).float(), alpha=scale)


class ExactGradients:
    """(B, p) full per-example gradients (`projector="identity"`), flattened in `param_names` order like
    `PerExampleGradients`: hooked layers from the engine's terms (one batched backward, no vmap), the rest via
    torch.func."""

    def __init__(self, module: nn.Module, output_fn: Callable, param_names: Iterable[str] | None = None,
                 device: str | torch.device | None = None):
        self.module, self.output_fn = module, output_fn
        self.param_names = list(param_names) if param_names is not None else select_parameters(module)
        self.engine = LayerEngine(module, self.param_names)
        params = dict(module.named_parameters())
        self.offsets, lo = {}, 0
        for n in self.param_names:
            self.offsets[n] = (lo, params[n].numel())
            lo += params[n].numel()
        self.proj_dim = self.num_params = lo
        self.layout = {"projector": "identity", "num_params": lo, "hooked": [la.name for la in self.engine.layers],
                       "rest": list(self.engine.rest)}
        self.layout_hash = hashlib.sha1(json.dumps(self.layout, sort_keys=True).encode()).hexdigest()
        self._rest = PerExampleGradients(module, output_fn, self.engine.rest) if self.engine.rest else None

    def __call__(self, batch: Any) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            out, records = self.engine.run(self.output_fn, batch) if self.engine.layers else (None, [])
            rest = self._rest(batch) if self._rest is not None else None
        finally:
            self.module.train(was_training)
        n = out.shape[0] if out is not None else rest.shape[0]
        device = out.device if out is not None else rest.device
        feats = torch.zeros(n, self.num_params, dtype=torch.float32, device=device)
        written = set()
        for layer, terms in records:
            G = terms[0].gradient(layer.d_out)
            for t in terms[1:]:
                G = G + t.gradient(layer.d_out)
            for name, part in zip(layer.param_names, layer.from_matrix(G)):
                lo, k = self.offsets[name]
                view = feats[:, lo:lo + k].unflatten(1, part.shape[1:])   # a view: no copy of the block
                view.add_(part) if name in written else view.copy_(part)  # a layer run twice: its terms add up
                written.add(name)
        if rest is not None:
            col = 0
            for name in self.engine.rest:
                lo, k = self.offsets[name]
                feats[:, lo:lo + k] = rest[:, col:col + k]
                col += k
        return feats


class DenseProjector:
    """`RandomProjector(PerExampleGradients(batch))`: a dense seeded projection of torch.func per-example gradients."""

    def __init__(self, module, output_fn, param_names=None, proj_dim: int = 2048, seed: int = 0, device=None,
                 kind: str = "rademacher"):
        self.grads = PerExampleGradients(module, output_fn, param_names)
        self.projector = RandomProjector(self.grads.num_params, proj_dim, kind, seed, device=device or "cpu")
        self.proj_dim, self.layout = self.projector.proj_dim, self.projector.settings
        self.layout_hash = hashlib.sha1(json.dumps(self.layout, sort_keys=True).encode()).hexdigest()

    def __call__(self, batch: Any) -> torch.Tensor:
        return self.projector(self.grads(batch))


PROJECTORS: dict[str, Callable[..., Any]] = {
    "factorized": KroneckerProjector, "kronecker": KroneckerProjector, "tensorsketch": TensorSketchProjector,
}


def make_projector(kind: str, module: nn.Module, output_fn: Callable, param_names: list[str] | None, proj_dim: int,
                   seed: int, device: str | torch.device | None = None) -> Any:
    """The one factory: a callable batch -> (B, k) float32 features, with `.layout_hash` and `.proj_dim`.

    kind: "tensorsketch" | "factorized" (Kronecker) | "identity" (full gradients) from layer hooks (torch.func for the
    rest); "rademacher" | "gaussian": dense projections of torch.func per-example gradients.
    """
    if kind in PROJECTORS:
        return PROJECTORS[kind](module, output_fn, param_names, proj_dim=proj_dim, seed=seed, device=device)
    if kind == "identity":
        return ExactGradients(module, output_fn, param_names, device)
    if kind in DENSE_KINDS:
        return DenseProjector(module, output_fn, param_names, proj_dim, seed, device, kind)
    raise ValueError(f"unknown projector {kind!r}: use one of {sorted(PROJECTORS) + list(DENSE_KINDS)}")

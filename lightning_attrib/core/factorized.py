"""Kronecker-factorized projection of per-example gradients (issue #8): features without per-example gradients.

For a linear map y_t = W a_t + b applied at positions t (one position for plain MLP inputs; sequence
positions; the H'W' output pixels of a convolution, with a_t the unfolded input patch), the per-example
gradient of the scalar output f is

    G = [dW | db] = sum_t delta_t [a_t; 1]^T          (d_out x (d_in + 1)),  delta_t = df / dy_t

and its projection by a Kronecker product P_out (x) P_in never needs G:

    vec(P_out^T G P_in) = vec(sum_t (P_out^T delta_t) (P_in^T [a_t; 1])^T)       (k_out x k_in)

`FactorizedProjector.features(batch)` runs ONE ordinary batched forward of `output_fn(module, batch)` with
forward hooks that project each hooked layer's input a_t on the fly (P_in^T a_t), then one
`torch.autograd.grad` of `output.sum()` w.r.t. the hooked layers' outputs. In eval mode example i's output
depends on example i alone, so the gradient of the sum w.r.t. a layer's output rows of example i is
exactly that example's delta. Parameter `.grad` fields are never touched.

Which parameters are factorized
    `nn.Linear` and `nn.Conv2d` (groups=1, zero padding, numeric padding or "valid") whose weight is
    selected. The layer's bias, when selected too, is folded into the same block as an extra input
    column of ones (the "+1" row of P_in), so it costs nothing extra. Everything else (a bias whose weight
    is not selected, norms, embeddings, tied or unsupported layers) falls back to `PerExampleGradients` +
    a dense seeded `RandomProjector` on those parameters only.

How `proj_dim` is split (recorded in `layout`, and the feature dim is always exactly `proj_dim`, unless
`proj_dim` exceeds the number of selected parameters: then every block is kept exact, dim = num params)
    1. Blocks (each factorized layer, plus one block for all fallback parameters) get shares of proj_dim
       by water-filling: proportional to a weight (`allocation="equal"`: 1 per block, like LoGra's fixed
       per-layer size; `"params"`: the block's parameter count), capped at the block's parameter count
       (a block that fits whole is kept exactly, and what it does not use goes to the others).
    2. A layer with share s takes k_out ~ k_in ~ sqrt(s). If a side is no larger than sqrt(s) it is kept
       whole (identity, so that side is exact: e.g. the 10 logits of a classifier head) and the other side
       gets s // d. Otherwise both sides are random and the k_out x k_in grid, chosen just >= s, is
       truncated to its first s entries (rescaled by sqrt(k_out k_in / s), which keeps E[P P^T] = I; every
       column of a Kronecker product of two Rademacher/Gaussian matrices is itself unbiased).
    3. The few dims lost by rounding identity-side layers down are handed to the fallback block, else to a
       layer re-planned with random sides, so the total is exact.

Scale: entries of each side are +-1/sqrt(k) (`RandomProjector` conventions), so inner products of the
features estimate inner products of gradients. Note the estimate is a product of two JL estimates (for
one-position inputs G is rank one), so at equal k it is noisier than a dense projection; what it buys is
cost: about one training step per batch, against p*k flops per example for the dense projection.

Tensor sketch (`sketch="tensor"`, the `projector="tensorsketch"` of the pipeline)
    The Kronecker estimate of <G1, G2> for rank-one G = delta a^T is the product of two JL estimates with
    k_out ~ k_in ~ sqrt(k) dims each, so its error is that of a dense projection to about sqrt(k)/2 dims
    (Gram correlation 0.78-0.81 against 0.97 for dense at k = 512 on an MNIST MLP layer). A tensor sketch
    (Pham & Pagh 2013) keeps the same "project each side separately" cost but hashes the pairs (o, i):
    with count sketches C_out (bucket h_out(o), sign s_out(o)) and C_in of width s = the layer's share,

        feature = sum_t circular_convolution(C_out delta_t, C_in [a_t; 1]) = irfft(sum_t rfft(C_out delta_t) * rfft(C_in a_t))

    which is exactly the count sketch of vec(G) with bucket (h_out(o) + h_in(i)) mod s and sign
    s_out(o) s_in(i): unbiased, with a variance close to a dense projection to s dims (Gram correlation 0.96
    in the same test). Cost per position: a scatter of d_in + d_out values and FFTs of length s.
    Every layer is sketched to the full width s = proj_dim and the layers' sketches (and the fallback's dense
    projection) are summed: that is one count sketch of the whole concatenated gradient, so there is no
    split of proj_dim among layers to tune.

Seeds: P_in / P_out of the layer named `name` are `RandomProjector(d, k, kind, seed=h(seed, name, side))`
with h a SHA-1 derived integer, so features depend on (seed, module names and shapes, proj_dim,
allocation) only, never on batch size or device.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gradients import PerExampleGradients, select_parameters
from .outputs import OutputFunction
from .projection import RandomProjector

ALLOCATIONS = ("equal", "params")
FACTOR_KINDS = ("rademacher", "gaussian")
SKETCHES = ("kronecker", "tensor")


def derived_seed(seed: int, *parts: Any) -> int:
    """A stable 60-bit seed from `seed` and names (no Python `hash`, which is salted per process)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


@dataclass
class LayerPlan:
    """How one factorized layer is projected: feature block = vec(P_out^T G P_in)[:dim] * scale."""

    name: str                 # module name
    kind: str                 # "linear" / "conv2d"
    param_names: list[str]    # weight[, bias] (full parameter names)
    d_out: int
    d_in: int                 # input features (for conv: C_in * kh * kw), plus 1 when the bias is folded in
    has_bias: bool
    k_out: int = 0
    k_in: int = 0
    out_identity: bool = False
    in_identity: bool = False
    dim: int = 0
    scale: float = 1.0
    tensor_sketch: bool = False  # count sketches of both sides, combined by circular convolution (FFT)

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in


@dataclass
class _Fallback:
    param_names: list[str] = field(default_factory=list)
    numel: int = 0
    dim: int = 0


def plan_layer(d_out: int, d_in: int, share: int, exact: bool) -> tuple[int, bool, int, bool, int]:
    """(k_out, out_identity, k_in, in_identity, dim) for a d_out x d_in gradient and a share of dims.

    With `exact=False` an identity side may round the dim down to a multiple of it; `exact=True` always
    returns dim == min(share, d_out * d_in).
    """
    cap = d_out * d_in
    if share <= 0:  # proj_dim smaller than the number of blocks: this layer gets nothing
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


def _conv_supported(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and (not isinstance(m.padding, str) or m.padding == "valid")


class FactorizedProjector:
    """Projected per-example gradients of `output_fn` for a batch, (B, proj_dim) float32, via Kronecker factors.

    Drop-in for `RandomProjector(PerExampleGradients(module, output_fn)(batch))` with another (structured)
    random matrix: `features(batch)` (also `__call__`). See the module docstring for the method, how
    `proj_dim` is split (`layout`) and what falls back to dense per-example gradients.

    Args:
        module, output_fn, param_names: as for `PerExampleGradients` (default: all trainable parameters).
        proj_dim: total feature dim (exact unless it exceeds the number of selected parameters).
        seed: seeds every factor and the fallback projection.
        allocation: "equal" (default) or "params": how proj_dim is shared among layers.
        kind: distribution of the random factors, "rademacher" or "gaussian" (Kronecker sketch only).
        sketch: "kronecker" (P_out (x) P_in) or "tensor" (count sketches combined by FFT; see the module docstring).
        device: where factor matrices live (default: the module's parameters' device).
    """

    def __init__(self, module: nn.Module, output_fn: OutputFunction, param_names: Iterable[str] | None = None,
                 proj_dim: int = 2048, seed: int = 0, allocation: str = "equal", kind: str = "rademacher",
                 device: str | torch.device | None = None, sketch: str = "kronecker"):
        if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive integer (e.g. 2048), got {proj_dim!r}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if kind not in FACTOR_KINDS:
            raise ValueError(f"kind must be one of {FACTOR_KINDS}, got {kind!r}")
        if sketch not in SKETCHES:
            raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
        self.sketch = sketch
        self.module, self.output_fn = module, output_fn
        self.param_names = list(param_names) if param_names is not None else select_parameters(module)
        self.requested_dim, self.seed, self.allocation, self.kind = proj_dim, int(seed), allocation, kind
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.layers, self.fallback = self._find_layers()
        self._plan()
        self._modules = dict(module.named_modules())
        self._mats: dict[tuple, torch.Tensor | None] = {}
        self._fallback_grads: PerExampleGradients | None = None
        self._fallback_proj: RandomProjector | None = None

    # -- planning ----------------------------------------------------------------------------------
    def _find_layers(self) -> tuple[list[LayerPlan], _Fallback]:
        selected = set(self.param_names)
        params = dict(self.module.named_parameters())
        uses: dict[int, int] = {}
        for _, p in self.module.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        layers, covered = [], set()
        for name, m in self.module.named_modules():
            prefix = f"{name}." if name else ""
            w_name, b_name = prefix + "weight", prefix + "bias"
            if w_name not in selected or uses.get(id(params[w_name]), 0) != 1:
                continue
            if type(m) is nn.Linear:
                kind, d_out, d_in = "linear", m.out_features, m.in_features
            elif type(m) is nn.Conv2d and _conv_supported(m):
                kind, d_out, d_in = "conv2d", m.out_channels, m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            else:
                continue
            has_bias = m.bias is not None and b_name in selected and uses.get(id(params[b_name]), 0) == 1
            names = [w_name, b_name] if has_bias else [w_name]
            layers.append(LayerPlan(name, kind, names, d_out, d_in + int(has_bias), has_bias))
            covered.update(names)
        rest = [n for n in self.param_names if n not in covered]
        return layers, _Fallback(rest, int(sum(params[n].numel() for n in rest)))

    def _plan(self) -> None:
        if self.sketch == "tensor":
            self._plan_tensor()
            return
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
        # hand rounding losses to layers that can take them exactly, preferring those without identity sides
        for layer in sorted(self.layers, key=lambda la: la.out_identity or la.in_identity):
            if deficit <= 0:
                break
            before = layer.dim
            layer.k_out, layer.out_identity, layer.k_in, layer.in_identity, layer.dim = plan_layer(
                layer.d_out, layer.d_in, min(layer.numel, before + deficit), exact=True)
            deficit -= layer.dim - before
        for layer in self.layers:
            grid = layer.k_out * layer.k_in
            layer.scale = math.sqrt(grid / layer.dim) if layer.dim and not layer.tensor_sketch else 1.0
        self.proj_dim = sum(layer.dim for layer in self.layers) + self.fallback.dim
        self.num_params = sum(layer.numel for layer in self.layers) + self.fallback.numel

    def _plan_tensor(self) -> None:
        """Every layer is tensor-sketched to the full width proj_dim and the sketches are summed (a count sketch of
        the concatenated gradient), the fallback's dense projection too: no split of proj_dim to tune, and the
        variance is that of one sketch of the whole gradient."""
        k = self.requested_dim
        for layer in self.layers:
            layer.k_out = layer.k_in = layer.dim = k
            layer.tensor_sketch, layer.scale = True, 1.0
        self.fallback.dim = k if self.fallback.numel else 0
        self.proj_dim = k
        self.num_params = sum(layer.numel for layer in self.layers) + self.fallback.numel

    @property
    def summed(self) -> bool:
        """True when all blocks share the same proj_dim columns (tensor sketch), False when they are side by side."""
        return self.sketch == "tensor"

    @property
    def layout(self) -> dict:
        """Everything the features depend on besides the weights: JSON-able, recorded in store settings."""
        return {"projector": "factorized", "proj_dim": self.proj_dim, "requested_dim": self.requested_dim,
                "seed": self.seed, "allocation": self.allocation, "kind": self.kind, "sketch": self.sketch,
                "layers": [asdict(layer) for layer in self.layers],
                "fallback": {"params": self.fallback.param_names, "numel": self.fallback.numel,
                             "dim": self.fallback.dim}}

    @property
    def layout_hash(self) -> str:
        return hashlib.sha1(json.dumps(self.layout, sort_keys=True).encode()).hexdigest()

    # -- factor matrices -----------------------------------------------------------------------------
    def factor(self, layer: LayerPlan, side: str, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None) -> torch.Tensor | None:
        """P_in (d_in x k_in) or P_out (d_out x k_out) of a Kronecker `layer`; None for an identity side.
        (A tensor-sketched layer has count sketches instead: `count_sketch`.)"""
        if layer.tensor_sketch:
            raise ValueError(f"layer {layer.name!r} is tensor-sketched: it has count sketches, not factor matrices")
        device = self.device if device is None else device
        key = (layer.name, side, dtype, device)
        if key not in self._mats:
            d, k, ident = ((layer.d_in, layer.k_in, layer.in_identity) if side == "in"
                           else (layer.d_out, layer.k_out, layer.out_identity))
            if ident:
                self._mats[key] = None
            else:
                mat = RandomProjector(d, k, self.kind, seed=derived_seed(self.seed, layer.name, side)).matrix()
                self._mats[key] = mat.to(device, dtype)
        return self._mats[key]

    def count_sketch(self, layer: LayerPlan, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(buckets in [0, s), signs +-1) of a tensor-sketched layer's side, from (seed, layer name, side)."""
        d = layer.d_in if side == "in" else layer.d_out
        gen = torch.Generator().manual_seed(derived_seed(self.seed, layer.name, side, "tensor"))
        buckets = torch.randint(0, layer.dim, (d,), generator=gen)
        signs = torch.randint(0, 2, (d,), generator=gen).float().mul_(2).sub_(1)
        return buckets, signs

    def layer_matrix(self, layer: LayerPlan, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The explicit (d_out * d_in, dim) matrix of a layer on the row-major flattened G (tests, tiny layers)."""
        if layer.tensor_sketch:  # count sketch of vec(G) with the pair hash
            buckets, signs = self._pair_hash(layer, dtype, self.device)
            mat = torch.zeros(layer.numel, layer.dim, dtype=dtype, device=self.device)
            mat[torch.arange(layer.numel, device=self.device), buckets] = signs
            return mat
        p_out = self.factor(layer, "out", dtype)
        p_in = self.factor(layer, "in", dtype)
        p_out = torch.eye(layer.d_out, dtype=dtype, device=self.device) if p_out is None else p_out
        p_in = torch.eye(layer.d_in, dtype=dtype, device=self.device) if p_in is None else p_in
        return torch.kron(p_out, p_in)[:, :layer.dim] * layer.scale

    # -- features ------------------------------------------------------------------------------------
    def __call__(self, batch: Any) -> torch.Tensor:
        return self.features(batch)

    def features(self, batch: Any) -> torch.Tensor:
        """(B, proj_dim) float32 projected per-example gradients of `output_fn` for `batch` (on the module's device)."""
        was_training = self.module.training
        self.module.eval()
        try:
            feats = self._factorized(batch) if self.layers else None
            if self.fallback.dim:
                dense = self._dense_fallback(batch)
                feats = dense if feats is None else (feats + dense if self.summed else torch.cat([feats, dense], dim=1))
        finally:
            self.module.train(was_training)
        return feats.float()

    def _add_hooks(self, records: list[list]) -> list:
        """Forward hooks on every factorized layer; each call appends `[layer, projected input, output, None]` to
        `records` (`_factorized` fills the last slot, delta, from `torch.autograd.grad`). Returns the handles."""
        def make_hook(layer: LayerPlan):
            def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                records.append([layer, self._project_input(layer, mod, inputs[0]), output, None])
                # Return a copy so an in-place op downstream (ReLU(inplace=True)) cannot rewrite `output`,
                # whose gradient we take.
                return output.clone()
            return hook

        return [self._modules[layer.name].register_forward_hook(make_hook(layer)) for layer in self.layers if layer.dim]

    def _combine(self, records: list[list], n: int, device: torch.device | None = None) -> torch.Tensor:
        """(n, sum of layer dims) float32 features from filled records (a layer called twice sums its terms).

        A layer with no record or no gradient (not on the output's path) gets zeros.
        """
        width = self.proj_dim if self.summed else sum(layer.dim for layer in self.layers)
        out = torch.zeros(n, width, device=device, dtype=torch.float32)
        offsets, lo = {}, 0
        for layer in self.layers:
            offsets[layer.name] = lo
            lo += 0 if self.summed else layer.dim
        spectrum = None  # tensor-sketched layers on the FFT path: their spectra add up, one inverse FFT at the end
        for layer, a_proj, _, delta in records:
            if delta is None:
                continue
            if layer.tensor_sketch:
                delta = self._positions(layer, delta)
                if a_proj.is_complex():
                    spec = torch.fft.rfft(self._sketch_side(layer, "out", delta), dim=2).mul_(a_proj).sum(dim=1)
                    spectrum = spec if spectrum is None else spectrum.add_(spec)
                    continue
                block = self._gradient_sketch(layer, a_proj, delta)
            else:
                d_proj = self._project_delta(layer, delta) * layer.scale      # (B, T, k_out), small
                block = torch.einsum("bto,bti->boi", d_proj, a_proj).reshape(n, -1)
            start = offsets[layer.name]
            out[:, start:start + layer.dim] += block[:, :layer.dim]
        if spectrum is not None:
            out += torch.fft.irfft(spectrum, n=self.proj_dim, dim=1)
        return out

    def _factorized(self, batch: Any) -> torch.Tensor:
        records: list[list] = []
        handles = self._add_hooks(records)
        try:
            with torch.enable_grad():
                out = self.output_fn(self.module, batch)
                if out.dim() != 1:
                    raise ValueError(f"output_fn must return one scalar per example (shape (B,)), got {tuple(out.shape)}")
                live = [r for r in records if r[2].requires_grad]
                deltas = torch.autograd.grad(out.sum(), [r[2] for r in live], allow_unused=True) if live else []
        finally:
            for h in handles:
                h.remove()
        for rec, delta in zip(live, deltas):
            rec[3] = delta
        return self._combine(live, out.shape[0], out.device)

    def _project_input(self, layer: LayerPlan, mod: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """(B, T, k_in): P_in^T [a_t; 1] for every position t, computed in the forward hook.

        Tensor sketch: rfft of the count sketch of [a_t; 1], (B, T, s//2+1) complex; or, where forming the
        per-example gradient is cheaper (see `_via_gradient`), [a_t; 1] itself, (B, T, d_in) real.
        """
        a = a.detach()
        if layer.kind == "conv2d":
            a = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=0 if mod.padding == "valid" else mod.padding,
                         stride=mod.stride).transpose(1, 2)          # (B, L, C_in*kh*kw)
        else:
            a = a.reshape(a.shape[0], -1, a.shape[-1])                   # (B, T, d_in)
        if layer.tensor_sketch:
            if layer.has_bias:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            if self._via_gradient(layer, a.shape[1]):
                return a
            return torch.fft.rfft(self._sketch_side(layer, "in", a), dim=2)
        p_in = self.factor(layer, "in", a.dtype, a.device)
        if p_in is None:
            return torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2) if layer.has_bias else a
        if layer.has_bias:
            return a @ p_in[:-1] + p_in[-1]
        return a @ p_in

    @staticmethod
    def _positions(layer: LayerPlan, delta: torch.Tensor) -> torch.Tensor:
        """The layer's output gradient as (B, T, d_out): one row per position t."""
        if layer.kind == "conv2d":
            return delta.flatten(2).transpose(1, 2)                      # (B, H'W', C_out)
        return delta.reshape(delta.shape[0], -1, delta.shape[-1])

    def _project_delta(self, layer: LayerPlan, delta: torch.Tensor) -> torch.Tensor:
        """(B, T, k_out): P_out^T delta_t for every position t."""
        delta = self._positions(layer, delta)
        p_out = self.factor(layer, "out", delta.dtype, delta.device)
        return delta if p_out is None else delta @ p_out

    # -- tensor sketch ---------------------------------------------------------------------------------
    @staticmethod
    def _via_gradient(layer: LayerPlan, positions: int) -> bool:
        """Form the per-example gradient (T * d_out * d_in flops, then a scatter of d_out * d_in) instead of
        sketching every position and its FFT (T * (d_in + d_out + 2 s log s)): cheaper for convolutions with
        many positions and few channels, and for small layers; the result is the same count sketch."""
        s_log_s = layer.dim * max(1.0, math.log2(layer.dim))
        fft = positions * (layer.d_in + layer.d_out + 2 * s_log_s) + s_log_s
        return (positions + 4) * layer.d_out * layer.d_in <= fft

    def _hash(self, key: tuple, make) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._mats:
            self._mats[key] = make()
        return self._mats[key]

    def _sketch_side(self, layer: LayerPlan, side: str, x: torch.Tensor) -> torch.Tensor:
        """Count sketch C_side x of (..., d) rows -> (..., s) (a scatter-add, no d x s matrix)."""
        def make():
            buckets, signs = self.count_sketch(layer, side)
            return buckets.to(x.device), signs.to(x.device, x.dtype)
        buckets, signs = self._hash((layer.name, side, "cs", x.dtype, x.device), make)
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_zeros(flat.shape[0], layer.dim).scatter_add_(1, buckets.expand(flat.shape[0], -1), flat * signs)
        return out.reshape(*x.shape[:-1], layer.dim)

    def _pair_hash(self, layer: LayerPlan, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket (h_out(o) + h_in(i)) mod s and sign s_out(o) s_in(i) of every (o, i), row-major like vec(G)."""
        def make():
            h_out, s_out = self.count_sketch(layer, "out")
            h_in, s_in = self.count_sketch(layer, "in")
            buckets = ((h_out[:, None] + h_in[None, :]) % layer.dim).reshape(-1)
            return buckets.to(device), (s_out[:, None] * s_in[None, :]).reshape(-1).to(device, dtype)
        return self._hash((layer.name, "pairs", dtype, device), make)

    def _gradient_sketch(self, layer: LayerPlan, a_rec: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """(B, s) tensor sketch of G = sum_t delta_t [a_t; 1]^T formed explicitly from (B, T, d_in) inputs and
        (B, T, d_out) deltas, scattered with the pair hash (the FFT path's result, computed the other way)."""
        g = torch.einsum("bto,bti->boi", delta, a_rec).reshape(delta.shape[0], -1)
        buckets, signs = self._pair_hash(layer, g.dtype, g.device)
        return g.new_zeros(g.shape[0], layer.dim).scatter_add_(1, buckets.expand(g.shape[0], -1), g * signs)

    def _dense_fallback(self, batch: Any) -> torch.Tensor:
        if self._fallback_grads is None:
            self._fallback_grads = PerExampleGradients(self.module, self.output_fn, self.fallback.param_names)
            exact = self.fallback.dim >= self.fallback.numel and not self.summed
            self._fallback_proj = RandomProjector(self.fallback.numel, self.fallback.dim,
                                                  "identity" if exact else self.kind,
                                                  seed=derived_seed(self.seed, "fallback"), device=self.device)
        return self._fallback_proj(self._fallback_grads(batch))

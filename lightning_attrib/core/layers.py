"""The layer engine: which layers' per-example gradients factor, their hooks, and their (input, output-grad) factors.

For every supported layer the per-example gradient of a scalar output f, arranged as a `d_out x d_in` matrix G
(the layer's `to_matrix` layout: e.g. `[dW | db]` for a Linear, the bias as an input column of ones), is

    G = sum_t  D_t A_t^T         (t: positions: sequence tokens, conv output pixels, or one)

with A_t the layer's input at position t (an unfolded patch for a convolution) and D_t = df/d(output_t) the output
gradient. `LayerEngine.run(output_fn, batch)` runs ONE batched forward with forward hooks that keep each layer's
input (and patch `nn.MultiheadAttention.forward` so its packed projections become hookable), ONE backward of
`output.sum()` to the hooked outputs (in eval mode example i's output depends on example i only, so that gradient
restricted to example i's rows is its D), and returns per layer a list of `Term`s: (A, D) pairs from which the
projectors (`core/sketch.py`), EK-FAC (`methods/ekfac.py`) and the in-training capture build what they need.
Parameter `.grad` fields are never touched.

Layer kinds (one isinstance rule each; anchor: opacus's per-sample-gradient layers):

* "linear":    nn.Linear (any leading dims).  HF GPT-2 `Conv1D` ("hf_conv1d": y = x W + b, W stored d_in x d_out).
* "conv1d" / "conv2d": nn.Conv1d / nn.Conv2d with groups=1, every padding mode and numeric / "same" / "valid"
               padding (the input is padded once with F.pad as the layer does; `ConvTerm` unfolds it only when
               `a` is read: P_in^T A is a convolution, the per-example gradient a width-unfold + one bmm per
               kernel row).
* "embedding": nn.Embedding (not scale_grad_by_freq): sparse, D_t is the one-hot row of token t (`Term.index`),
               A_t the output gradient; tokens equal to padding_idx get no gradient (index -1).
* "norm":      the affine parameters of LayerNorm / GroupNorm / BatchNorm1d/2d/3d (running stats) / RMSNorm: the
               per-example gradient g = [sum delta * xhat ; sum delta] is formed directly (a few numbers per
               channel) and given as D = g, A = 1 (d_in = 1, one position).
* "mha":       nn.MultiheadAttention's packed in-projection (in_proj_weight, in_proj_bias) with one embed dim, no
               bias_k/bias_v, no add_zero_attn. F.multi_head_attention_forward uses in_proj_weight and
               out_proj.weight directly, so during a recording the engine swaps the module's forward for an
               equivalent one that calls F.linear on the packed weight (recorded) and `out_proj` as a module (whose
               own Linear hook then fires), as opacus's DPMultiheadAttention does. Padding masks, attention masks and
               is_causal are honoured. With grad enabled the stock TransformerEncoder(Layer) takes its slow path
               (no fast path, no nested tensors), so the patched forward is always the one that runs.

A weight used by two modules (tied) or not selected leaves its layer out; a bias without its weight, and every
parameter of any other module, is "rest": the projectors send it through `torch.func` per-example gradients
(`core/gradients.py`), EK-FAC refuses it. An MHA that cannot be patched leaves its `out_proj` to the rest too
(its hook would never fire).

Batch dim: dim 0, except inside a `nn.Transformer*Layer` built with batch_first=False (dim 1); checked per call.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
SUPPORTED = ("nn.Linear", "nn.Conv1d/Conv2d (groups=1)", "nn.Embedding", "LayerNorm/GroupNorm/BatchNorm/RMSNorm affine",
             "nn.MultiheadAttention (packed in-projection)", "HF Conv1D")


@dataclass
class Term:
    """One (A, D) pair of a layer: G += sum_t D_t A_t^T, D placed at rows [row0, row0 + D.shape[-1]) of G.

    `a`: (B, T, d_in) inputs (a trailing 1 when the bias is in the block). Either `d`: (B, T, rows) output gradients,
    or `index`: (B, T) long, D_t the one-hot row index[b, t] of G (embeddings); index -1 contributes nothing.
    """

    a: torch.Tensor
    d: torch.Tensor | None = None
    index: torch.Tensor | None = None
    row0: int = 0

    @property
    def n(self) -> int:
        """Examples in the batch."""
        return self.a.shape[0]

    @property
    def positions(self) -> int:
        return self.a.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def to(self, dtype: torch.dtype) -> "Term":
        return Term(self.a.to(dtype), None if self.d is None else self.d.to(dtype), self.index, self.row0)

    def in_times(self, mat: torch.Tensor | None) -> torch.Tensor:
        """(B, T, k) = A_t^T mat for a (d_in, k) matrix (`a` itself for None: an identity side)."""
        return self.a if mat is None else self.a @ mat

    def gradient_blocks(self) -> list[tuple[slice | torch.Tensor, torch.Tensor]]:
        """This term's part of G^T in column blocks: [(cols, block (B, ncols, rows))] with
        G[b, row0 + r, cols][j] = block[b, j, r]; cols a slice or a LongTensor of columns (D terms only; `rows` =
        d.shape[-1]). Blocks are fresh tensors: the caller may scale them in place. One bmm here."""
        return [(slice(0, self.a.shape[-1]), torch.bmm(self.a.transpose(1, 2), self.d))]

    def out_times(self, mat: torch.Tensor) -> torch.Tensor:
        """(B, T, k) = D_t^T mat[rows] for a (d_out, k) matrix: a gather for one-hot rows, a matmul otherwise."""
        if self.index is not None:
            valid = (self.index >= 0).to(mat.dtype)
            return mat[self.index.clamp_min(0)] * valid[..., None]
        return self.d @ mat[self.row0:self.row0 + self.d.shape[-1]]

    def out_dense(self, d_out: int) -> torch.Tensor:
        """(B, T, d_out) D_t as dense rows of G."""
        if self.index is not None:
            dense = F.one_hot(self.index.clamp_min(0), d_out).to(self.a.dtype)
            return dense * (self.index >= 0).to(self.a.dtype)[..., None]
        if self.row0 == 0 and self.d.shape[-1] == d_out:
            return self.d
        out = self.d.new_zeros(*self.d.shape[:-1], d_out)
        out[..., self.row0:self.row0 + self.d.shape[-1]] = self.d
        return out

    def gradient(self, d_out: int) -> torch.Tensor:
        """(B, d_out, d_in): this term's part of the per-example gradient G."""
        return torch.einsum("bto,bti->boi", self.out_dense(d_out), self.a)


class ConvTerm(Term):
    """A convolution's term from its (padded) input: `a`, the unfolded patches (B, T, d_in), is formed only when read.
    The projectors' hot paths avoid it: `in_times` is a convolution with the matrix as its kernel, and
    `gradient_blocks` (stride 1) unfolds along the width only and takes one bmm per kernel row (about 2x faster
    than unfold + bmm for 32 channels)."""

    def __init__(self, x: torch.Tensor, module: nn.Module, bias: bool, delta: torch.Tensor):
        # x: (B, C, H, W) padded input (a Conv1d's as (B, C, 1, L)); delta: (B, C_out, H_out, W_out)
        self.x, self.delta, self.bias, self.index, self.row0 = x, delta, bias, None, 0
        conv1d = isinstance(module, nn.Conv1d)
        self.kernel = (1, module.kernel_size[0]) if conv1d else tuple(module.kernel_size)
        self.dilation = (1, module.dilation[0]) if conv1d else tuple(module.dilation)
        self.stride = (1, module.stride[0]) if conv1d else tuple(module.stride)
        self._a: torch.Tensor | None = None

    @property
    def a(self) -> torch.Tensor:
        if self._a is None:
            u = F.unfold(self.x, self.kernel, dilation=self.dilation, padding=0, stride=self.stride)
            # the bias row of ones appended along the contiguous channel dim, then a transposed view
            u = torch.cat([u, u.new_ones(u.shape[0], 1, u.shape[2])], 1) if self.bias else u
            self._a = u.transpose(1, 2)
        return self._a

    @property
    def d(self) -> torch.Tensor:
        return self.delta.flatten(2).transpose(1, 2)

    def __repr__(self) -> str:
        return f"ConvTerm(x={tuple(self.x.shape)}, delta={tuple(self.delta.shape)}, bias={self.bias})"

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def positions(self) -> int:
        return self.delta.shape[2] * self.delta.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, dtype: torch.dtype) -> "ConvTerm":
        out = ConvTerm.__new__(ConvTerm)
        out.__dict__.update(self.__dict__, x=self.x.to(dtype), delta=self.delta.to(dtype), _a=None)
        return out

    def in_times(self, mat: torch.Tensor | None) -> torch.Tensor:
        """P_in^T A_t at every position as one convolution of the input with P_in as its kernel."""
        if mat is None:
            return self.a
        c = self.x.shape[1]
        k = mat.shape[1]
        weight = mat[:mat.shape[0] - int(self.bias)].t().reshape(k, c, *self.kernel)
        y = F.conv2d(self.x, weight, mat[-1] if self.bias else None, stride=self.stride, dilation=self.dilation)
        return y.flatten(2).transpose(1, 2)

    def gradient_blocks(self) -> list[tuple[slice | torch.Tensor, torch.Tensor]]:
        if self.stride != (1, 1) or self.x.shape[1] * self.kernel[0] * self.kernel[1] < 64:
            return super().gradient_blocks()   # strided, or few patch features: unfold + one bmm is as fast
        # The input unfolded along the width only, x3[b, c, j, h, w] = x[b, c, h, w + j*dw] (kw x the input, not
        # kh * kw x); for kernel row i the windows of every (c, j) are then ONE contiguous run of x3's flattened
        # (h, w), starting at row i*dh, and G[b, o, c, i, j] = sum_{h, w} delta[b, o, h, w] x3[b, c, j, h + i*dh, w]
        # is one bmm over the Ho * Wo positions per kernel row.
        x, delta = self.x, self.delta
        b, c, h, _ = x.shape
        (kh, kw), (dh, dw), (ho, wo) = self.kernel, self.dilation, delta.shape[2:]
        x3 = torch.stack([x[..., j * dw:j * dw + wo] for j in range(kw)], 2).reshape(b, c * kw, h * wo)
        dp = delta.flatten(2).transpose(1, 2)                                     # (B, Ho * Wo, C_out)
        kk, t = kh * kw, ho * wo
        base = (torch.arange(c, device=x.device)[:, None] * kk + torch.arange(kw, device=x.device)).reshape(-1)
        blocks: list[tuple[slice | torch.Tensor, torch.Tensor]] = [
            (base + i * kw, torch.bmm(x3[:, :, i * dh * wo:i * dh * wo + t], dp)) for i in range(kh)]
        if self.bias:
            blocks.append((slice(c * kk, c * kk + 1), delta.sum((2, 3))[:, None, :]))
        return blocks


@dataclass
class Layer:
    """One hooked layer: its parameters (in `to_matrix` layout order), G's shape, and its kind's rules."""

    name: str
    kind: str
    module: nn.Module = field(repr=False)
    param_names: list[str]
    d_out: int
    d_in: int          # columns of G: input features (C_in * prod(kernel) for a conv) + 1 when the bias is folded in
    has_bias: bool
    batch_dim: int = 0

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in

    def to_matrix(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(m, d_out, d_in) G from (m, *param.shape) tensors of `param_names`, e.g. per-example gradients."""
        return KINDS[self.kind].to_matrix(self, tensors)

    def from_matrix(self, G: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of `to_matrix`: (m, d_out, d_in) -> [(m, *param.shape)] per parameter."""
        return KINDS[self.kind].from_matrix(self, G)


# -- kinds ----------------------------------------------------------------------------------------------------------
class LayerKind:
    """How one kind of module is recognized, recorded and turned into `Term`s (subclasses below)."""

    name = "kind"

    @staticmethod
    def match(m: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def describe(cls, name: str, m: nn.Module, usable: Callable[[str], bool]) -> Layer | None:
        """The Layer for module `m` named `name` if its weight is usable (selected, not tied), else None."""
        prefix = f"{name}." if name else ""
        w, b = prefix + "weight", prefix + "bias"
        if not usable(w):
            return None
        has_bias = getattr(m, "bias", None) is not None and usable(b)
        d_out, d_in = cls.shape(m)
        return Layer(name, cls.kind_of(m), m, [w, b] if has_bias else [w], d_out, d_in + int(has_bias), has_bias)

    @staticmethod
    def kind_of(m: nn.Module) -> str:
        raise NotImplementedError

    @staticmethod
    def shape(m: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    @staticmethod
    def record(layer: Layer, m: nn.Module, x: torch.Tensor) -> Any:
        """What the forward hook keeps of the layer's input (detached)."""
        return x.detach()

    @staticmethod
    def terms(layer: Layer, saved: Any, delta: torch.Tensor) -> list[Term]:
        raise NotImplementedError

    @staticmethod
    def to_matrix(layer: Layer, tensors: list[torch.Tensor]) -> torch.Tensor:
        m = tensors[0].shape[0]
        w = tensors[0].reshape(m, layer.d_out, -1)
        return torch.cat([w, tensors[1].reshape(m, layer.d_out, 1)], dim=2) if layer.has_bias else w

    @staticmethod
    def from_matrix(layer: Layer, G: torch.Tensor) -> list[torch.Tensor]:
        shapes = [tuple(p.shape) for p in _params_of(layer)]
        m = G.shape[0]
        if layer.has_bias:
            return [G[:, :, :-1].reshape(m, *shapes[0]), G[:, :, -1].reshape(m, *shapes[1])]
        return [G.reshape(m, *shapes[0])]


def _params_of(layer: Layer) -> list[torch.Tensor]:
    return [getattr(layer.module, n.rsplit(".", 1)[-1]) for n in layer.param_names]


def _rows(x: torch.Tensor, batch_dim: int, width: int) -> torch.Tensor:
    """(B, T, width) positions of a (…, width) tensor whose batch dim is `batch_dim`."""
    if batch_dim:
        x = x.movedim(batch_dim, 0)
    return x.reshape(x.shape[0], -1, width)


def _with_ones(a: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if bias else a


class LinearKind(LayerKind):
    name = "linear"

    @staticmethod
    def match(m):
        return isinstance(m, nn.Linear)

    @staticmethod
    def kind_of(m):
        return "linear"

    @staticmethod
    def shape(m):
        return m.out_features, m.in_features

    @staticmethod
    def terms(layer, saved, delta):
        a = _with_ones(_rows(saved, layer.batch_dim, saved.shape[-1]), layer.has_bias)
        return [Term(a, _rows(delta, layer.batch_dim, delta.shape[-1]))]


class HFConv1DKind(LinearKind):
    """HuggingFace GPT-2 `Conv1D`: y = x @ weight + bias with weight (d_in, d_out) (recognized by name/attributes)."""

    name = "hf_conv1d"

    @staticmethod
    def match(m):
        w = getattr(m, "weight", None)
        return (type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
                and getattr(m, "nf", None) == w.shape[1])

    @staticmethod
    def kind_of(m):
        return "hf_conv1d"

    @staticmethod
    def shape(m):
        return m.weight.shape[1], m.weight.shape[0]

    @staticmethod
    def to_matrix(layer, tensors):
        m = tensors[0].shape[0]
        w = tensors[0].reshape(m, -1, layer.d_out).transpose(1, 2)
        return torch.cat([w, tensors[1].reshape(m, layer.d_out, 1)], dim=2) if layer.has_bias else w

    @staticmethod
    def from_matrix(layer, G):
        m = G.shape[0]
        w = G[:, :, :-1] if layer.has_bias else G
        out = [w.transpose(1, 2).reshape(m, *layer.module.weight.shape)]
        return out + [G[:, :, -1].reshape(m, *layer.module.bias.shape)] if layer.has_bias else out


class ConvKind(LayerKind):
    name = "conv"

    @staticmethod
    def match(m):
        return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1

    @staticmethod
    def kind_of(m):
        return "conv2d" if isinstance(m, nn.Conv2d) else "conv1d"

    @staticmethod
    def shape(m):
        return m.out_channels, m.weight[0].numel()

    @staticmethod
    def record(layer, m, x):
        """The input, padded once like the layer pads (a Conv1d's as (B, C, 1, L)); patches are unfolded only when a
        consumer reads `ConvTerm.a`."""
        x = x.detach()
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        return x.unsqueeze(2) if isinstance(m, nn.Conv1d) else x

    @staticmethod
    def terms(layer, saved, delta):
        if isinstance(layer.module, nn.Conv1d):
            delta = delta.unsqueeze(2)
        return [ConvTerm(saved, layer.module, layer.has_bias, delta)]


class EmbeddingKind(LayerKind):
    name = "embedding"

    @staticmethod
    def match(m):
        return isinstance(m, nn.Embedding) and not m.scale_grad_by_freq

    @staticmethod
    def kind_of(m):
        return "embedding"

    @staticmethod
    def shape(m):
        return m.num_embeddings, m.embedding_dim

    @staticmethod
    def record(layer, m, x):
        idx = x.detach()
        idx = (idx.movedim(layer.batch_dim, 0) if layer.batch_dim else idx).reshape(idx.shape[layer.batch_dim], -1)
        if m.padding_idx is not None:
            idx = idx.masked_fill(idx == m.padding_idx, -1)
        return idx

    @staticmethod
    def terms(layer, saved, delta):
        return [Term(_rows(delta, layer.batch_dim, delta.shape[-1]), index=saved)]


class NormKind(LayerKind):
    """Affine parameters of normalization layers: the per-example gradient is formed directly (D = g, A = 1)."""

    name = "norm"

    @staticmethod
    def match(m):
        if not isinstance(m, _NORMS):
            return False
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            return False   # batch statistics even in eval mode: examples are not independent
        return getattr(m, "weight", None) is not None or getattr(m, "bias", None) is not None

    @staticmethod
    def kind_of(m):
        return "norm"

    @classmethod
    def describe(cls, name, m, usable):
        prefix = f"{name}." if name else ""
        names = [prefix + p for p in ("weight", "bias") if getattr(m, p, None) is not None and usable(prefix + p)]
        if not names:
            return None
        numel = sum(getattr(m, n.rsplit(".", 1)[-1]).numel() for n in names)
        return Layer(name, "norm", m, names, numel, 1, False)

    @staticmethod
    def record(layer, m, x):
        """xhat, the normalized input before the affine map (from the input: no division by the weight)."""
        x = x.detach()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"{layer.name!r}: BatchNorm in training mode normalizes with batch statistics, so its "
                             "examples are not independent; record in eval mode, or leave it out with `accept`")
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)

    @staticmethod
    def terms(layer, saved, delta):
        m = layer.module
        if layer.batch_dim:
            saved, delta = saved.movedim(layer.batch_dim, 0), delta.movedim(layer.batch_dim, 0)
        n = delta.shape[0]
        if isinstance(m, (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())):
            width = math.prod(m.normalized_shape)
            gw = (delta * saved).reshape(n, -1, width).sum(1)
            gb = delta.reshape(n, -1, width).sum(1)
        else:   # channel dim 1
            dims = tuple(range(2, delta.dim()))
            gw = (delta * saved).sum(dims) if dims else delta * saved
            gb = delta.sum(dims) if dims else delta
        parts = [gw if n_.endswith("weight") else gb for n_ in layer.param_names]
        g = torch.cat(parts, dim=1)
        return [Term(g.new_ones(n, 1, 1), g[:, None, :])]

    @staticmethod
    def to_matrix(layer, tensors):
        m = tensors[0].shape[0]
        return torch.cat([t.reshape(m, -1) for t in tensors], dim=1)[:, :, None]

    @staticmethod
    def from_matrix(layer, G):
        m, out, lo = G.shape[0], [], 0
        for p in _params_of(layer):
            out.append(G[:, lo:lo + p.numel(), 0].reshape(m, *p.shape))
            lo += p.numel()
        return out


class MHAKind(LayerKind):
    """nn.MultiheadAttention's packed in-projection (see the module docstring); out_proj is an ordinary Linear."""

    name = "mha"

    @staticmethod
    def match(m):
        return isinstance(m, nn.MultiheadAttention)

    @staticmethod
    def patchable(m: nn.MultiheadAttention) -> bool:
        return m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None and not m.add_zero_attn

    @staticmethod
    def kind_of(m):
        return "mha"

    @classmethod
    def describe(cls, name, m, usable):
        prefix = f"{name}." if name else ""
        w, b = prefix + "in_proj_weight", prefix + "in_proj_bias"
        if not cls.patchable(m) or not usable(w):
            return None
        has_bias = m.in_proj_bias is not None and usable(b)
        names = [w, b] if has_bias else [w]
        return Layer(name, "mha", m, names, 3 * m.embed_dim, m.embed_dim + int(has_bias), has_bias)

    @staticmethod
    def terms(layer, saved, delta):
        a, row0 = saved
        return [Term(_with_ones(a, layer.has_bias), delta, row0=row0)]

    @staticmethod
    def from_matrix(layer, G):
        m = G.shape[0]
        out = [(G[:, :, :-1] if layer.has_bias else G).reshape(m, *layer.module.in_proj_weight.shape)]
        return out + [G[:, :, -1].reshape(m, -1)] if layer.has_bias else out


KINDS: dict[str, type[LayerKind]] = {
    "linear": LinearKind, "hf_conv1d": HFConv1DKind, "conv1d": ConvKind, "conv2d": ConvKind,
    "embedding": EmbeddingKind, "norm": NormKind, "mha": MHAKind,
}
_MATCH_ORDER = (MHAKind, LinearKind, HFConv1DKind, ConvKind, EmbeddingKind, NormKind)


# -- discovery --------------------------------------------------------------------------------------------------
def find_layers(module: nn.Module, param_names: list[str], accept: Callable[[Layer], bool] | None = None
                ) -> tuple[list[Layer], list[str], list[nn.MultiheadAttention]]:
    """(layers, rest, attention modules to patch): THE rule for which selected parameters are hooked.

    `accept` can veto layers (e.g. a consumer that handles only some kinds); vetoed parameters go to `rest`.
    """
    selected = set(param_names)
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    params = dict(module.named_parameters())

    def usable(n: str) -> bool:
        return n in selected and uses.get(id(params[n]), 0) == 1

    layers, covered, patched, blocked = [], set(), [], set()
    seq_first: set[str] = set()   # module-name prefixes inside batch_first=False transformer layers
    batch_first_children: set[str] = set()
    for name, m in module.named_modules():
        if isinstance(m, _TRANSFORMER_LAYERS) and not m.self_attn.batch_first:
            seq_first.add(name + ".")
        if name in blocked:
            continue
        kind = next((k for k in _MATCH_ORDER if k.match(m)), None)
        if kind is None:
            continue
        if kind is MHAKind:
            if MHAKind.patchable(m):
                patched.append(m)
                batch_first_children.add(f"{name}.out_proj" if name else "out_proj")   # the patch calls it batch-first
            else:
                blocked.add(f"{name}.out_proj" if name else "out_proj")
        layer = kind.describe(name, m, usable)
        if layer is None or (accept is not None and not accept(layer)):
            continue
        if kind is not MHAKind and name not in batch_first_children and any(name.startswith(p) for p in seq_first):
            layer.batch_dim = 1
        layers.append(layer)
        covered.update(layer.param_names)
    rest = [n for n in param_names if n not in covered]
    return layers, rest, patched


# -- recording ------------------------------------------------------------------------------------------------
class Tape:
    """The records of one hooked forward: (layer, saved input, output to differentiate) per layer call.

    With `on_grad`, every record also gets a tensor hook: whatever backward later reaches the layer's output (e.g.
    the training step's own `loss.backward()`) calls `on_grad(layer, terms)` with that output gradient's terms.
    """

    def __init__(self, on_grad: Callable[[Layer, list[Term]], None] | None = None):
        self.records: list[tuple[Layer, Any, torch.Tensor]] = []
        self.batch_size: int | None = None
        self.on_grad = on_grad

    def add(self, layer: Layer, saved: Any, output: torch.Tensor) -> None:
        self.records.append((layer, saved, output))
        if self.on_grad is not None:
            kind, on_grad = KINDS[layer.kind], self.on_grad
            output.register_hook(lambda g: on_grad(layer, kind.terms(layer, saved, g.detach())))

    def terms(self, scalar: torch.Tensor, retain_graph: bool = False) -> list[tuple[Layer, list[Term]]]:
        """Backward of `scalar` to the recorded outputs -> per record (layer, terms); records off its path are left out."""
        live = [r for r in self.records if r[2].requires_grad]
        if not live:
            return []
        grads = torch.autograd.grad(scalar, [r[2] for r in live], retain_graph=retain_graph, allow_unused=True)
        out = []
        for (layer, saved, _), g in zip(live, grads):
            if g is None:
                continue
            bdim = layer.batch_dim if layer.kind != "mha" else 0
            if self.batch_size is not None and g.shape[bdim] != self.batch_size:
                raise ValueError(
                    f"layer {layer.name!r} ({type(layer.module).__name__}) saw a tensor of shape {tuple(g.shape)} "
                    f"whose dim {bdim} is not the batch ({self.batch_size} examples): its per-example gradient "
                    "cannot be read from hooks. Exclude its parameters with params=, or keep the batch in dim 0.")
            out.append((layer, KINDS[layer.kind].terms(layer, saved, g.detach())))
        return out


class LayerEngine:
    """Finds the hookable layers of `module` among `param_names` (`find_layers`) and records their factors.

    `run(output_fn, batch)` -> (outputs (B,), [(layer, terms)]) from one forward and one backward of outputs.sum();
    `recording()` gives the tape for several backward passes of one forward (EK-FAC's pseudo-outputs).
    """

    def __init__(self, module: nn.Module, param_names: list[str], accept: Callable[[Layer], bool] | None = None):
        self.module = module
        self.layers, self.rest, self._attention = find_layers(module, param_names, accept)
        self._by_module = {id(layer.module): layer for layer in self.layers}

    @contextmanager
    def recording(self, on_grad: Callable[[Layer, list[Term]], None] | None = None,
                  eval_mode: bool = True) -> Iterator[Tape]:
        """Hooks on every layer, attention forwards patched, eval mode and grad enabled (unless `eval_mode=False`,
        e.g. inside a training step; norm layers with batch statistics are then not per-example: leave them out with
        `accept`); all undone on exit. `on_grad`: see `Tape`."""
        tape = Tape(on_grad)
        was_training = self.module.training
        handles = []
        for layer in self.layers:
            if layer.kind != "mha":
                handles.append(layer.module.register_forward_hook(self._hook(layer, tape)))
        for mha in self._attention:
            mha.forward = _PatchedAttention(mha, self._by_module.get(id(mha)), tape)
        if eval_mode:
            self.module.eval()
        try:
            with torch.enable_grad():
                yield tape
        finally:
            for h in handles:
                h.remove()
            for mha in self._attention:
                mha.__dict__.pop("forward", None)
            self.module.train(was_training)

    @staticmethod
    def _hook(layer: Layer, tape: Tape):
        kind = KINDS[layer.kind]

        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                return output
            tape.add(layer, kind.record(layer, mod, inputs[0]), output)
            if tape.on_grad is not None:
                # a tensor hook registered before an in-place op downstream (ReLU(inplace=True)) still gets the
                # gradient of the value it was registered on: no copy needed (a training step's hot path)
                return output
            # the rest of the forward gets a copy, so that an in-place op downstream cannot rewrite the tensor we
            # differentiate with autograd.grad
            return output.clone()
        return hook

    def run(self, output_fn: Callable, batch: Any) -> tuple[torch.Tensor, list[tuple[Layer, list[Term]]]]:
        with self.recording() as tape:
            out = output_fn(self.module, batch)
            if out.dim() != 1:
                raise ValueError(f"output_fn must return one scalar per example (shape (B,)), got {tuple(out.shape)}")
            tape.batch_size = out.shape[0]
            return out, tape.terms(out.sum())


@contextmanager
def explicit_attention(module: nn.Module) -> Iterator[None]:
    """Every patchable nn.MultiheadAttention of `module` computed by `_PatchedAttention` (softmax(QK^T)V written out)
    instead of F.multi_head_attention_forward: torch.func transforms then work (forward-mode AD, used by the GGN and
    Hessian products, has no rule for the fused CPU attention kernel; vmap has no batching rule for it)."""
    patched = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention) and MHAKind.patchable(m)
               and "forward" not in m.__dict__]
    for m in patched:
        m.forward = _PatchedAttention(m, None, Tape())
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


class _PatchedAttention:
    """nn.MultiheadAttention.forward, computed with F.linear on the packed in-projection (recorded on the tape when
    that layer is hooked) and out_proj called as a module (so its Linear hook fires). Same math as the stock forward
    in eval mode (dropout on the attention weights only while training)."""

    def __init__(self, mha: nn.MultiheadAttention, layer: Layer | None, tape: Tape):
        self.mha, self.layer, self.tape = mha, layer, tape

    def _project(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        m = self.mha
        w = m.in_proj_weight[lo:hi]
        b = m.in_proj_bias[lo:hi] if m.in_proj_bias is not None else None
        y = F.linear(x, w, b)
        if self.layer is not None and y.requires_grad:
            self.tape.add(self.layer, (x.detach(), lo), y)
        return y

    def __call__(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
        m = self.mha
        if query.dim() != 3:
            raise ValueError("the layer engine supports batched (3-D) inputs of nn.MultiheadAttention only")
        same = query is key and key is value
        if not m.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        E, H = m.embed_dim, m.num_heads
        if same:
            q, k, v = self._project(query, 0, 3 * E).chunk(3, dim=-1)
        else:
            q, k, v = self._project(query, 0, E), self._project(key, E, 2 * E), self._project(value, 2 * E, 3 * E)
        n, L, S, hd = q.shape[0], q.shape[1], k.shape[1], E // H
        q = q.reshape(n, L, H, hd).transpose(1, 2)
        k = k.reshape(n, S, H, hd).transpose(1, 2)
        v = v.reshape(n, S, H, hd).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if attn_mask is not None:
            mask = _additive(attn_mask, scores.dtype)
            scores = scores + (mask.view(n, H, L, S) if mask.dim() == 3 else mask)
        elif is_causal:
            scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype).view(n, 1, 1, S)
        weights = torch.softmax(scores, dim=-1)
        if m.training and m.dropout > 0:
            weights = F.dropout(weights, m.dropout)
        out = m.out_proj((weights @ v).transpose(1, 2).reshape(n, L, E))
        if not m.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)

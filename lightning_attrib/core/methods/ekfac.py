"""Eigenvalue-corrected Kronecker-factored curvature (EK-FAC, George et al. 2018; Grosse et al. 2023).

Which matrix is approximated: the block-diagonal (one block per layer) part of

    M = (1/n) sum_i m(z_i) + D

with m = the GGN / true Fisher J^T (diag(p) - p p^T) J of softmax cross-entropy (`matrix="ggn"`, the default;
computed exactly as the expectation over all C labels, not by sampling labels) or the empirical Fisher
g g^T (`matrix="empirical_fisher"`), and D the weight decay. Never the Hessian itself (for a model linear in its
parameters, such as logistic regression, the GGN *is* the Hessian of the cross-entropy).

For a layer with per-example weight gradient G_i = sum_t delta_it a_it^T (pre-activation gradients delta,
inputs a, with a constant 1 appended when the bias is attributed; t runs over sequence / spatial positions):

1. K-FAC factors A = sum_it a a^T and S = sum_it delta delta^T (float64, all-reduced over ranks), eigendecomposed
   once: A = U_A diag U_A^T, S = U_S diag U_S^T. (Their scales do not matter: only the eigenbases are used.)
2. Eigenvalue correction: Lambda_jk = (1/n) sum_i (U_S^T G_i U_A)_jk^2 + (U_S^T D U_A)-diagonal, i.e. exactly
   diag(Q^T M_layer Q) for Q = U_S (x) U_A: the best approximation of M's layer block that is diagonal in the
   Kronecker eigenbasis Q.
3. The layer's block of (M + lambda I)^-1 is Q diag(1 / (Lambda + lambda)) Q^T.

So EK-FAC equals the explicit damped inverse of M (layer block) exactly when Q diagonalizes that block, e.g. when
M's block is itself a Kronecker product (one training example; or a model whose softmax outputs do not depend on
the input, such as logistic regression with zero weights); otherwise it is the projection of M on the matrices
diagonal in Q. Supported layers: `nn.Linear` (any leading dims) and `nn.Conv2d` (groups=1, numeric padding,
zeros padding mode), each called once per forward pass.
Cost: two passes over the training data (C backward passes per batch for "ggn"), memory d_in^2 + d_out^2 per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import unpack_batch
from ..outputs import CrossEntropyLoss

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class LayerBlock:
    name: str
    layer: nn.Module
    w_offset: int
    w_numel: int
    b_offset: int | None       # None: bias not attributed (no constant-1 input)
    d_out: int
    d_in: int                  # including the constant-1 column when the bias is attributed
    U_A: torch.Tensor | None = None
    U_S: torch.Tensor | None = None
    Lambda: torch.Tensor | None = None


def find_blocks(module: nn.Module, param_names: list[str]) -> list[LayerBlock]:
    """One `LayerBlock` per supported layer whose weight is attributed; error on any other attributed parameter."""
    named = dict(module.named_parameters())
    offsets, off = {}, 0
    for n in param_names:
        offsets[n] = off
        off += named[n].numel()
    chosen, covered, blocks = set(param_names), set(), []
    for lname, layer in module.named_modules():
        if not isinstance(layer, SUPPORTED_LAYERS):
            continue
        w = f"{lname}.weight" if lname else "weight"
        b = f"{lname}.bias" if lname else "bias"
        has_b = layer.bias is not None and b in chosen
        if w not in chosen:
            if has_b:
                raise ValueError(f"EK-FAC: the bias {b!r} is attributed without its weight {w!r}; attribute both or neither")
            continue
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
                raise ValueError(f"EK-FAC supports nn.Conv2d with groups=1, numeric padding and zeros padding mode; "
                                 f"layer {lname!r} is {layer}")
        d_out = layer.weight.shape[0]
        d_in_w = layer.weight[0].numel()
        blocks.append(LayerBlock(lname, layer, offsets[w], layer.weight.numel(), offsets[b] if has_b else None,
                                 d_out, d_in_w + int(has_b)))
        covered.update({w} | ({b} if has_b else set()))
    rest = [n for n in param_names if n not in covered]
    if rest:
        raise ValueError(
            f"EK-FAC supports the weights (and biases) of nn.Linear and nn.Conv2d layers only; these attributed "
            f"parameters are in other layers: {rest[:10]}. Restrict params= to supported layers, or use "
            "solver='cg', 'lissa' or 'projected'."
        )
    return blocks


class EKFAC:
    """Fits the factors and eigenvalue corrections of every `LayerBlock`, then applies (M + lambda I)^-1."""

    def __init__(self, module: nn.Module, param_names: list[str], output_fn, matrix: str = "ggn"):
        if matrix not in ("ggn", "empirical_fisher"):
            raise ValueError(f"EK-FAC approximates matrix='ggn' or 'empirical_fisher' (not the Hessian), got {matrix!r}")
        if matrix == "ggn" and not isinstance(output_fn, CrossEntropyLoss):
            raise ValueError("EK-FAC with matrix='ggn' needs the built-in 'loss' output (softmax cross-entropy on "
                             "module(inputs) logits); use matrix='empirical_fisher' for a custom output")
        self.module, self.param_names, self.output_fn, self.matrix = module, param_names, output_fn, matrix
        self.blocks = find_blocks(module, param_names)
        self.num_params = int(sum(dict(module.named_parameters())[n].numel() for n in param_names))

    # -- per-batch activations and pre-activation gradients ----------------------------------------
    def _inputs(self, block: LayerBlock, x: torch.Tensor) -> torch.Tensor:
        layer = block.layer
        if isinstance(layer, nn.Conv2d):
            a = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        a = a.to(torch.float64)
        if block.b_offset is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return a

    @staticmethod
    def _grads(block: LayerBlock, g: torch.Tensor) -> torch.Tensor:
        if isinstance(block.layer, nn.Conv2d):
            return g.flatten(2).transpose(1, 2).to(torch.float64)
        return g.reshape(g.shape[0], -1, g.shape[-1]).to(torch.float64)

    def _passes(self, batch):
        """Yields (activations per block, pre-activation gradients per block) for each pseudo-output of a batch."""
        records: dict[str, list] = {b.name: [] for b in self.blocks}

        def hook_for(block):
            def hook(mod, inp, out):
                records[block.name].append((inp[0].detach(), out))
            return hook

        handles = [b.layer.register_forward_hook(hook_for(b)) for b in self.blocks]
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.enable_grad():
                if self.matrix == "ggn":
                    inputs, _ = unpack_batch(batch)
                    z = self.module(inputs)
                    p = torch.softmax(z.detach().double(), dim=-1)
                    eye = torch.eye(z.shape[-1], dtype=torch.float64, device=z.device)
                    scalars = [(z * (p[..., c:c + 1].sqrt() * (p - eye[c])).to(z.dtype)).sum() for c in range(z.shape[-1])]
                else:
                    scalars = [self.output_fn(self.module, batch).sum()]
        finally:
            for h in handles:
                h.remove()
            self.module.train(was_training)
        for b in self.blocks:
            if len(records[b.name]) != 1:
                raise ValueError(f"EK-FAC: layer {b.name!r} ran {len(records[b.name])} times in one forward pass; "
                                 "shared or repeated layers are not supported")
        acts = [self._inputs(b, records[b.name][0][0]) for b in self.blocks]
        outs = [records[b.name][0][1] for b in self.blocks]
        for k, s in enumerate(scalars):
            gs = torch.autograd.grad(s, outs, retain_graph=k < len(scalars) - 1, allow_unused=True)
            yield acts, [self._grads(b, g if g is not None else torch.zeros_like(o))
                         for b, g, o in zip(self.blocks, gs, outs)]

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, batches_factory, reduce, n_train: int, decay: torch.Tensor) -> None:
        """`batches_factory()` -> this rank's training batches; `reduce` all-reduces a tensor over ranks."""
        dev = next(iter(self.module.parameters())).device
        A = [torch.zeros(b.d_in, b.d_in, dtype=torch.float64, device=dev) for b in self.blocks]
        S = [torch.zeros(b.d_out, b.d_out, dtype=torch.float64, device=dev) for b in self.blocks]
        for batch in batches_factory():
            for first, (acts, grads) in enumerate(self._passes(batch)):
                for j, (a, d) in enumerate(zip(acts, grads)):
                    if first == 0:
                        A[j] += torch.einsum("bti,btj->ij", a, a)
                    S[j] += torch.einsum("bti,btj->ij", d, d)
        for j, b in enumerate(self.blocks):
            b.U_A = torch.linalg.eigh(reduce(A[j]))[1]
            b.U_S = torch.linalg.eigh(reduce(S[j]))[1]
            b.Lambda = torch.zeros(b.d_out, b.d_in, dtype=torch.float64, device=dev)
        for batch in batches_factory():
            for first, (acts, grads) in enumerate(self._passes(batch)):
                for j, (a, d, b) in enumerate(zip(acts, grads, self.blocks)):
                    g_hat = torch.einsum("bto,bti->boi", d @ b.U_S, a @ b.U_A)
                    b.Lambda += (g_hat * g_hat).sum(dim=0)
        for b in self.blocks:
            b.Lambda = reduce(b.Lambda) / n_train + (b.U_S ** 2).T @ self._block_matrix(b, decay.to(dev)) @ (b.U_A ** 2)

    def _block_matrix(self, b: LayerBlock, flat: torch.Tensor) -> torch.Tensor:
        """The (d_out, d_in) layout of this layer's entries of a flat (p,) vector."""
        w = flat[b.w_offset:b.w_offset + b.w_numel].reshape(b.d_out, -1)
        if b.b_offset is None:
            return w
        return torch.cat([w, flat[b.b_offset:b.b_offset + b.d_out].reshape(b.d_out, 1)], dim=1)

    # -- applying -------------------------------------------------------------------------------
    def apply(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """Rows of (M_EKFAC + damping I)^-1 V^T for (m, p) float64 V (gradients in the features' layout)."""
        V = V.to(torch.float64)
        out = torch.zeros_like(V)
        m = V.shape[0]
        for b in self.blocks:
            U_A, U_S, lam = b.U_A.to(V.device), b.U_S.to(V.device), b.Lambda.to(V.device)
            w = V[:, b.w_offset:b.w_offset + b.w_numel].reshape(m, b.d_out, -1)
            G = w if b.b_offset is None else torch.cat([w, V[:, b.b_offset:b.b_offset + b.d_out, None]], dim=2)
            G_hat = U_S.T @ G @ U_A / (lam + damping)
            back = U_S @ G_hat @ U_A.T
            d_w = b.w_numel // b.d_out
            out[:, b.w_offset:b.w_offset + b.w_numel] = back[:, :, :d_w].reshape(m, -1)
            if b.b_offset is not None:
                out[:, b.b_offset:b.b_offset + b.d_out] = back[:, :, d_w]
        return out

    def eigenvalues(self) -> torch.Tensor:
        """All corrected eigenvalues (trace(M_EKFAC) is their sum)."""
        return torch.cat([b.Lambda.flatten() for b in self.blocks])

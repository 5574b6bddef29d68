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
diagonal in Q. Layers: every kind of the layer engine (`core/layers.py`, the same discovery as the projectors):
Linear, Conv1d/2d (any padding), HF Conv1D, MultiheadAttention's packed in-projection, Embedding (one-hot rows:
S is diagonal, at most `MAX_SIDE` rows) and the affine parameters of norm layers, which are HANDLED, not skipped: their
block has d_in = 1 (A is a scalar), so Q = U_S diagonalizes their GGN block and EK-FAC is exact there. A layer may
run several times per forward (its terms are summed). Parameters outside these layers are refused (use params=).
Cost: two passes over the training data (C backward passes per batch for "ggn"), memory d_in^2 + d_out^2 per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..batches import unpack_batch
from ..layers import Layer, LayerEngine, Term
from ..outputs import CrossEntropyLoss

MAX_SIDE = 8192   # largest factor side (d_in or d_out) EK-FAC eigendecomposes (an embedding's vocabulary, a wide layer)


@dataclass
class LayerBlock:
    """One engine layer's EK-FAC state and where its parameters sit in the flat (p,) feature layout."""

    layer: Layer
    offsets: list[int]          # flat offset of each of layer.param_names
    U_A: torch.Tensor | None = None
    U_S: torch.Tensor | None = None
    Lambda: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def d_out(self) -> int:
        return self.layer.d_out

    @property
    def d_in(self) -> int:
        return self.layer.d_in

    def matrix(self, flat: torch.Tensor) -> torch.Tensor:
        """(m, d_out, d_in) G layout of this layer's entries of (m, p) rows."""
        shapes = [tuple(p.shape) for p in _params(self.layer)]
        parts = [flat[:, o:o + _numel(s)].reshape(flat.shape[0], *s) for o, s in zip(self.offsets, shapes)]
        return self.layer.to_matrix(parts)

    def scatter(self, out: torch.Tensor, G: torch.Tensor) -> None:
        """Write (m, d_out, d_in) G back into the flat rows of `out`."""
        for o, t in zip(self.offsets, self.layer.from_matrix(G)):
            out[:, o:o + t[0].numel()] = t.reshape(t.shape[0], -1)


def _params(layer: Layer) -> list[torch.Tensor]:
    return [getattr(layer.module, n.rsplit(".", 1)[-1]) for n in layer.param_names]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def find_blocks(module: nn.Module, param_names: list[str]) -> list[LayerBlock]:
    """One `LayerBlock` per engine layer among `param_names`; error on any attributed parameter outside them."""
    engine = LayerEngine(module, param_names)
    check_supported(engine)
    named = dict(module.named_parameters())
    offsets, off = {}, 0
    for n in param_names:
        offsets[n] = off
        off += named[n].numel()
    return [LayerBlock(la, [offsets[n] for n in la.param_names]) for la in engine.layers]


def check_supported(engine: LayerEngine) -> None:
    """Raise (with the fix) when EK-FAC cannot handle every attributed parameter of `engine`."""
    if engine.rest:
        raise ValueError(
            f"EK-FAC covers the layers of the layer engine only (Linear, Conv1d/2d, Embedding, norm affine parameters, "
            f"MultiheadAttention, HF Conv1D); these attributed parameters are elsewhere (or tied, or a bias without its "
            f"weight): {engine.rest[:10]}. Restrict params= to supported layers, or use solver='projected'.")
    wide = [(la.name, max(la.d_out, la.d_in)) for la in engine.layers if max(la.d_out, la.d_in) > MAX_SIDE]
    if wide:
        raise ValueError(f"EK-FAC eigendecomposes each layer's factors; {wide[:5]} have a side above {MAX_SIDE}. "
                         "Exclude them with params=, or use solver='projected'.")


class EKFAC:
    """Fits the factors and eigenvalue corrections of every `LayerBlock`, then applies (M + lambda I)^-1."""

    def __init__(self, module: nn.Module, param_names: list[str], output_fn, matrix: str = "ggn"):
        if matrix not in ("ggn", "empirical_fisher"):
            raise ValueError(f"EK-FAC approximates matrix='ggn' or 'empirical_fisher' (not the Hessian), got {matrix!r}")
        if matrix == "ggn" and not isinstance(output_fn, CrossEntropyLoss):
            raise ValueError("EK-FAC with matrix='ggn' needs the built-in 'loss' output (softmax cross-entropy on "
                             "module(inputs) logits); use matrix='empirical_fisher' for a custom output")
        self.module, self.param_names, self.output_fn, self.matrix = module, param_names, output_fn, matrix
        self.engine = LayerEngine(module, param_names)
        self.blocks = find_blocks(module, param_names)
        self.num_params = int(sum(dict(module.named_parameters())[n].numel() for n in param_names))

    @property
    def layer_kinds(self) -> dict[str, str]:
        """{layer name: kind} of the blocks (norm layers appear as kind "norm": handled, exact per block)."""
        return {b.name: b.layer.kind for b in self.blocks}

    def _passes(self, batch):
        """Per pseudo-output of a batch: {layer name: [Term]} (for "ggn" the C outputs sqrt(p_c) (p - e_c)^T z,
        whose outer products sum to the GGN; for "empirical_fisher" the summed loss)."""
        with self.engine.recording() as tape:
            if self.matrix == "ggn":
                inputs, _ = unpack_batch(batch)
                z = self.module(inputs)
                p = torch.softmax(z.detach().double(), dim=-1)
                eye = torch.eye(z.shape[-1], dtype=torch.float64, device=z.device)
                scalars = [(z * (p[..., c:c + 1].sqrt() * (p - eye[c])).to(z.dtype)).sum() for c in range(z.shape[-1])]
                tape.batch_size = z.shape[0]
            else:
                out = self.output_fn(self.module, batch)
                tape.batch_size = out.shape[0]
                scalars = [out.sum()]
            for k, s in enumerate(scalars):
                terms: dict[str, list[Term]] = {}
                for layer, ts in tape.terms(s, retain_graph=k < len(scalars) - 1):
                    terms.setdefault(layer.name, []).extend(ts)
                yield terms

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, batches_factory, reduce, n_train: int, decay: torch.Tensor) -> None:
        """`batches_factory()` -> this rank's training batches; `reduce` all-reduces a tensor over ranks."""
        dev = next(iter(self.module.parameters())).device
        f64 = torch.float64
        A = {b.name: torch.zeros(b.d_in, b.d_in, dtype=f64, device=dev) for b in self.blocks}
        S = {b.name: torch.zeros(b.d_out, b.d_out, dtype=f64, device=dev) for b in self.blocks}
        kinds = self.layer_kinds
        for batch in batches_factory():
            for first, terms in enumerate(self._passes(batch)):
                for name, ts in terms.items():
                    for t in ts:
                        t = t.to(f64)
                        if first == 0 or kinds[name] == "embedding":   # an embedding's A side is its output gradient
                            A[name] += torch.einsum("bti,btj->ij", t.a, t.a)
                        d = t.out_dense(S[name].shape[0])
                        S[name] += torch.einsum("bti,btj->ij", d, d)
        for b in self.blocks:
            b.U_A = torch.linalg.eigh(reduce(A[b.name]))[1]
            b.U_S = torch.linalg.eigh(reduce(S[b.name]))[1]
            b.Lambda = torch.zeros(b.d_out, b.d_in, dtype=f64, device=dev)
        blocks = {b.name: b for b in self.blocks}
        for batch in batches_factory():
            for terms in self._passes(batch):
                for name, ts in terms.items():
                    b = blocks[name]
                    g_hat = sum(torch.einsum("bto,bti->boi", t.out_times(b.U_S), t.a @ b.U_A)
                                for t in (t.to(f64) for t in ts))
                    b.Lambda += (g_hat * g_hat).sum(dim=0)
        for b in self.blocks:
            D = b.matrix(decay.to(dev)[None])[0]
            b.Lambda = reduce(b.Lambda) / n_train + (b.U_S ** 2).T @ D @ (b.U_A ** 2)

    # -- applying -------------------------------------------------------------------------------
    def apply(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """Rows of (M_EKFAC + damping I)^-1 V^T for (m, p) float64 V (gradients in the features' layout)."""
        V = V.to(torch.float64)
        out = torch.zeros_like(V)
        for b in self.blocks:
            U_A, U_S, lam = b.U_A.to(V.device), b.U_S.to(V.device), b.Lambda.to(V.device)
            G_hat = U_S.T @ b.matrix(V) @ U_A / (lam + damping)
            b.scatter(out, U_S @ G_hat @ U_A.T)
        return out

    def eigenvalues(self) -> torch.Tensor:
        """All corrected eigenvalues (trace(M_EKFAC) is their sum)."""
        return torch.cat([b.Lambda.flatten() for b in self.blocks])

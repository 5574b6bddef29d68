"""The layer engine (issue #13): for every layer kind, the per-example gradient assembled from the hooks' (A, D) terms,
the tensor-sketch and Kronecker features, equal the explicit computation from torch.func per-example gradients."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_attrib.core.gradients import PerExampleGradients
from lightning_attrib.core.io import derive_seed
from lightning_attrib.core.layers import LayerEngine
from lightning_attrib.core.outputs import resolve_output
from lightning_attrib.core.projection import RandomProjector
from lightning_attrib.core.sketch import KroneckerProjector, TensorSketchProjector, make_projector

PAD = 0


class _SeqNet(nn.Module):
    """Embedding (padding_idx) -> Conv1d ('same', reflect) -> LayerNorm -> stock TransformerEncoder (batch_first, nested
    tensors on, key padding mask) -> RMS/GroupNorm -> masked mean -> Linear head."""

    def __init__(self, vocab=11, dim=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.conv = nn.Conv1d(dim, dim, 3, padding="same", padding_mode="reflect")
        self.ln = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=12, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.gn = nn.GroupNorm(2, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        mask = tokens == PAD
        h = self.emb(tokens)                                        # (B, T, dim)
        h = self.ln(self.conv(h.transpose(1, 2)).transpose(1, 2))
        h = self.enc(h, src_key_padding_mask=mask)
        h = self.gn(h.transpose(1, 2)).transpose(1, 2)
        keep = (~mask).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


class _ImageNet(nn.Module):
    """Conv2d -> BatchNorm2d -> Conv2d ('same', circular) -> GroupNorm -> seq-first TransformerEncoderLayer over pixels
    (a cross-attention MHA too) -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 2, padding="same", padding_mode="circular", bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.tf = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0)   # batch_first=False
        self.cross = nn.MultiheadAttention(4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.gn(self.c2(torch.relu(self.bn(self.c1(x)))))      # (B, 4, 4, 4)
        seq = h.flatten(2).permute(2, 0, 1)                         # (16, B, 4) sequence first
        seq = self.tf(seq)
        q = seq.mean(0, keepdim=True)                               # (1, B, 4)
        out, _ = self.cross(q, seq, seq)
        return self.head(out[0])


def _seq_batch(n=5, t=6):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 11, (n, t), generator=g)
    lengths = torch.tensor([6, 4, 3, 6, 2])[:n]
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = PAD
    tokens[0, 2] = PAD     # a padding token inside a sequence (no gradient to the padding row)
    return tokens, torch.randint(0, 3, (n,), generator=g)


def _image_batch(n=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _model(cls):
    torch.manual_seed(0)
    m = cls().double()
    if isinstance(m, _ImageNet):  # non-trivial running statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


CASES = {"seq": (_SeqNet, _seq_batch), "image": (_ImageNet, _image_batch)}


def _reference_grads(module, output, names, batch):
    """{name: (B, *shape)} per-example gradients from torch.func."""
    flat = PerExampleGradients(module, output, names)(batch).double()
    params, out, lo = dict(module.named_parameters()), {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = flat[:, lo:lo + k].reshape(flat.shape[0], *params[n].shape)
        lo += k
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_engine_terms_give_the_per_example_gradient_of_every_layer(case):
    cls, make_batch = CASES[case]
    module, batch = _model(cls), make_batch()
    output = resolve_output("loss")
    names = [n for n, _ in module.named_parameters()]
    engine = LayerEngine(module, names)
    kinds = {la.name: la.kind for la in engine.layers}
    if case == "seq":
        assert kinds["emb"] == "embedding" and kinds["conv"] == "conv1d" and kinds["ln"] == "norm"
        assert kinds["enc.layers.0.self_attn"] == "mha" and kinds["enc.layers.0.self_attn.out_proj"] == "linear"
        assert engine.rest == []     # everything hooked: no torch.func fallback
    else:
        assert kinds["bn"] == kinds["gn"] == "norm" and kinds["c2"] == "conv2d" and kinds["cross"] == "mha"
        assert {la.batch_dim for la in engine.layers if la.name.startswith("tf.linear")} == {1}
        assert engine.rest == []
    plain = output(module.eval(), batch)
    out, records = engine.run(output, batch)
    torch.testing.assert_close(out, plain)   # the patched attention computes the stock forward
    with torch.no_grad():                     # ... and the stock fast path (nested tensors for the padding mask)
        torch.testing.assert_close(out.detach(), output(module, batch))
    ref = _reference_grads(module, output, names, batch)
    got = {}
    for layer, terms in records:
        G = sum(t.gradient(layer.d_out) for t in terms)
        got[layer.name] = got.get(layer.name, 0) + G
    for layer in engine.layers:
        expected = layer.to_matrix([ref[n] for n in layer.param_names])
        torch.testing.assert_close(got[layer.name], expected, rtol=1e-7, atol=1e-9, msg=layer.name)
        back = layer.from_matrix(expected)
        for n, t in zip(layer.param_names, back):
            torch.testing.assert_close(t, ref[n])
    if case == "seq":  # the padding row of the embedding gets no gradient
        assert ref["emb.weight"][:, PAD].abs().max() == 0
    assert all(p.grad is None for p in module.parameters())


def _explicit(projector, module, output, batch):
    """Sum / concatenation over layers of vec(G_layer) @ the layer's explicit matrix, plus the rest's dense projection."""
    names = [n for la in projector.layers for n in la.param_names] + projector.fallback.param_names
    ref = _reference_grads(module, output, names, batch)
    by_name = {la.name: la for la in projector.engine.layers}
    blocks = []
    for plan in projector.layers:
        layer = by_name[plan.name]
        G = layer.to_matrix([ref[n] for n in layer.param_names]).reshape(len(batch[1]), -1)
        blocks.append(G @ projector.layer_matrix(plan))
    if projector.fallback.numel:
        rest = torch.cat([ref[n].reshape(len(batch[1]), -1) for n in projector.fallback.param_names], dim=1)
        if not projector.summed and projector.fallback.dim == projector.fallback.numel:
            blocks.append(rest)   # kept exact
        else:
            mat = RandomProjector(projector.fallback.numel, projector.fallback.dim,
                                  seed=derive_seed(projector.seed, "fallback")).matrix().double()
            blocks.append(rest @ mat)
    return sum(blocks) if projector.summed else torch.cat(blocks, dim=1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["tensorsketch", "factorized"])
def test_sketches_of_every_layer_equal_the_explicit_projection(case, kind, monkeypatch):
    cls, make_batch = CASES[case]
    module, batch = _model(cls), make_batch()
    output = resolve_output("margin")
    for path in (["fft", "gradient"] if kind == "tensorsketch" else ["-"]):
        monkeypatch.setattr(TensorSketchProjector, "_via_gradient",
                            staticmethod(lambda layer, positions, p=path: p == "gradient"))
        proj = make_projector(kind, module, output, None, proj_dim=96, seed=3)
        feats = proj(batch).double()
        ref = _explicit(proj, module, output, batch)
        assert feats.shape == (5, 96)
        torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_partial_selection_sends_a_lone_bias_and_frozen_out_proj_to_the_rest():
    module = _model(_SeqNet)
    names = [n for n, _ in module.named_parameters() if n != "head.weight" and not n.startswith("enc.layers.1")]
    engine = LayerEngine(module, names)
    assert "head.bias" in engine.rest and "head" not in {la.name for la in engine.layers}
    kron = KroneckerProjector(module, resolve_output("margin"), names, proj_dim=64, seed=0)
    batch = _seq_batch()
    torch.testing.assert_close(kron(batch).double(), _explicit(kron, module, resolve_output("margin"), batch),
                               rtol=1e-5, atol=1e-7)


def test_unpatchable_attention_leaves_out_proj_to_the_fallback():
    """An MHA with bias_k cannot be patched: its out_proj never runs as a module, so hooking it would give zeros."""
    mha = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    engine = LayerEngine(nn.ModuleDict({"a": mha}), [n for n, _ in nn.ModuleDict({"a": mha}).named_parameters()])
    assert engine.layers == [] and "a.out_proj.weight" in engine.rest


def test_vmap_failure_names_the_fix():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x * self.w).sum(1) if x.sum().item() > -1e9 else x.sum(1)   # .item(): not vmappable

    with pytest.raises(ValueError, match="params="):
        PerExampleGradients(Bad(), lambda m, b: m(b[0]))((torch.randn(4, 3), torch.zeros(4)))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_gpt2_conv1d_terms_and_sketch():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)).double()
    output = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    engine = LayerEngine(net, [n for n, _ in net.named_parameters()])
    assert [la.kind for la in engine.layers] == ["hf_conv1d", "hf_conv1d"] and engine.rest == []
    ref = _reference_grads(net, output, [n for n, _ in net.named_parameters()], batch)
    _, records = engine.run(output, batch)
    for layer, terms in records:
        torch.testing.assert_close(sum(t.gradient(layer.d_out) for t in terms),
                                   layer.to_matrix([ref[n] for n in layer.param_names]))
    proj = TensorSketchProjector(net, output, None, proj_dim=32, seed=1)
    torch.testing.assert_close(proj(batch).double(), _explicit(proj, net, output, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_identity_projector_gives_torch_func_gradients_without_vmap(case):
    """projector="identity" from the engine: the full per-example gradients in param_names order, as torch.func's."""
    cls, make_batch = CASES[case]
    module, batch = _model(cls), make_batch()
    output = resolve_output("loss")
    names = [n for n, _ in module.named_parameters()][::-1]       # any order: the features follow it
    exact = make_projector("identity", module, output, names, proj_dim=1, seed=0)
    assert exact.engine.rest == [] and exact.proj_dim == sum(p.numel() for p in module.parameters())
    torch.testing.assert_close(exact(batch), PerExampleGradients(module, output, names)(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_ekfac_factors_of_every_layer_against_per_example_gradients(case):
    """EK-FAC (empirical Fisher) on the engine: per layer, Lambda = mean_i (U_S^T G_i U_A)^2 with G_i the torch.func
    per-example gradient; norm layers' U_S diagonalizes sum_i g_i g_i^T (exact block); apply = Q diag(1/(Lambda+lam)) Q^T."""
    from lightning_attrib.core.methods.ekfac import EKFAC

    cls, make_batch = CASES[case]
    module, batch = _model(cls), make_batch()
    output = resolve_output("loss")
    names = [n for n, _ in module.named_parameters()]
    p = sum(q.numel() for q in module.parameters())
    ek = EKFAC(module, names, output, "empirical_fisher")
    n = len(batch[1])
    ek.fit(lambda: [batch], lambda t: t, n, torch.zeros(p, dtype=torch.float64))
    ref = _reference_grads(module, output, names, batch)
    kinds = set()
    for b in ek.blocks:
        kinds.add(b.layer.kind)
        G = b.layer.to_matrix([ref[q] for q in b.layer.param_names])
        hat = b.U_S.T @ G @ b.U_A
        torch.testing.assert_close(b.Lambda, (hat ** 2).mean(0), rtol=1e-6, atol=1e-10, msg=b.name)
        if b.layer.kind == "norm":
            S = torch.einsum("bi,bj->ij", G[:, :, 0], G[:, :, 0])
            off = b.U_S.T @ S @ b.U_S
            assert (off - torch.diag(off.diagonal())).abs().max() <= 1e-6 * S.abs().max()
    assert {"norm", "mha", "linear"} <= kinds
    flat = torch.cat([ref[q].reshape(n, -1) for q in names], dim=1)
    out = ek.apply(flat, 0.1)
    for b in ek.blocks:
        G = b.matrix(flat)
        want = b.U_S @ ((b.U_S.T @ G @ b.U_A) / (b.Lambda + 0.1)) @ b.U_A.T
        torch.testing.assert_close(b.matrix(out), want)


def test_on_grad_hooks_see_the_terms_of_an_ordinary_backward():
    """What GradientCapture needs: terms delivered from the user's own loss.backward() (no extra backward)."""
    module, batch = _model(_ImageNet), _image_batch()
    output = resolve_output("loss")
    engine = LayerEngine(module, [n for n, _ in module.named_parameters()])
    seen = {}
    with engine.recording(on_grad=lambda layer, terms: seen.setdefault(layer.name, []).extend(terms)):
        output(module, batch).sum().backward()
    ref = _reference_grads(module, output, [n for n, _ in module.named_parameters()], batch)
    for layer in engine.layers:
        G = sum(t.gradient(layer.d_out) for t in seen[layer.name])
        torch.testing.assert_close(G, layer.to_matrix([ref[n] for n in layer.param_names]), msg=layer.name)


class Conv1D(nn.Module):
    """A stand-in with the layout of HuggingFace GPT-2's Conv1D (recognized by class name and attributes)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


@pytest.mark.parametrize("kind", ["tensorsketch", "factorized", "identity"])
def test_gpt2_style_conv1d_is_hooked_with_its_transposed_layout(kind):
    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)).double()
    def output(m, b):   # 3 positions per example, pooled
        return F.cross_entropy(m(b[0]).mean(1), b[1], reduction="none")

    batch = (torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    proj = make_projector(kind, net, output, None, proj_dim=24, seed=1)
    assert [la.kind for la in proj.engine.layers] == ["hf_conv1d", "hf_conv1d"] and proj.engine.rest == []
    if kind == "identity":
        torch.testing.assert_close(proj(batch), PerExampleGradients(net, output)(batch), rtol=1e-5, atol=1e-6)
    else:
        ref = _explicit(proj, net, output, batch)
        torch.testing.assert_close(proj(batch).double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_a_layer_fed_sequence_first_outside_transformer_layers_is_refused_not_misread():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):                        # (B, L, 4) -> the Linear sees (L, B, 4)
            return self.fc(x.transpose(0, 1)).mean(0)

    proj = make_projector("tensorsketch", SeqFirst().double(), resolve_output("loss"), None, proj_dim=8, seed=0)
    with pytest.raises(ValueError, match="not the batch"):
        proj((torch.randn(5, 7, 4, dtype=torch.float64), torch.randint(0, 3, (5,))))


class _ConvNet(nn.Module):
    """Convolutions on every `ConvTerm` path: stride 1 with >= 64 patch features (shifted windows: plain, dilated with
    reflect padding, no bias, a Conv1d), and a strided one (unfold)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)                                         # 72 patch features
        self.c2 = nn.Conv2d(6, 5, (3, 4), dilation=(2, 1), padding=(2, 1), padding_mode="reflect", bias=False)
        self.c3 = nn.Conv2d(5, 4, 2, stride=2)                                          # strided: unfold
        self.c4 = nn.Conv1d(16, 3, 5, padding=2)                                        # 80 patch features
        self.head = nn.Linear(4 * 3 * 2 + 3 * 5, 3)

    def forward(self, x):
        h = self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x)))))                        # (B, 4, 3, 2)
        s = self.c4(x.flatten(2)[:, :, :10].reshape(x.shape[0], 16, 5))                # (B, 3, 5)
        return self.head(torch.cat([h.flatten(1), s.flatten(1)], 1))


def test_conv_terms_shifted_windows_and_conv_projection_equal_per_example_gradients():
    """`ConvTerm.gradient_blocks` (shifted windows / unfold) assembles G exactly; `in_times` (a convolution with the
    matrix as kernel) equals the unfolded patches times the matrix; both sketches equal the explicit projection."""
    torch.manual_seed(0)
    module = _ConvNet().double()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(5, 8, 7, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
    output = resolve_output("loss")
    names = [n for n, _ in module.named_parameters()]
    engine = LayerEngine(module, names)
    assert {la.name: la.kind for la in engine.layers if la.name != "head"} == {
        "c1": "conv2d", "c2": "conv2d", "c3": "conv2d", "c4": "conv1d"}
    _, records = engine.run(output, batch)
    ref = _reference_grads(module, output, names, batch)
    for layer, terms in records:
        (t,) = terms
        mat = torch.randn(layer.d_in, 7, generator=g, dtype=torch.float64)
        if layer.kind.startswith("conv"):
            plain = t.in_times(mat)                     # the convolution, before `a` is ever unfolded
            assert t._a is None, layer.name
            torch.testing.assert_close(plain, t.a @ mat, msg=layer.name)
        expected = layer.to_matrix([ref[n] for n in layer.param_names])
        G = torch.zeros_like(expected)
        covered = torch.zeros(layer.d_in, dtype=torch.int64)
        for cols, block in t.gradient_blocks():
            G[:, :, cols] += block.transpose(1, 2)
            covered[cols] += 1
        assert (covered == 1).all(), layer.name   # the blocks tile the columns of G exactly once
        torch.testing.assert_close(G, expected, rtol=1e-6, atol=1e-8, msg=layer.name)   # float32 reference
    for kind in ("tensorsketch", "factorized"):
        proj = make_projector(kind, module, output, None, proj_dim=64, seed=1)
        feats = proj(batch).double()
        ref_feats = _explicit(proj, module, output, batch)
        torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-6 * ref_feats.abs().max().item(), msg=kind)

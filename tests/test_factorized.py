"""Kronecker-factorized projection (issue #8): exactness against explicit P_out (x) P_in, seeds, plan, pipeline."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor, RandomProjector
from lightning_attrib.core.factorized import FactorizedProjector, derived_seed, plan_layer, water_fill
from lightning_attrib.core.gradients import PerExampleGradients
from lightning_attrib.core.outputs import resolve_output
from lightning_attrib.data import load_digits_tensors


class _Net(nn.Module):
    """Every path: Conv2d via unfold, LayerNorm (dense fallback), a Linear over 3 positions without bias,
    an in-place ReLU right after a hooked Linear, and a classifier head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.ln = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 5)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.ln(torch.relu(self.conv(x)).flatten(1))          # (B, 12)
        h = self.act(self.fc(h))                                    # in-place on fc's output
        seq = torch.stack([h, 2 * h, -h + 0.3], dim=1)              # (B, 3 positions, 5)
        return self.head(torch.tanh(self.fc2(seq)).flatten(1))      # (B, 3)


def _net_and_batch(n=7):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return _Net().double(), (x, y)


def _explicit_features(fp: FactorizedProjector, module, output, batch):
    """Explicit per-example gradients (torch.func) times explicit kron(P_out, P_in) per layer + dense fallback."""
    names = [n for layer in fp.layers for n in layer.param_names] + fp.fallback.param_names
    grads = PerExampleGradients(module, output, names)(batch).double()
    params = dict(module.named_parameters())
    n, off, cols = grads.shape[0], 0, []
    for layer in fp.layers:
        numel = params[layer.param_names[0]].numel()
        g = grads[:, off:off + numel].reshape(n, layer.d_out, -1)
        off += numel
        if layer.has_bias:  # G = [dW | db]: the bias is the input column of ones
            g = torch.cat([g, grads[:, off:off + layer.d_out, None]], dim=2)
            off += layer.d_out
        p_out = fp.factor(layer, "out", torch.float64)
        p_in = fp.factor(layer, "in", torch.float64)
        p_out = torch.eye(layer.d_out, dtype=torch.float64) if p_out is None else p_out
        p_in = torch.eye(layer.d_in, dtype=torch.float64) if p_in is None else p_in
        kron = torch.kron(p_out, p_in)[:, :layer.dim] * layer.scale  # rows: row-major vec(G)
        cols.append(g.reshape(n, -1) @ kron)
    if fp.fallback.dim:
        rest = grads[:, off:]
        if fp.fallback.dim == fp.fallback.numel:
            cols.append(rest)
        else:
            mat = RandomProjector(fp.fallback.numel, fp.fallback.dim, seed=derived_seed(fp.seed, "fallback")).matrix()
            cols.append(rest @ mat.double())
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("k", [40, 100, 10_000])
def test_features_equal_explicit_kronecker_projection(k):
    module, batch = _net_and_batch()
    output = resolve_output("margin")
    fp = FactorizedProjector(module, output, proj_dim=k, seed=3)
    assert [layer.name for layer in fp.layers] == ["conv", "fc", "fc2", "head"]
    assert fp.fallback.param_names == ["ln.weight", "ln.bias"]
    assert [layer.has_bias for layer in fp.layers] == [True, True, False, True]
    num_params = sum(p.numel() for p in module.parameters())
    assert fp.proj_dim == min(k, num_params)  # 205 parameters: k=10000 keeps every block exact
    feats = fp.features(batch)
    assert feats.shape == (7, fp.proj_dim) and feats.dtype == torch.float32
    ref = _explicit_features(fp, module, output, batch)
    torch.testing.assert_close(feats.double(), ref, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in module.parameters())  # no side effect on .grad
    if k == 10_000:
        exact = PerExampleGradients(module, output, [n for layer in fp.layers for n in layer.param_names])(batch)
        assert torch.linalg.matrix_rank(feats[:, :-24].double()) == torch.linalg.matrix_rank(exact.double())


def test_plan_at_k100_keeps_small_sides_exact():
    module, _ = _net_and_batch()
    fp = FactorizedProjector(module, resolve_output("margin"), proj_dim=100, seed=3)
    plan = {la.name: (la.d_out, la.d_in, la.k_out, la.out_identity, la.k_in, la.in_identity, la.dim) for la in fp.layers}
    assert plan == {"conv": (3, 19, 3, True, 6, False, 18), "fc": (5, 13, 4, False, 5, False, 20),
                    "fc2": (4, 5, 4, True, 5, True, 20), "head": (3, 13, 3, True, 6, False, 18)}
    assert fp.fallback.dim == 24 and fp.proj_dim == 100


def test_mnist_mlp_split_is_exact():
    mlp = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    out = resolve_output("margin")
    fp = FactorizedProjector(mlp, out, proj_dim=2048)
    assert [(la.k_out, la.k_in, la.dim) for la in fp.layers] == [(26, 27, 685), (26, 27, 683), (10, 68, 680)]
    assert fp.layers[2].out_identity and fp.proj_dim == 2048
    fp = FactorizedProjector(mlp, out, proj_dim=8192)
    assert [(la.k_out, la.k_in, la.dim) for la in fp.layers] == [(53, 54, 2811), (53, 54, 2811), (10, 257, 2570)]
    assert fp.proj_dim == 8192
    fp = FactorizedProjector(mlp, out, proj_dim=8192, allocation="params")
    assert fp.proj_dim == 8192 and [la.dim for la in fp.layers] == [6113, 2001, 78]  # ~ k * numel share
    # bias only (weights frozen out of the selection): every selected parameter goes through the dense fallback
    fp = FactorizedProjector(mlp, out, ["0.bias", "4.bias"], proj_dim=100)
    assert fp.layers == [] and fp.fallback.numel == 266 and fp.proj_dim == 100


def test_water_fill_and_plan_layer():
    assert water_fill(100, [10, 1000, 1000], [1, 1, 1]) == [10, 45, 45]
    assert sum(water_fill(2048, [201_000, 65_000, 2570], [1, 1, 1])) == 2048
    assert water_fill(10, [3, 4], [1, 1]) == [3, 4]
    assert plan_layer(10, 257, 682, exact=False) == (10, True, 68, False, 680)
    assert plan_layer(10, 257, 682, exact=True) == (10, False, 69, False, 682)  # random 10x10 side, truncated grid
    k_out, _, k_in, _, dim = plan_layer(256, 785, 685, exact=True)
    assert (k_out, k_in, dim) == (26, 27, 685)


def test_deterministic_by_seed_and_batch_independent():
    module, (x, y) = _net_and_batch()
    output = resolve_output("margin")
    module.train()
    a = FactorizedProjector(module, output, proj_dim=60, seed=5).features((x, y))
    b = FactorizedProjector(module, output, proj_dim=60, seed=5).features((x, y))
    assert torch.equal(a, b)
    assert module.training  # mode restored
    split = torch.cat([FactorizedProjector(module, output, proj_dim=60, seed=5).features((x[:3], y[:3])),
                       FactorizedProjector(module, output, proj_dim=60, seed=5).features((x[3:], y[3:]))])
    torch.testing.assert_close(split, a, rtol=1e-6, atol=1e-7)
    c = FactorizedProjector(module, output, proj_dim=60, seed=6).features((x, y))
    assert not torch.allclose(a, c)


# -- pipeline --------------------------------------------------------------------------------------
def _digits_mlp():
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, qu = perm[:400], perm[400:440]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-2)
    for _ in range(50):  # full batch: 93% query accuracy
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[tr]), y[tr]).backward()
        opt.step()
    return model, TensorDataset(x[tr], y[tr]), TensorDataset(x[qu], y[qu])


def test_attributor_factorized_agrees_with_dense(tmp_path):
    model, train, query = _digits_mlp()
    k = 512
    kw = dict(proj_dim=k, seed=0, batch_size=100, shard_size=200)
    dense = Attributor(model, TRAK(), train, query, tmp_path / "dense", **kw).run()
    fact = Attributor(model, TRAK(), train, query, tmp_path / "fact", projector="factorized", **kw).run()
    s_d, s_f = np.asarray(dense.scores), np.asarray(fact.scores)
    assert s_f.shape == (400, 40)
    pearson = np.mean([np.corrcoef(s_d[:, q], s_f[:, q])[0, 1] for q in range(40)])
    top10 = np.mean([len(set(np.argsort(-s_d[:, q])[:10]) & set(np.argsort(-s_f[:, q])[:10])) / 10 for q in range(40)])
    rho = spearmanr(dense.self_influence, fact.self_influence).correlation
    print(f"factorized vs dense at k={k}: scores Pearson {pearson:.3f}, top-10 overlap {top10:.2f}, "
          f"self-influence Spearman {rho:.4f}")
    assert pearson > 0.8 and top10 > 0.6 and rho > 0.99
    manifest = json.loads((tmp_path / "fact" / "manifest.json").read_text())
    assert manifest["projector"] == "factorized" and manifest["proj_dim"] == k
    # the store remembers the projector: reusing the dense out_dir with the factorized projector recomputes
    with pytest.warns(RuntimeWarning, match="projector"):
        again = Attributor(model, TRAK(), train, query, tmp_path / "dense", projector="factorized", **kw).run()
    np.testing.assert_array_equal(np.asarray(again.scores), s_f)

"""Tensor-sketch projection (`projector="tensorsketch"`, issue #8): exactness against its explicit count-sketch
matrix, seeds, Gram fidelity against dense and Kronecker projections, and leave-one-out fidelity of TRAK."""
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor, RandomProjector, Snapshot
from lightning_attrib.core.factorized import FactorizedProjector, derived_seed
from lightning_attrib.core.sketch import TensorSketchProjector
from lightning_attrib.core.gradients import PerExampleGradients
from lightning_attrib.core.outputs import resolve_output
from lightning_attrib.data import load_digits_tensors
from lightning_attrib.testing import digits_problem, leave_one_out, mean_pearson, train_mlp
from tests.test_factorized import _net_and_batch


def _explicit_tensor_features(fp: FactorizedProjector, module, output, batch) -> torch.Tensor:
    """Sum over layers of vec(G_layer) @ explicit count-sketch matrix, plus the fallback's dense projection."""
    names = [n for layer in fp.layers for n in layer.param_names] + fp.fallback.param_names
    grads = PerExampleGradients(module, output, names)(batch).double()
    params = dict(module.named_parameters())
    n, off, total = grads.shape[0], 0, 0
    for layer in fp.layers:
        numel = params[layer.param_names[0]].numel()
        g = grads[:, off:off + numel].reshape(n, layer.d_out, -1)
        off += numel
        if layer.has_bias:
            g = torch.cat([g, grads[:, off:off + layer.d_out, None]], dim=2)
            off += layer.d_out
        total = total + g.reshape(n, -1) @ fp.layer_matrix(layer)
    if fp.fallback.numel:
        mat = RandomProjector(fp.fallback.numel, fp.fallback.dim, seed=derived_seed(fp.seed, "fallback")).matrix()
        total = total + grads[:, off:] @ mat.double()
    return total


@pytest.mark.parametrize("path", ["fft", "gradient"])
@pytest.mark.parametrize("k", [40, 100, 10_000])
def test_features_equal_explicit_count_sketch(k, path, monkeypatch):
    """Both ways of computing a layer's sketch (FFT of the sides' count sketches, or the per-example gradient
    scattered with the pair hash) equal vec(G) @ the explicit count-sketch matrix."""
    monkeypatch.setattr(TensorSketchProjector, "_via_gradient", staticmethod(lambda layer, positions: path == "gradient"))
    module, batch = _net_and_batch()  # conv, LayerNorm fallback, a Linear over 3 positions, in-place ReLU, head
    output = resolve_output("margin")
    fp = FactorizedProjector(module, output, proj_dim=k, seed=3, sketch="tensor")
    feats = fp.features(batch).double()
    ref = _explicit_tensor_features(fp, module, output, batch)
    assert feats.shape == (7, k) and fp.proj_dim == k
    assert torch.allclose(feats, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_count_sketch_matrix_is_a_signed_hash_of_pairs():
    module, _ = _net_and_batch()
    fp = FactorizedProjector(module, resolve_output("margin"), proj_dim=50, seed=1, sketch="tensor")
    layer = fp.layers[0]
    mat = fp.layer_matrix(layer)
    assert torch.equal((mat != 0).sum(dim=1), torch.ones(layer.numel, dtype=torch.long))  # one +-1 per coordinate
    h_out, _ = fp.count_sketch(layer, "out")
    h_in, _ = fp.count_sketch(layer, "in")
    assert int(mat[0].nonzero()) == int(h_out[0] + h_in[0]) % 50


def test_deterministic_by_seed_and_batch_size():
    module, (x, y) = _net_and_batch(n=9)
    output = resolve_output("margin")
    a = FactorizedProjector(module, output, proj_dim=64, seed=5, sketch="tensor").features((x, y))
    b = torch.cat([FactorizedProjector(module, output, proj_dim=64, seed=5, sketch="tensor").features((x[i:i + 4], y[i:i + 4]))
                   for i in range(0, 9, 4)])
    c = FactorizedProjector(module, output, proj_dim=64, seed=6, sketch="tensor").features((x, y))
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)


def _gram_corr(feats: torch.Tensor, exact_gram: torch.Tensor) -> float:
    iu = torch.triu_indices(len(feats), len(feats), 1)
    est = (feats.double() @ feats.double().T)[iu[0], iu[1]]
    return float(np.corrcoef(est.numpy(), exact_gram[iu[0], iu[1]].numpy())[0, 1])


def test_gram_fidelity_close_to_dense_and_above_kronecker():
    """Inner products of projected gradients vs exact ones on a trained digits MLP (64-32-32-10, 2,506 params),
    k = 256, averaged over 3 seeds: the tensor sketch is within 0.03 of a dense Rademacher projection, and
    clearly above the Kronecker sketch (whose estimate is a product of two ~sqrt(k)-dim JL estimates)."""
    x, y = load_digits_tensors()
    x, y = x[:400], y[:400]
    model = train_mlp(x[:300], y[:300], hidden=32)
    output = resolve_output("margin")
    grads = PerExampleGradients(model, output)((x[300:], y[300:])).double()
    exact = grads @ grads.T
    corr = {"dense": [], "kronecker": [], "tensor": []}
    for seed in range(3):
        corr["dense"].append(_gram_corr(RandomProjector(grads.shape[1], 256, seed=seed)(grads.float()), exact))
        for sketch in ("kronecker", "tensor"):
            fp = FactorizedProjector(model, output, proj_dim=256, seed=seed, sketch=sketch)
            corr[sketch].append(_gram_corr(fp.features((x[300:], y[300:])), exact))
    mean = {k: float(np.mean(v)) for k, v in corr.items()}
    print("gram corr k=256:", mean)
    assert mean["tensor"] >= mean["dense"] - 0.03
    assert mean["tensor"] >= mean["kronecker"] + 0.03


@pytest.mark.parametrize("projector", ["rademacher", "tensorsketch"])
def test_trak_tensorsketch_predicts_leave_one_out(tmp_path, projector):
    """10-class digits logistic regression (650 params) at k = 256 < p: TRAK's LOO fidelity with the tensor sketch
    is at the level of the dense projection (bars from the measured values, see the test's output)."""
    problem = digits_problem(n_train=300, n_query=10)
    removals = np.arange(0, 300, 10)
    full, effects = leave_one_out(problem, removals)
    rs = []
    for seed in range(2):
        res = Attributor(full, TRAK(), TensorDataset(problem.x_train, problem.y_train),
                         TensorDataset(problem.x_query, problem.y_query), tmp_path / f"{projector}{seed}",
                         proj_dim=256, projector=projector, seed=seed).run([Snapshot("final", full.state_dict())])
        rs.append(mean_pearson(np.asarray(res.scores)[removals], effects))
    print(projector, "LOO Pearson per seed:", rs)
    assert np.mean(rs) >= 0.7

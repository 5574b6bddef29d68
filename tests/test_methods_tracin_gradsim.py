"""TracIn, gradient dot product and gradient cosine against brute-force autograd references; the method registry."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import Attributor, RandomProjector, Snapshot
from lightning_attrib.core.io import derive_seed
from lightning_attrib.core.methods import (TRAK, GradientCosine, GradientDot, InfluenceFunction, TracIn, make_method)
from lightning_attrib.data import flip_labels
from lightning_attrib.testing import digits_problem





def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (13,), generator=g)
    xq, yq = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    base = tiny_mlp().state_dict()
    states = [{k: v + 0.3 * s * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for s in range(3)]
    return x, y, xq, yq, states


def loss_grads(state, x, y):
    """(n, p) per-example loss gradients by an explicit autograd loop."""
    m = tiny_mlp()
    m.load_state_dict(state)
    rows = []
    for i in range(len(x)):
        m.zero_grad()
        nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    return torch.stack(rows)


def attribute(method, tiny, tmp_path, snapshots, **kw):
    x, y, xq, yq, _ = tiny
    kw.setdefault("projector", "identity")
    return Attributor(tiny_mlp(), method, TensorDataset(x, y), TensorDataset(xq, yq), tmp_path, batch_size=5,
                      shard_size=6, **kw).run(snapshots)


def test_tracin_equals_bruteforce_sum_over_checkpoints(tiny, tmp_path):
    x, y, xq, yq, states = tiny
    lrs = [0.5, 0.1, 0.02]
    snaps = [Snapshot(f"epoch{c}", state_dict=s, lr=lr) for c, (s, lr) in enumerate(zip(states, lrs))]
    res = attribute(TracIn(), tiny, tmp_path / "a", snaps)
    ref = sum(lr * loss_grads(s, x, y) @ loss_grads(s, xq, yq).T for s, lr in zip(states, lrs))
    self_ref = sum(lr * (loss_grads(s, x, y) ** 2).sum(1) for s, lr in zip(states, lrs))
    np.testing.assert_allclose(res.scores, ref.numpy(), rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    np.testing.assert_allclose(res.self_influence, self_ref.numpy(), rtol=1e-5)
    assert res.manifest["lr"] == lrs and res.manifest["method"] == "tracin"

    # explicit lr overrides the recorded one; with a random projection the features are P^T g
    res2 = attribute(TracIn(lr=[1.0, 2.0, 3.0]), tiny, tmp_path / "b", snaps, projector="gaussian", proj_dim=8, seed=4)
    n_params = sum(p.numel() for p in tiny_mlp().parameters())
    Ps = [RandomProjector(n_params, 8, "gaussian", seed=derive_seed(4, s.name)).matrix().double() for s in snaps]
    ref2 = sum(lr * (loss_grads(s, x, y) @ P) @ (loss_grads(s, xq, yq) @ P).T
               for s, lr, P in zip(states, [1.0, 2.0, 3.0], Ps))  # each snapshot has its own projection
    np.testing.assert_allclose(res2.scores, ref2.numpy(), rtol=1e-4, atol=1e-5 * ref2.abs().max().item())


def test_tracin_without_learning_rate_is_a_clear_error(tiny, tmp_path):
    _, _, _, _, states = tiny
    snaps = [Snapshot("a", state_dict=states[0], lr=0.1), Snapshot("b", state_dict=states[1])]
    with pytest.raises(ValueError, match=r"\['b'\].*TracIn\(lr=\.\.\.\)"):
        attribute(TracIn(), tiny, tmp_path, snaps)
    with pytest.raises(ValueError, match="one per snapshot"):
        attribute(TracIn(lr=[0.1]), tiny, tmp_path / "c", snaps)
    res = attribute(TracIn(lr=0.1), tiny, tmp_path / "d", snaps)
    assert res.manifest["lr"] == [0.1, 0.1]


def test_gradient_dot_and_cosine_equal_bruteforce_at_the_final_weights(tiny, tmp_path):
    x, y, xq, yq, states = tiny
    snaps = [Snapshot(f"s{c}", state_dict=s) for c, s in enumerate(states)]
    g, gq = loss_grads(states[-1], x, y), loss_grads(states[-1], xq, yq)   # "last" policy: final weights only
    dot = attribute(GradientDot(), tiny, tmp_path / "dot", snaps)
    np.testing.assert_allclose(dot.scores, (g @ gq.T).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dot.self_influence, (g * g).sum(1).numpy(), rtol=1e-5)
    assert [s["name"] for s in dot.manifest["snapshots"]] == ["s2"]

    cos = attribute(GradientCosine(), tiny, tmp_path / "cos", snaps)
    gn, gqn = g / g.norm(dim=1, keepdim=True), gq / gq.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(cos.scores, (gn @ gqn.T).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cos.self_influence, 1.0, rtol=1e-6)     # constant by construction
    assert cos.manifest["constant_self_influence"] is True and cos.manifest["method"] == "grad-cos"


@pytest.fixture(scope="module")
def noisy_trajectory():
    """Noisy digits LR trained by full-batch gradient descent, with checkpoints (and their lr) along the way."""
    base = digits_problem(n_train=200)
    labels, flipped = flip_labels(base.y_train.numpy(), 0.1, 10, seed=1)
    problem = dataclasses.replace(base, y_train=torch.from_numpy(labels))
    model = nn.Linear(64, 10).double()
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snaps = []
    for epoch in range(1, 61):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(problem.x_train), problem.y_train)
         + 0.5e-2 * model.weight.pow(2).sum()).backward()
        opt.step()
        if epoch % 20 == 0:
            snaps.append(Snapshot(f"epoch{epoch}", state_dict={k: v.clone() for k, v in model.state_dict().items()},
                                  lr=0.5, epoch=epoch))
    return problem, model, snaps, flipped


@pytest.mark.parametrize("method", [TracIn(), GradientDot(), GradientCosine()], ids=["tracin", "grad-dot", "grad-cos"])
def test_self_influence_finds_flipped_labels(noisy_trajectory, tmp_path, method):
    problem, model, snaps, flipped = noisy_trajectory
    res = Attributor(model, method, TensorDataset(problem.x_train, problem.y_train),
                     TensorDataset(problem.x_query, problem.y_query), tmp_path, projector="identity").run(snaps)
    if method.constant_self_influence:
        assert np.ptp(res.self_influence) < 1e-5 and res.self_influence[0] == pytest.approx(1.0, abs=1e-5)
        return
    auc = roc_auc_score(flipped, res.self_influence)
    print(f"\nflipped-label AUROC {method.name}: {auc:.3f}")
    assert auc > 0.7


def test_registry_builds_every_method_by_name():
    assert isinstance(make_method("trak"), TRAK)
    assert isinstance(make_method("tracin", lr=0.1), TracIn)
    assert isinstance(make_method("grad-dot"), GradientDot)
    assert isinstance(make_method("grad-cos"), GradientCosine)
    m = make_method("influence", solver="cg", damping=1e-3)
    assert isinstance(m, InfluenceFunction) and m.solver == "cg" and m.needs_kernel is False
    assert make_method("influence", solver="projected").needs_kernel is True
    with pytest.raises(ValueError, match="unknown attribution method"):
        make_method("influnce")
    with pytest.raises(TypeError, match="bad arguments for method 'tracin'"):
        make_method("tracin", damping=1.0)
    with pytest.raises(ValueError, match="positive"):
        TracIn(lr=-1.0)

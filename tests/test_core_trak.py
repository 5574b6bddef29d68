"""TRAK against a brute-force float64 reference and against exact leave-one-out retraining."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor, RandomProjector, Snapshot
from lightning_attrib.core.io import derive_seed
from lightning_attrib.core.outputs import margin_from_logits
from lightning_attrib.testing import digits_problem, leave_one_out, mean_pearson


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def brute_force_trak(module, snapshots, x_tr, y_tr, x_q, y_q, projs, damping_ratio):
    """Explicit per-example margin gradients (autograd loop, float64), explicit P per snapshot, explicit solve."""
    total, q_acc = 0, 0
    for sd, proj in zip(snapshots, projs):
        p_mat = proj.matrix().double()
        m = tiny_mlp().double()
        m.load_state_dict({k: v.double() for k, v in sd.items()})

        def feats(x, y):
            rows = []
            for i in range(len(x)):
                m.zero_grad()
                margin_from_logits(m(x[i:i + 1].double()), y[i:i + 1]).sum().backward()
                rows.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
            return torch.stack(rows) @ p_mat

        phi, phi_q = feats(x_tr, y_tr), feats(x_q, y_q)
        kernel = phi.T @ phi
        lam = damping_ratio * torch.trace(kernel) / kernel.shape[0]
        total = total + phi @ torch.linalg.solve(kernel + lam * torch.eye(kernel.shape[0], dtype=torch.float64), phi_q.T)
        with torch.no_grad():
            p = torch.softmax(m(x_tr.double()), -1).gather(1, y_tr.view(-1, 1)).squeeze(1)
        q_acc = q_acc + (1 - p)
    n = len(snapshots)
    return ((q_acc / n)[:, None] * total / n).numpy()


def test_trak_equals_bruteforce_reference(tmp_path):
    g = torch.Generator().manual_seed(0)
    x_tr, y_tr = torch.randn(37, 5, generator=g), torch.randint(0, 3, (37,), generator=g)
    x_q, y_q = torch.randn(9, 5, generator=g), torch.randint(0, 3, (9,), generator=g)
    module = tiny_mlp()
    snaps = []
    for s in range(2):  # two different weight snapshots
        sd = {k: v + 0.1 * s * torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}
        snaps.append(Snapshot(f"s{s}", state_dict=sd))
    module = tiny_mlp().double()  # float64 module: gradients in float64, features stored float32
    k = 16
    # score_dtype="float64": the train x query matmul in float64 too, so 1e-6 (float32 storage) is a fair bar
    res = Attributor(module, TRAK(damping_ratio=0.05), TensorDataset(x_tr.double(), y_tr), TensorDataset(x_q.double(), y_q),
                     tmp_path, proj_dim=k, projector="rademacher", seed=3, batch_size=8, shard_size=10,
                     score_dtype="float64").run(
        [Snapshot(s.name, state_dict={k2: v.double() for k2, v in s.state_dict.items()}) for s in snaps])
    n_params = sum(p.numel() for p in module.parameters())
    projs = [RandomProjector(n_params, k, seed=derive_seed(3, s.name)) for s in snaps]
    ref = brute_force_trak(module, [s.state_dict for s in snaps], x_tr, y_tr, x_q, y_q, projs, 0.05)
    rel = np.abs(np.asarray(res.scores) - ref).max() / np.abs(ref).max()
    assert rel < 1e-6, rel
    # self-influence is the diagonal of the same bilinear form on the training set itself
    assert res.self_influence.shape == (37,)
    assert np.all(res.self_influence > 0)
    assert res.manifest["damping"] and len(res.manifest["damping"]) == 2


@pytest.mark.parametrize("classes,bar", [((3, 8), 0.8), (None, 0.65)], ids=["binary", "10-class"])
def test_trak_default_damping_predicts_leave_one_out(tmp_path, classes, bar):
    problem = digits_problem(n_train=300, n_query=10, classes=classes)
    removals = np.random.default_rng(1).choice(300, 40, replace=False)
    full, effects = leave_one_out(problem, removals)
    res = Attributor(full, TRAK(), TensorDataset(problem.x_train, problem.y_train),
                     TensorDataset(problem.x_query, problem.y_query), tmp_path, proj_dim=1024).run()
    r = mean_pearson(np.asarray(res.scores)[removals], effects)
    print(f"LOO mean Pearson ({'binary' if classes else '10-class'}), default damping: {r:.3f}")
    assert r >= bar
    # lambda = 0 is what the default protects against: markedly worse on the rank-deficient 10-class kernel
    if classes is None:
        res0 = Attributor(full, TRAK(damping=0.0), TensorDataset(problem.x_train, problem.y_train),
                          TensorDataset(problem.x_query, problem.y_query), tmp_path / "lam0", proj_dim=1024)
        with pytest.warns(UserWarning):
            r0 = mean_pearson(np.asarray(res0.run().scores)[removals], effects)
        assert r0 < r - 0.3

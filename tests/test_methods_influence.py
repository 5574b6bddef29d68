"""Influence functions (explicit / cg / lissa / ekfac / projected) against exact leave-one-out retraining.

Ground truth: the L2-regularized 10-class logistic regression of `lightning_attrib.testing` on digits (300 train,
10 queries, l2=1e-2 on the weights, bias unregularized). Scores go through the whole pipeline
(`Attributor(..., projector="identity").run()`), and are compared by Pearson correlation with the exact change of
each query's loss when one training example is removed and the model retrained to its (unique) optimum:
score(i, q) ~ loss_q(without i) - loss_q(all) (positive = i helps q), so we correlate with -effects of
`leave_one_out(..., measure=query_losses)`.

`testing.leave_one_out` retrains with L-BFGS to max_iter (~2 s per removal here), too slow for 40 removals within
the test budget, so `exact_loo` below retrains the same objective with Newton-type steps to a gradient of 1e-13
(the same optimum), and `test_exact_loo_agrees_with_testing_leave_one_out` checks it against `leave_one_out`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import Attributor, Snapshot, load_results
from lightning_attrib.core.methods import InfluenceFunction, make_method
from lightning_attrib.core.methods.influence import DEFAULT_DAMPING_RATIO
from lightning_attrib.testing import digits_problem, leave_one_out, mean_pearson, query_losses, train_logreg

L2 = 1e-2
WD = {"weight": L2}          # the model's L2 term: weights only, as in testing.train_logreg
N_REMOVALS = 40
# Test-speed settings for the iterative solvers (one curvature batch = the whole 300-example training set).
CG = dict(solver="cg", batch_size=300, rhs_chunk=512, cg_tol=1e-6)
LISSA = dict(solver="lissa", batch_size=300, rhs_chunk=512, lissa_depth=100, lissa_batch_size=32)





def _aug(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)


def ggn_blocks(problem, W: torch.Tensor) -> torch.Tensor:
    """(C*(d+1), C*(d+1)) mean GGN (= Hessian of the mean CE) of an LR with augmented weights W (C, d+1)."""
    x = _aug(problem.x_train)
    n, C = len(x), W.shape[0]
    P = torch.softmax(x @ W.T, dim=-1)
    diag = torch.block_diag(*[(x * P[:, c:c + 1]).T @ x for c in range(C)])
    U = (P[:, :, None] * x[:, None, :]).reshape(n, -1)
    return (diag - U.T @ U) / n


def exact_loo(problem, full: nn.Linear, removals) -> np.ndarray:
    """effects[j, q] = loss_q(full) - loss_q(retrained without removals[j]), retrained to the exact optimum."""
    x, y = _aug(problem.x_train), problem.y_train
    C, d, n = problem.num_classes, x.shape[1], len(y)
    Y = nn.functional.one_hot(y, C).double()
    reg = torch.full((C, d), problem.l2, dtype=torch.float64)
    reg[:, -1] = 0
    W0 = torch.cat([full.weight.detach(), full.bias.detach()[:, None]], dim=1)
    H = ggn_blocks(problem, W0) + torch.diag(reg.flatten())
    precond = torch.linalg.pinv(H, hermitian=True, rtol=1e-12)   # the bias-sum direction is exactly flat
    xq = _aug(problem.x_query)

    def qloss(W):
        return nn.functional.cross_entropy(xq @ W.T, problem.y_query, reduction="none")

    out = []
    for i in removals:
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        W = W0.clone()
        for _ in range(100):
            g = (torch.softmax(x[keep] @ W.T, -1) - Y[keep]).T @ x[keep] / keep.sum() + reg * W
            if g.abs().max() < 1e-13:
                break
            W = W - (precond @ g.flatten()).view(C, d)
        else:
            raise AssertionError("LOO retraining did not converge")
        out.append((qloss(W0) - qloss(W)).numpy())
    return np.array(out)


def run(model, method, problem, tmp_path, snapshots=None, **kw):
    train = TensorDataset(problem.x_train, problem.y_train)
    query = TensorDataset(problem.x_query, problem.y_query)
    kw.setdefault("projector", "identity")
    return Attributor(model, method, train, query, tmp_path, **kw).run(snapshots)


@pytest.fixture(scope="module")
def loo():
    problem = digits_problem()
    full = train_logreg(problem)
    removals = np.random.default_rng(0).choice(len(problem.y_train), N_REMOVALS, replace=False)
    return problem, full, removals, exact_loo(problem, full, removals)


@pytest.fixture(scope="module")
def results(loo, tmp_path_factory):
    """Lazily computed (result, method) per solver on the LOO problem, shared by the tests of this module."""
    problem, full, _, _ = loo
    cache = {}
    settings = {"explicit": dict(solver="explicit"), "cg": CG, "lissa": LISSA, "ekfac": dict(solver="ekfac"),
                "projected": dict(solver="projected", weight_decay=L2)}

    def get(name):
        if name not in cache:
            kw = dict(settings[name])
            kw.setdefault("weight_decay", WD)
            method = InfluenceFunction(**kw)
            cache[name] = (run(full, method, problem, tmp_path_factory.mktemp(name)), method)
        return cache[name]

    return get


def test_exact_loo_agrees_with_testing_leave_one_out(loo):
    problem, full, removals, effects = loo
    _, reference = leave_one_out(problem, removals[:1], measure=query_losses)
    assert np.abs(reference[0] - effects[0]).max() <= 1e-3 * np.abs(effects[0]).max()


@pytest.mark.parametrize("solver,bar", [("explicit", 0.95), ("cg", 0.95), ("lissa", 0.9), ("ekfac", 0.8),
                                        ("projected", 0.8)])
def test_influence_predicts_leave_one_out(loo, results, solver, bar):
    problem, _, removals, effects = loo
    res, method = results(solver)
    r = mean_pearson(np.asarray(res.scores)[removals], -effects)
    print(f"\nLOO mean Pearson influence/{solver}: {r:.4f} (damping {method.damping_used})")
    assert r >= bar
    assert res.manifest["method"] == "influence" and res.manifest["solver"] == solver
    assert res.manifest["damping"] == method.damping_used and method.damping_used[0] > 0


def test_default_damping_is_ratio_times_mean_fisher_eigenvalue(loo, results):
    problem, full, _, _ = loo
    res, method = results("explicit")
    x = _aug(problem.x_train)
    r = torch.softmax(full(problem.x_train), -1).detach() - nn.functional.one_hot(problem.y_train, 10)
    sq = ((r * r).sum(1) * (x * x).sum(1)).mean().item()      # ||g_i||^2 = ||p - y||^2 ||[x, 1]||^2
    assert method.damping_used[0] == pytest.approx(DEFAULT_DAMPING_RATIO * sq / 650, rel=1e-5)


def test_cg_and_lissa_solve_the_explicit_system(results):
    explicit = results("explicit")[0]
    for name, rtol in (("cg", 1e-4), ("lissa", None)):
        res = results(name)[0]
        s, ref = np.asarray(res.scores), np.asarray(explicit.scores)
        if rtol is not None:
            np.testing.assert_allclose(s, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
            np.testing.assert_allclose(res.self_influence, explicit.self_influence, rtol=rtol)
        else:  # truncated stochastic series: same ordering, not the same numbers
            assert np.corrcoef(s.ravel(), ref.ravel())[0, 1] > 0.95
            assert np.corrcoef(res.self_influence, explicit.self_influence)[0, 1] > 0.95


def test_explicit_is_the_damped_inverse_of_the_hessian(loo, results):
    """Brute force: analytic Hessian of mean CE + L2 on the weights, per-example gradients, one solve."""
    problem, full, _, _ = loo
    res, method = results("explicit")
    W = torch.cat([full.weight.detach(), full.bias.detach()[:, None]], dim=1)
    perm = _block_to_flat_perm(10, 64)
    H = ggn_blocks(problem, W)[perm][:, perm]                       # flat layout: weight row-major, then bias
    H += torch.diag(torch.cat([torch.full((640,), L2), torch.zeros(10)]).double())
    lam = method.damping_used[0]

    def grads(x, y):
        r = torch.softmax(full(x), -1).detach() - nn.functional.one_hot(y, 10)
        return torch.cat([(r[:, :, None] * x[:, None, :]).reshape(len(x), -1), r], dim=1)

    g, gq = grads(problem.x_train, problem.y_train), grads(problem.x_query, problem.y_query)
    ref = g @ torch.linalg.solve(H + lam * torch.eye(650, dtype=torch.float64), gq.T) / 300
    np.testing.assert_allclose(res.scores, ref.numpy(), rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def _block_to_flat_perm(C, d):
    """Index map from the flat parameter layout [W (C x d) row-major, b (C)] into the block layout [W | b] (C x (d+1))."""
    idx = torch.arange(C * (d + 1)).view(C, d + 1)
    return torch.cat([idx[:, :d].flatten(), idx[:, d]])


def test_ekfac_equals_explicit_ggn_where_the_ggn_is_a_kronecker_product(loo, tmp_path):
    """Zero weights: every softmax output is the same, so the GGN (= Hessian) is H_out (x) mean(a a^T) exactly
    and EK-FAC must equal the explicit damped inverse (uniform weight decay keeps D diagonal in any basis)."""
    problem, _, _, _ = loo
    model = nn.Linear(64, 10).double()
    zero = {"weight": torch.zeros(10, 64, dtype=torch.float64), "bias": torch.tensor([0.3, -0.2] + [0.0] * 8).double()}
    out = {}
    for solver in ("ekfac", "explicit"):
        m = InfluenceFunction(solver=solver, matrix="ggn", damping=1e-3, weight_decay=L2)
        res = run(model, m, problem, tmp_path / solver, snapshots=[Snapshot("zero", state_dict=zero)])
        out[solver] = (np.asarray(res.scores), res.self_influence)
    ref = out["explicit"]
    np.testing.assert_allclose(out["ekfac"][0], ref[0], rtol=1e-5, atol=1e-6 * np.abs(ref[0]).max())
    np.testing.assert_allclose(out["ekfac"][1], ref[1], rtol=1e-5)


def test_ekfac_is_the_eigenbasis_diagonal_of_the_explicit_ggn(loo, results):
    """Trained weights: EK-FAC = Q diag(diag(Q^T (G + D) Q) + lambda)^-1 Q^T with Q = U_S (x) U_A the eigenbases of
    the K-FAC factors, G the explicit GGN and D the weight decay; checked against an independent construction."""
    problem, full, removals, effects = loo
    res, method = results("ekfac")
    block = method._solvers[0].ekfac.blocks[0]
    W = torch.cat([full.weight.detach(), full.bias.detach()[:, None]], dim=1)
    x = _aug(problem.x_train)
    P = torch.softmax(x @ W.T, -1)
    A = x.T @ x                                                      # sum_i a a^T
    S = (torch.diag_embed(P) - P[:, :, None] * P[:, None, :]).sum(0)  # sum_i E_c[delta delta^T] = sum_i H_out,i
    for M, U in ((A, block.U_A), (S, block.U_S)):                   # the method's bases diagonalize the factors
        evals = (U.T @ M @ U).diagonal()
        assert torch.allclose(M @ U, U * evals, atol=1e-8 * M.abs().max())
    D = torch.cat([torch.full((10, 64), L2), torch.zeros(10, 1)], dim=1).double().flatten()
    G = ggn_blocks(problem, W) + torch.diag(D)
    Q = torch.kron(block.U_S, block.U_A)
    lam = method.damping_used[0]
    inv_block = Q @ torch.diag(1 / ((Q.T @ G @ Q).diagonal() + lam)) @ Q.T
    perm = _block_to_flat_perm(10, 64)
    inv = inv_block[perm][:, perm]                                   # block layout -> flat parameter layout

    def grads(xx, y):
        r = torch.softmax(full(xx), -1).detach() - nn.functional.one_hot(y, 10)
        return torch.cat([(r[:, :, None] * xx[:, None, :]).reshape(len(xx), -1), r], dim=1)

    g, gq = grads(problem.x_train, problem.y_train), grads(problem.x_query, problem.y_query)
    ref = (g @ inv @ gq.T / 300).numpy()
    np.testing.assert_allclose(res.scores, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # ... and it is an approximation here (not the explicit GGN solution), so the check above is not vacuous
    explicit = results("explicit")[0]
    assert np.abs(np.asarray(res.scores) - np.asarray(explicit.scores)).max() > 0.05 * np.abs(ref).max()


@pytest.fixture(scope="module")
def noisy():
    from lightning_attrib.data import flip_labels

    base = digits_problem(n_train=200)
    labels, flipped = flip_labels(base.y_train.numpy(), 0.1, 10, seed=1)
    problem = dataclasses.replace(base, y_train=torch.from_numpy(labels))
    return problem, train_logreg(problem), flipped


@pytest.mark.parametrize("kw", [dict(solver="explicit"), dict(CG, batch_size=200, cg_tol=1e-4), dict(LISSA, batch_size=200),
                                dict(solver="ekfac"), dict(solver="projected", weight_decay=L2)],
                         ids=["explicit", "cg", "lissa", "ekfac", "projected"])
def test_self_influence_finds_flipped_labels(noisy, tmp_path, kw):
    from sklearn.metrics import roc_auc_score

    problem, model, flipped = noisy
    kw = dict(kw)
    kw.setdefault("weight_decay", WD)
    res = run(model, InfluenceFunction(**kw), problem, tmp_path)
    auc = roc_auc_score(flipped, res.self_influence)
    print(f"\nflipped-label AUROC influence/{kw['solver']}: {auc:.3f}")
    assert auc > 0.7


def test_explicit_refuses_large_models_and_iterative_solvers_need_full_gradients(tmp_path):
    x, y = torch.randn(8, 80), torch.randint(0, 70, (8,))
    big = nn.Linear(80, 70)                        # 5670 parameters
    with pytest.raises(ValueError, match="max_params=5000.*cg"):
        Attributor(big, InfluenceFunction(solver="explicit"), TensorDataset(x, y), TensorDataset(x, y), tmp_path / "a",
                   projector="identity").run()
    small = nn.Linear(80, 3)
    # the pipeline asks the method which features it needs: full gradients for cg, whatever projector was requested
    cg = InfluenceFunction(solver="cg")
    assert cg.choose_projector(small, ["weight", "bias"], "tensorsketch") == "identity"
    assert InfluenceFunction(solver="projected").choose_projector(small, ["weight"], "tensorsketch") == "tensorsketch"
    # ... and a solver handed projected features anyway refuses them
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="projector='identity'"):
        cg.prepare(SimpleNamespace(snapshot_index=0, projector={"projector": "tensorsketch"}))
    with pytest.raises(ValueError, match="run it through"):
        from lightning_attrib.core.methods import TrainStatistics, SnapshotInfo

        InfluenceFunction(solver="cg").fit(TrainStatistics([SnapshotInfo("final")], 8, 243))
    with pytest.raises(ValueError, match="not the Hessian"):
        InfluenceFunction(solver="ekfac", matrix="hessian")
    with pytest.raises(ValueError, match="unknown influence solver"):
        make_method("influence", solver="newton")


def test_projected_solver_with_random_projection_ranks_like_explicit(loo, results, tmp_path):
    """The scalable path: projected loss-gradient features, empirical Fisher in feature space."""
    problem, full, removals, effects = loo
    res = run(full, InfluenceFunction(solver="projected", weight_decay=L2), problem, tmp_path, projector="rademacher",
              proj_dim=512)
    r = mean_pearson(np.asarray(res.scores)[removals], -effects)
    print(f"\nLOO mean Pearson influence/projected (rademacher k=512): {r:.4f}")
    assert r > 0.7


def test_ekfac_on_a_small_cnn_equals_a_brute_force_construction(tmp_path):
    """Conv2d (unfolded patches, 16 positions) + Linear, empirical Fisher: scores equal the brute-force EK-FAC built
    from autograd per-example gradients, Lambda = mean_i (U_S^T G_i U_A)^2, in the method's eigenbases (which must
    diagonalize the independently computed activation factor); one example: equal to the explicit inverse."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.tensor([2, 0, 1, 3, 3, 1])
    xq, yq = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 3])
    lam = 1e-2
    method = InfluenceFunction(solver="ekfac", matrix="empirical_fisher", damping=lam)
    res = Attributor(model, method, TensorDataset(x, y), TensorDataset(xq, yq), tmp_path, projector="identity",
                     batch_size=4).run()

    def grad_of(xi, yi):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        return [p.grad.clone() for p in model.parameters()]

    def block_layout(gs):  # per layer: [W reshaped (out, -1) | bias]
        return [torch.cat([gs[0].reshape(3, -1), gs[1][:, None]], 1), torch.cat([gs[2], gs[3][:, None]], 1)]

    train = [block_layout(grad_of(x[i], y[i])) for i in range(6)]
    query = [block_layout(grad_of(xq[i], yq[i])) for i in range(3)]
    blocks = method._solvers[0].ekfac.blocks
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2)          # (n, 16, 18)
    a = torch.cat([patches, torch.ones(6, 16, 1, dtype=torch.float64)], 2).reshape(-1, 19)
    A = a.T @ a
    evals = (blocks[0].U_A.T @ A @ blocks[0].U_A).diagonal()
    assert torch.allclose(A @ blocks[0].U_A, blocks[0].U_A * evals, atol=1e-8 * A.abs().max())
    ref = torch.zeros(6, 3, dtype=torch.float64)
    for j, b in enumerate(blocks):
        lam_ref = torch.stack([(b.U_S.T @ t[j] @ b.U_A) ** 2 for t in train]).mean(0)
        for i, t in enumerate(train):
            for q, u in enumerate(query):
                ref[i, q] += ((b.U_S.T @ t[j] @ b.U_A) * (b.U_S.T @ u[j] @ b.U_A) / (lam_ref + lam)).sum()
    ref = (ref / 6).numpy()
    np.testing.assert_allclose(res.scores, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())

    # a single training example: each layer's Fisher block vec(G) vec(G)^T is Kronecker only when G is rank one,
    # which the Linear layer's is; check the whole-model one-example case on a conv with one output position
    model1 = nn.Sequential(nn.Conv2d(2, 3, 4), nn.Flatten(), nn.Linear(3, 4)).double()
    res1 = Attributor(model1, InfluenceFunction(solver="ekfac", matrix="empirical_fisher", damping=lam),
                      TensorDataset(x[:1], y[:1]), TensorDataset(xq, yq), tmp_path / "one", projector="identity",
                      score_dtype="float64").run()  # float64 matmul: the scores cancel ~30x, float32 misses 1e-4

    def flat_grad(m, xi, yi):
        m.zero_grad()
        nn.functional.cross_entropy(m(xi[None]), yi[None]).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    g = flat_grad(model1, x[0], y[0])
    gq = torch.stack([flat_grad(model1, xq[i], yq[i]) for i in range(3)])
    inv = torch.zeros(len(g), len(g), dtype=torch.float64)
    for lo, hi in ((0, 3 * 32 + 3), (3 * 32 + 3, len(g))):                  # layer blocks (weight + bias)
        inv[lo:hi, lo:hi] = torch.linalg.inv(torch.outer(g[lo:hi], g[lo:hi]) + lam * torch.eye(hi - lo).double())
    ref1 = (g @ inv @ gq.T).numpy()[None]
    np.testing.assert_allclose(res1.scores, ref1, rtol=1e-4, atol=1e-6 * np.abs(ref1).max())



DDP_CASES = {"explicit": dict(solver="explicit"), "cg": dict(solver="cg", cg_tol=1e-9, batch_size=70), "ekfac": dict(solver="ekfac")}


def _ddp_rank(rank, world, init_file, root, problem, state):
    """One DDP rank (spawned process, gloo): every solver of DDP_CASES through the pipeline with `TorchDist`.
    (This module imports sklearn / Lightning lazily so that the spawned ranks start fast.)"""
    import torch.distributed as tdist

    from lightning_attrib.core import TorchDist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.Linear(64, 10).double()
        model.load_state_dict(state)
        for name, kw in DDP_CASES.items():
            run(model, InfluenceFunction(**kw, weight_decay=WD), problem, f"{root}/{name}", shard_size=16, batch_size=8,
                dist=TorchDist())
    finally:
        tdist.destroy_process_group()


def test_two_ranks_equal_one_rank(noisy, tmp_path):
    """Two gloo ranks with uneven shards: explicit / EK-FAC statistics and the damping scale are all-reduced over
    ranks, cg lets each rank iterate every training row for its own right-hand sides; results equal one rank's."""
    import torch.multiprocessing as mp

    problem, model, _ = noisy
    problem = dataclasses.replace(problem, x_train=problem.x_train[:70], y_train=problem.y_train[:70])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), problem, state), nprocs=2, join=True)
    for name, kw in DDP_CASES.items():
        single = run(model, InfluenceFunction(**kw, weight_decay=WD), problem, tmp_path / "one" / name,
                     shard_size=16, batch_size=8)
        two = load_results(tmp_path / "two" / name)
        assert two.manifest["world_size"] == 2
        assert two.manifest["damping"] == pytest.approx(single.manifest["damping"], rel=1e-9)
        np.testing.assert_allclose(two.scores, single.scores, rtol=1e-5, atol=1e-6 * np.abs(single.scores).max())
        np.testing.assert_allclose(two.self_influence, single.self_influence, rtol=1e-5)


@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_iterative_solvers_report_progress_and_stop_at_the_time_limit(tmp_path, capfd, solver):
    """A time limit far below one solve: the solver stops with a ConvergenceWarning naming the limit and what to
    change, after printing its progress; the scores are the partial solve's (finite)."""
    from lightning_attrib.core.methods import ConvergenceWarning

    problem = digits_problem(n_train=60, n_query=5)
    model = train_logreg(problem)
    method = InfluenceFunction(solver=solver, weight_decay=WD, batch_size=60, time_limit_s=1e-6, progress_every_s=0.0,
                               lissa_depth=50, lissa_batch_size=16)
    with pytest.warns(ConvergenceWarning, match="time_limit_s"):
        res = run(model, method, problem, tmp_path)
    assert np.isfinite(np.asarray(res.scores)).all()
    assert f"influence/{solver}:" in capfd.readouterr().err
    assert res.manifest[f"{solver}_time_limit_hit"] is True


@pytest.mark.parametrize("bad", [dict(damping=float("nan")), dict(damping=float("inf")), dict(damping_ratio=float("nan")),
                                 dict(weight_decay=float("inf")), dict(time_limit_s=0.0)])
def test_non_finite_settings_are_refused_at_construction(bad):
    with pytest.raises(ValueError):
        InfluenceFunction(**bad)


@pytest.mark.parametrize("matrix", ["ggn", "empirical_fisher"])
def test_dense_curvature_from_per_example_factors_equals_matrix_vector_products(matrix):
    """Curvature.dense builds the GGN / empirical Fisher from C (or 1) per-example gradient passes; it must equal the
    matrix the iterative solvers apply through Jacobian-vector products (checked column by column)."""
    from lightning_attrib.core.methods.curvature import Curvature, ModelFunction
    from lightning_attrib.core.outputs import CrossEntropyLoss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    names = [n for n, _ in model.named_parameters()]
    batches = [(torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))) for _ in range(2)]
    fn = ModelFunction(model, names, CrossEntropyLoss(), dtype=torch.float64)
    curv = Curvature(fn, matrix, torch.full((fn.num_params,), 0.01, dtype=torch.float64), n_train=14)
    eye = torch.eye(fn.num_params, dtype=torch.float64)
    torch.testing.assert_close(curv.dense(batches), curv.matvec(eye, batches), rtol=1e-9, atol=1e-12)

"""Evaluation helpers: subset masks, datamodels, brittleness search and counterfactual checks.

The retraining ground truth is the convex digits problem of `lightning_attrib.testing` (3 vs 8, L2 logistic
regression trained to convergence), with exact influence-function scores (full Hessian, 130 parameters).
"""
import numpy as np
import pytest
import torch
from torch import nn

from lightning_attrib.evaluation import (NOT_FOUND, SubsetMasks, counterfactual_correlation, fit_datamodels,
                                         power_of_two_grid, predict_support_size, predicted_margins,
                                         random_subset_masks, retrain_outputs, support_size, support_sizes)
from lightning_attrib.metrics import Brittleness, LinearDatamodelingScore, linear_datamodeling_score

# --- subsets ---------------------------------------------------------------------------------------------------


def test_subset_masks_are_seeded_sized_and_round_trip(tmp_path):
    s = SubsetMasks.random(n_train=101, num_subsets=20, alpha=0.3, seed=4)
    assert s.masks.shape == (20, 101) and s.masks.dtype == bool
    assert (s.masks.sum(axis=1) == 30).all()                               # round(0.3 * 101) each
    assert np.array_equal(s.masks, random_subset_masks(101, 20, 0.3, seed=4))
    assert not np.array_equal(s.masks, random_subset_masks(101, 20, 0.3, seed=5))
    assert len({row.tobytes() for row in s.masks}) == 20                   # distinct subsets
    assert np.array_equal(random_subset_masks(101, 30, 0.3, seed=4)[:20], s.masks)  # extending keeps the first
    inclusion = random_subset_masks(50, 2000, 0.5, seed=0).mean(axis=0)
    assert np.abs(inclusion - 0.5).max() < 0.05                           # uniform inclusion
    fit, held = s.split(5)
    assert len(fit) == 15 and len(held) == 5 and held.start == 15 and held.verify()
    path = s.save(tmp_path / "masks")
    back = SubsetMasks.load(path)
    assert path.suffix == ".npz" and np.array_equal(back.masks, s.masks)
    assert (back.seed, back.alpha, back.start) == (4, 0.3, 0) and back.verify()
    idx, mine = s.shard(1, 3)
    assert np.array_equal(mine.masks, s.masks[idx]) and mine.verify()
    with pytest.raises(ValueError, match="alpha"):
        random_subset_masks(10, 3, alpha=1.0)


# --- datamodels ------------------------------------------------------------------------------------------------


def test_datamodels_recover_planted_linear_weights():
    rng = np.random.default_rng(0)
    n, q = 80, 3
    w_true = rng.normal(size=(n, q)) * (rng.random((n, q)) < 0.25)        # sparse true influences
    w_true += 0.05 * rng.normal(size=(n, q))                               # plus small dense ones
    subsets = SubsetMasks.random(n, 260, alpha=0.5, seed=1)
    outputs = retrain_outputs(subsets, lambda keep: keep @ w_true + 0.3 * rng.normal(size=q) + 2.0)
    fit, held = subsets.split(60)
    dm = fit_datamodels(fit, outputs[:200])
    assert dm.weights.shape == (n, q) and dm.intercept.shape == (q,)
    corr = [np.corrcoef(dm.weights[:, j], w_true[:, j])[0, 1] for j in range(q)]
    lds = dm.lds(held, outputs[200:], n_bootstrap=200)
    print(f"datamodel weight correlation {np.round(corr, 4)}, held-out LDS {lds['lds'].item():.4f}")
    assert min(corr) > 0.9
    assert lds["lds"].item() > 0.85
    pred = dm.predict(held)
    assert np.corrcoef(pred.ravel(), outputs[200:].ravel())[0, 1] > 0.9
    assert linear_datamodeling_score(dm.weights, held, outputs[200:], n_bootstrap=200)["lds"].item() == lds["lds"].item()


# --- the convex ground truth -----------------------------------------------------------------------------------


def _flat(model: nn.Linear) -> torch.Tensor:
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


def _param_grads(x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of a linear model's parameters from d(out)/d(logits) dz (B, C): (B, C*D + C)."""
    return torch.cat([(dz[:, :, None] * x[:, None, :]).reshape(len(x), -1), dz], dim=1)


def influence_scores(problem, model: nn.Linear) -> np.ndarray:
    """Exact influence of each training example on each query margin, in margin units.

    score[i, q] = margin_q(full) - margin_q(without i) ~= -(1/n) grad m_q^T H^-1 grad loss_i (positive = helps).
    """
    from lightning_attrib.core.outputs import margin_from_logits

    x, y = problem.x_train.double(), problem.y_train
    n, d, c = len(y), x.shape[1], problem.num_classes

    def objective(theta):
        w, b = theta[:c * d].view(c, d), theta[c * d:]
        return nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * problem.l2 * w.pow(2).sum()

    hess = torch.autograd.functional.hessian(objective, _flat(model))
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    g_loss = _param_grads(x, p - nn.functional.one_hot(y, c).double())   # d CE / d logits = p - onehot
    xq = problem.x_query.double()
    z = model(xq).detach().requires_grad_(True)
    (dz,) = torch.autograd.grad(margin_from_logits(z, problem.y_query).sum(), z)
    g_margin = _param_grads(xq, dz)
    # pinv: the softmax is invariant to a common shift of the biases (a flat direction the margins ignore)
    return (-(g_loss @ torch.linalg.pinv(hess, hermitian=True) @ g_margin.T) / n).numpy()




@pytest.fixture(scope="module")
def convex():
    from lightning_attrib.testing import digits_problem, query_margins, train_logreg

    torch.manual_seed(0)
    problem = digits_problem(n_train=300, n_query=40, classes=(3, 8))
    full = train_logreg(problem)
    margins = query_margins(full, problem).numpy()
    scores = influence_scores(problem, full)

    def retrain_margins(keep):
        return query_margins(train_logreg(problem, keep, init=full), problem).numpy()

    return problem, full, margins, scores, retrain_margins


def test_influence_scores_match_leave_one_out(convex):
    from lightning_attrib.testing import leave_one_out

    problem, _, _, scores, _ = convex
    removals = np.argsort(-np.abs(scores[:, 0]))[:5]
    _, effects = leave_one_out(problem, removals)
    # first-order: high-leverage examples are off by up to ~25%, and leaving one out also re-weights the L2 term
    # against the n - 1 remaining losses (a small common offset)
    r = np.corrcoef(scores[removals].ravel(), effects.ravel())[0, 1]
    print(f"influence vs leave-one-out: pearson {r:.4f}, max |diff| {np.abs(scores[removals] - effects).max():.4f}")
    assert r > 0.95


def test_lds_of_influence_scores_on_retrained_subsets(convex):
    problem, _, _, scores, retrain_margins = convex
    subsets = SubsetMasks.random(len(scores), 40, alpha=0.5, seed=0)
    outputs = retrain_outputs(subsets, retrain_margins)
    metric = LinearDatamodelingScore(n_bootstrap=500)
    for idx in np.array_split(np.arange(len(subsets)), 3):
        metric.update(scores, subsets.masks[idx], outputs[idx])
    lds = metric.compute()
    noise = linear_datamodeling_score(np.random.default_rng(0).normal(size=scores.shape), subsets, outputs)
    print(f"LDS of exact influence on {len(subsets)} retrained half-subsets: {lds['lds'].item():.4f} "
          f"[{lds['ci_low'].item():.4f}, {lds['ci_high'].item():.4f}]; random scores: {noise['lds'].item():.4f}")
    assert lds["lds"].item() > 0.8 and lds["ci_low"].item() > abs(noise["lds"].item()) + 0.2


# --- brittleness -----------------------------------------------------------------------------------------------


def test_support_size_search_logic_in_an_exactly_linear_world():
    rng = np.random.default_rng(0)
    effects = np.abs(rng.normal(size=200)) * (rng.random(200) < 0.5)   # true effect of removing each example
    margin = 3.0
    calls = []

    def retrain(keep):                                                   # margin after removal is exactly linear
        calls.append(int((~keep).sum()))
        return margin - effects[~keep].sum()

    exact = predict_support_size(effects, margin, refine=True)
    r = support_size(effects, retrain, None)                             # margin=None: retrain on everything
    assert r.retrained[0] == margin and calls[0] == 0
    calls.clear()
    r = support_size(effects, retrain, margin)
    assert r.predicted_k == r.verified_k == min(k for k in power_of_two_grid(100) if k >= exact)
    assert calls == [r.verified_k, r.verified_k // 2]                    # verify k, then the grid value before it
    calls.clear()
    r = support_size(effects, retrain, margin, refine=True)
    assert r.predicted_k == r.verified_k == exact
    assert r.flipped(exact) and not r.flipped(exact - 1)
    # scores at half scale over-predict k: the search walks down the grid to the true boundary
    calls.clear()
    r = support_size(0.5 * effects, retrain, margin)
    assert r.predicted_k > r.verified_k and r.verified_k == min(k for k in power_of_two_grid(100) if k >= exact)
    # predicted margins follow the linear model
    np.testing.assert_allclose(predicted_margins(effects, margin, [0, 1, 2]),
                               margin - np.concatenate([[0.0], np.cumsum(np.sort(effects)[::-1][:2])]))
    # not reachable: every retraining stays above 0
    r = support_size(effects, lambda keep: 1e6, 1e6, max_k=16)
    assert r.predicted_k == r.verified_k == NOT_FOUND and r.num_retrains == len(power_of_two_grid(16))
    with pytest.raises(ValueError, match="already below"):
        support_size(effects, retrain, -0.5)


def test_brittleness_on_convex_model_is_verified_by_retraining(convex):
    problem, full, margins, scores, retrain_margins = convex
    queries = [int(q) for q in np.argsort(np.where(margins > 0, margins, np.inf))[:4]]  # least confident, correct
    results = support_sizes(scores, lambda keep, q: retrain_margins(keep)[q], queries, margins=margins[queries])
    metric = Brittleness()
    metric.update([r.predicted_k for r in results], [r.verified_k for r in results])
    summary = {k: round(v.item(), 4) for k, v in metric.compute().items()}
    report = [(q, round(float(margins[q]), 3), r.predicted_k, r.verified_k, r.num_retrains)
              for q, r in zip(queries, results)]
    print("(query, margin, predicted k, verified k, retrains):", report, "\nbrittleness:", summary)
    for q, r in zip(queries, results):
        k = r.verified_k
        assert k != NOT_FOUND
        prev = [g for g in r.grid if g < k]
        assert r.flipped(k)                                              # removing the top-k flipped the query
        assert not prev or not r.flipped(prev[-1])                       # the grid value before did not
        # the influence scores are calibrated for single removals; a group of top proponents hurts more than the
        # sum of their scores, so the linear model over-predicts k (never under-predicts it here)
        assert r.predicted_k == NOT_FOUND or r.predicted_k >= k
    assert summary["verified_found_rate"] == 1.0
    # the recorded retrainings are what retraining without the top-k proponents gives (checked independently)
    q, r = queries[0], results[0]
    keep = np.ones(len(scores), dtype=bool)
    keep[np.argsort(-scores[:, q], kind="stable")[:r.verified_k]] = False
    assert retrain_margins(keep)[q] == pytest.approx(r.retrained[r.verified_k], abs=1e-6) and retrain_margins(keep)[q] < 0
    assert summary["mean_verified_k"] <= 32

    # refine to a single k for the least confident query: k flips, k - 1 does not
    q = queries[0]
    r = support_size(scores[:, q], lambda keep: retrain_margins(keep)[q], margins[q], refine=True)
    print(f"refined: query {q} predicted k {r.predicted_k}, verified k {r.verified_k}, {r.num_retrains} retrains")
    assert r.flipped(r.verified_k) and not r.flipped(r.verified_k - 1)
    assert r.verified_k <= results[0].verified_k


# --- counterfactual --------------------------------------------------------------------------------------------


def test_counterfactual_prediction_tracks_retraining(convex):
    problem, full, margins, scores, retrain_margins = convex
    rng = np.random.default_rng(0)
    removed = np.zeros((6, len(scores)), dtype=bool)
    for j in range(6):
        removed[j, rng.choice(len(scores), size=10, replace=False)] = True
    retrained = np.stack([retrain_margins(~r) for r in removed])
    res = counterfactual_correlation(scores, removed, margins, retrained)
    print(f"counterfactual: pearson {res.pearson:.4f} spearman {res.spearman:.4f} sign {res.sign_agreement:.3f}")
    assert res.predicted.shape == res.actual.shape == (6, problem.y_query.numel())
    np.testing.assert_allclose(res.predicted, removed.astype(float) @ scores)
    np.testing.assert_allclose(res.actual, margins[None] - retrained)
    assert res.pearson > 0.9 and res.spearman > 0.8
    assert counterfactual_correlation(-scores, removed, margins, retrained).pearson < -0.9  # the sign matters
    single = counterfactual_correlation(scores, removed[0], margins, retrained[0])          # one set: across queries
    assert single.predicted.shape == (1, problem.y_query.numel()) and single.per_query_pearson is None

"""ModelDiff with planted truth: recipe B trains on digits where part of one class carries a stamped patch."""
import json

import numpy as np
import pytest
from torch.utils.data import TensorDataset

from lightning_attrib.testing import train_mlp
from lightning_attrib.analysis import ModelDiffResult, load_modeldiff, modeldiff
from lightning_attrib.analysis.modeldiff import normalize_columns, span_rank
from lightning_attrib.core import TRAK, Attributor, AttributionResult
from lightning_attrib.data import load_digits_tensors, stamp_patch

N_TRAIN, N_QUERY, STAMP_CLASS = 1200, 300, 3


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """A: plain digits. B: the patch set to max on half of class 3's training images. Both are attributed on
    their own training inputs (same ids) and on the same queries, half of class 3's queries stamped.

    TRAK without the Q term: the stamp makes the stamped images trivially easy for B, and Q = 1 - p
    would shrink their rows towards 0 (see the report)."""
    rng = np.random.default_rng(0)
    x, y = load_digits_tensors()
    perm = rng.permutation(len(x))
    tr, q = perm[:N_TRAIN], perm[N_TRAIN:N_TRAIN + N_QUERY]
    x_a, y_tr, y_q = x[tr].clone(), y[tr], y[q]
    x_b, mask = stamp_patch(x_a, y_tr, STAMP_CLASS, 0.5, rng)
    x_q, q_mask = stamp_patch(x[q], y_q, STAMP_CLASS, 0.5, rng)
    results = {}
    for name, x_train in (("a", x_a), ("b", x_b)):
        model = train_mlp(x_train, y_tr)
        results[name] = Attributor(model, TRAK(use_q=False), TensorDataset(x_train, y_tr),
                                   TensorDataset(x_q, y_q), tmp_path_factory.mktemp(f"recipe_{name}"),
                                   proj_dim=512, batch_size=256).run()
    return results["a"], results["b"], mask, q_mask


@pytest.mark.parametrize("projection", ["per_query", "subspace"])
def test_b_minus_a_top_component_is_the_stamp(recipes, projection):
    ra, rb, stamped, stamped_q = recipes
    md = modeldiff(ra, rb, n_components=3, projection=projection)
    side = md.b_minus_a
    ids, loadings = side.top_train(0, 20)
    frac = stamped[ids].mean()
    base = stamped.mean()
    q_frac = stamped_q[side.top_queries(0, 10)[0]].mean()
    print(f"\nmodeldiff[{projection}, removed rank {side.rank_removed}]: stamped fraction among the top-20 "
          f"|loadings| of B-A component 0 = {frac:.2f} (base rate {base:.3f}); positive loadings "
          f"{np.mean(loadings[stamped[ids]] > 0):.2f}; stamped among top-10 queries {q_frac:.2f}; "
          f"variance along it A {side.variance_a[0]:.4f} vs B {side.variance_b[0]:.4f}")
    assert base < 0.1
    assert frac >= 0.5
    assert np.all(loadings[stamped[ids]] > 0)  # B's stamped examples support its most affected queries
    assert q_frac >= 0.5
    assert side.variance_b[0] > 3 * side.variance_a[0]


def test_structure_and_save_roundtrip(recipes, tmp_path):
    ra, rb, _, _ = recipes
    md = modeldiff(ra, rb, n_components=4)
    assert isinstance(md, ModelDiffResult)
    for side in (md.a_minus_b, md.b_minus_a):
        assert side.directions.shape == (4, N_TRAIN) and side.projections.shape == (N_QUERY, 4)
        np.testing.assert_allclose(np.linalg.norm(side.directions, axis=1), 1.0, rtol=1e-9)
        np.testing.assert_allclose(side.directions @ side.directions.T, np.eye(4), atol=1e-9)
        assert np.all(np.diff(side.explained_variance_ratio) <= 1e-12)
        assert np.all((side.projections ** 3).sum(axis=0) >= 0)  # sign convention
    out = md.save(tmp_path / "md")
    for f in ("modeldiff.json", "train_ids.npy", "query_ids.npy", "a_minus_b/directions.npy",
              "b_minus_a/projections.npy", "b_minus_a/explained_variance_ratio.npy", "b_minus_a/variance_b.npy"):
        assert (out / f).exists(), f
    meta = json.loads((out / "modeldiff.json").read_text())
    assert meta["settings"]["projection"] == "per_query"
    top = meta["b_minus_a"]["components"][0]["top_train"][0]
    assert top["sign"] in "+-" and top["train_id"] == int(md.b_minus_a.top_train(0, 1)[0][0])
    back = load_modeldiff(out)
    np.testing.assert_array_equal(back.b_minus_a.directions, md.b_minus_a.directions)
    np.testing.assert_array_equal(back.a_minus_b.projections, md.a_minus_b.projections)
    assert back.settings == meta["settings"]
    assert "component 0" in md.report(k=5, n_components=1)


def _result(tmp_path, scores, train_ids=None, query_ids=None):
    n, m = scores.shape
    return AttributionResult(tmp_path, {}, scores, np.zeros(n),
                             np.arange(n) if train_ids is None else train_ids,
                             np.arange(m) if query_ids is None else query_ids)


def test_mismatched_ids_raise(tmp_path):
    s = np.random.default_rng(0).normal(size=(30, 8))
    a = _result(tmp_path, s)
    with pytest.raises(ValueError, match="train set: result_a has 30 train examples, result_b 29"):
        modeldiff(a, _result(tmp_path, s[:29]))
    swapped = np.arange(30)
    swapped[[4, 5]] = [5, 4]
    with pytest.raises(ValueError, match=r"2 train ids differ, first at position 4 \(4 in result_a vs 5 in result_b\)"):
        modeldiff(a, _result(tmp_path, s, train_ids=swapped))
    with pytest.raises(ValueError, match="query set"):
        modeldiff(a, _result(tmp_path, s, query_ids=np.arange(8) + 1))
    with pytest.raises(ValueError, match="projection"):
        modeldiff(a, a, projection="other")


def test_synthetic_planted_direction(tmp_path):
    """B = A's shared structure plus one block only B has: both projections find exactly that block."""
    rng = np.random.default_rng(0)
    n, m, r = 400, 120, 6
    shared = rng.normal(size=(n, r)) @ rng.normal(size=(r, m))
    planted = np.zeros(n)
    planted[rng.choice(n, 15, replace=False)] = 1.0
    affected = rng.random(m) < 0.3
    a = shared + 0.05 * rng.normal(size=(n, m))
    b = shared + 0.05 * rng.normal(size=(n, m)) + 4.0 * np.outer(planted, affected)
    for projection in ("per_query", "subspace"):
        md = modeldiff(_result(tmp_path, a), _result(tmp_path, b), 2, projection=projection)
        ids, load = md.b_minus_a.top_train(0, 15, sign="positive")
        assert planted[ids].all() and (load > 0).all()
        assert affected[md.b_minus_a.top_queries(0, 20)[0]].all()
        assert md.b_minus_a.variance_b[0] > 5 * md.b_minus_a.variance_a[0]
    assert md.settings["rank_a"] == span_rank(np.linalg.svd(normalize_columns(a), compute_uv=False), 0.9)
    fixed = modeldiff(_result(tmp_path, a), _result(tmp_path, b), 2, rank_a=6, rank_b=7)  # per_query ignores ranks
    assert fixed.settings["rank_a"] == 0
    fixed = modeldiff(_result(tmp_path, a), _result(tmp_path, b), 2, projection="subspace", rank_a=6, rank_b=7)
    assert fixed.a_minus_b.rank_removed == 7 and fixed.b_minus_a.rank_removed == 6

"""The metrics' statistics come from scipy.stats / scikit-learn: equal to the hand-written torch implementations they
replaced (kept here as references) on random data with ties, huge scores and constant columns."""
import math

import numpy as np
import pytest
import torch

from lightning_attrib.metrics._stats import (average_ranks, binary_auroc, binary_average_precision, bootstrap_mean_ci,
                                             pearson_columns, spearman_columns)


# --- the replaced implementations (lightning_attrib/metrics/_stats.py and mislabel.py before issue 14) -----------

def ref_average_ranks(x):
    if x.ndim == 1:
        return ref_average_ranks(x[:, None])[:, 0]
    m = x.shape[0]
    sorted_x, order = torch.sort(x, dim=0, stable=True)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = new_group.long().cumsum(0) - 1
    ordinal = torch.arange(1, m + 1, dtype=torch.float64)[:, None].expand_as(sorted_x)
    sums = torch.zeros_like(sorted_x, dtype=torch.float64).scatter_add_(0, group, ordinal)
    counts = torch.zeros_like(sorted_x, dtype=torch.float64).scatter_add_(0, group, torch.ones_like(ordinal))
    avg = (sums / counts.clamp_min(1)).gather(0, group)
    return torch.empty_like(avg).scatter_(0, order, avg)


def ref_pearson_columns(a, b):
    a = a - a.mean(dim=0, keepdim=True)
    b = b - b.mean(dim=0, keepdim=True)
    denom = a.norm(dim=0) * b.norm(dim=0)
    r = (a * b).sum(dim=0) / denom
    return torch.where(denom > 0, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))


def ref_spearman_columns(a, b):
    return ref_pearson_columns(ref_average_ranks(a), ref_average_ranks(b))


def ref_bootstrap_mean_ci(values, n_bootstrap=1000, confidence=0.95, seed=0):
    v = values[~torch.isnan(values)].to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    means = torch.cat([v[torch.randint(0, v.numel(), (min(256, n_bootstrap - s), v.numel()), generator=gen)].mean(1)
                       for s in range(0, n_bootstrap, 256)])
    return (torch.quantile(means, (1 - confidence) / 2).item(), torch.quantile(means, 1 - (1 - confidence) / 2).item())


def ref_auroc(scores, target):
    n_pos = int(target.sum())
    n_neg = target.numel() - n_pos
    u = ref_average_ranks(scores)[target].sum().item() - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def ref_average_precision(scores, target):
    n_pos = int(target.sum())
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], target[order].to(torch.float64)
    tp, fp = t.cumsum(0), (1.0 - t).cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[:-1] != s[1:]
    tp, fp = tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / n_pos
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())


# --- equality ------------------------------------------------------------------------------------------------------

def _columns(seed, m=40, q=12):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, q))
    b = 0.5 * a + rng.normal(size=(m, q))
    a[:, 1] = np.round(a[:, 1])          # many ties
    b[:, 2] = np.round(2 * b[:, 2]) * 1e6  # ties at a huge scale
    a[:, 3] = 7.0                        # constant: undefined (NaN)
    b[:, 4] = -1.0
    return torch.from_numpy(a), torch.from_numpy(b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_and_correlations_equal_the_replaced_implementations(seed):
    a, b = _columns(seed)
    np.testing.assert_array_equal(average_ranks(a).numpy(), ref_average_ranks(a).numpy())
    for new, ref in ((pearson_columns, ref_pearson_columns), (spearman_columns, ref_spearman_columns)):
        got, want = new(a, b).numpy(), ref(a, b).numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.isnan(got[3]) and np.isnan(got[4])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, equal_nan=True)
        assert np.abs(np.nan_to_num(got)).max() <= 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_average_precision_equal_the_replaced_implementations(seed):
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(rng.random(300) < 0.1)
    for scores in (rng.normal(size=300) + 1.5 * target.numpy(),  # continuous
                   np.round(rng.normal(size=300) + target.numpy()),  # heavy ties
                   1e6 * np.round(rng.normal(size=300) + target.numpy()),  # a sigmoid would tie them all at 1.0
                   -1e9 + rng.normal(size=300)):  # far below 0
        s = torch.from_numpy(scores)
        assert binary_auroc(s, target) == pytest.approx(ref_auroc(s, target), abs=1e-12)
        assert binary_average_precision(s, target) == pytest.approx(ref_average_precision(s, target), abs=1e-12)
    assert math.isnan(binary_auroc(torch.ones(5), torch.zeros(5, dtype=torch.bool)))
    assert math.isnan(binary_average_precision(torch.ones(5), torch.zeros(5, dtype=torch.bool)))


def test_bootstrap_ci_is_scipy_percentile_and_agrees_with_the_replaced_one():
    from lightning_attrib.core.io import derive_seed

    values = torch.from_numpy(np.random.default_rng(0).normal(0.4, 0.2, size=60))
    values[[3, 17]] = float("nan")  # dropped
    lo, hi = bootstrap_mean_ci(values, n_bootstrap=2000, seed=5)
    # scipy's percentile bootstrap by definition: means of n-of-n resamples drawn from the seeded generator
    v = values[~torch.isnan(values)].numpy()
    idx = np.random.default_rng(derive_seed(5, "bootstrap")).integers(0, v.size, (2000, v.size))
    means = v[idx].mean(axis=1)
    np.testing.assert_allclose([lo, hi], np.percentile(means, [2.5, 97.5]), rtol=0, atol=1e-12)
    assert (lo, hi) == bootstrap_mean_ci(values, n_bootstrap=2000, seed=5)  # seeded: reproducible
    # the replaced torch bootstrap draws other resamples: equal up to Monte-Carlo error (a few % of the width)
    ref_lo, ref_hi = ref_bootstrap_mean_ci(values, 2000, seed=5)
    width = hi - lo
    assert abs(lo - ref_lo) < 0.1 * width and abs(hi - ref_hi) < 0.1 * width
    # and both match the normal-theory interval mean +- 1.96 se to within 10% of the width
    se = v.std(ddof=1) / math.sqrt(v.size)
    assert abs(lo - (v.mean() - 1.96 * se)) < 0.1 * width and abs(hi - (v.mean() + 1.96 * se)) < 0.1 * width

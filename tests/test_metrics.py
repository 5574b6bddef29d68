"""Metrics: LDS, mislabel detection and brittleness against hand/scipy/sklearn values, and DDP sync (gloo).

scipy / sklearn / lightning_attrib.data are imported inside the tests: the spawned DDP workers import this
module, and keeping it light keeps their start-up short.
"""
import math
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_attrib.metrics import (Brittleness, LinearDatamodelingScore, MislabelDetection, average_ranks,
                                      linear_datamodeling_score, mislabel_detection)

# --- LDS -------------------------------------------------------------------------------------------------------

# 3 training examples, 2 queries, 5 subsets. Query 0: subset sums of (1, 2, 4) are 1..5.
SCORES = np.array([[1.0, -1.0], [2.0, 0.0], [4.0, 1.0]])
MASKS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=bool)
OUTPUTS = np.array([[0.2, 1.0], [0.1, 2.0], [0.3, 3.0], [0.4, 4.0], [0.5, 5.0]])


def test_lds_matches_hand_computed_spearman():
    from scipy.stats import spearmanr

    out = linear_datamodeling_score(SCORES, MASKS, OUTPUTS, n_bootstrap=200, seed=3)
    # query 0: predictions 1,2,3,4,5 vs output ranks 2,1,3,4,5 -> rho = 1 - 6*2/(5*(25-1)) = 0.9
    # query 1: predictions -1,0,-1,1,0 (ranks 1.5,3.5,1.5,5,3.5) vs 1..5 -> 5.5/sqrt(9*10)
    hand = np.array([0.9, 5.5 / math.sqrt(90.0)])
    ref = [spearmanr(MASKS @ SCORES[:, q], OUTPUTS[:, q]).statistic for q in range(2)]
    np.testing.assert_allclose(out["per_query"].numpy(), hand, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hand, ref, atol=1e-12)
    assert out["lds"].item() == pytest.approx(hand.mean(), abs=1e-12)
    assert out["num_subsets"].item() == 5
    # the bootstrap over 2 queries can only produce means of {q0,q0}, {q0,q1}, {q1,q1}
    assert hand.min() - 1e-12 <= out["ci_low"].item() <= out["lds"].item() <= out["ci_high"].item() <= hand.max() + 1e-12
    again = linear_datamodeling_score(SCORES, MASKS, OUTPUTS, n_bootstrap=200, seed=3)
    assert again["ci_low"].item() == out["ci_low"].item() and again["ci_high"].item() == out["ci_high"].item()


def test_lds_metric_over_chunks_equals_functional_and_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    n, q, m = 40, 6, 60
    scores = rng.normal(size=(n, q))
    masks = rng.random((m, n)) < 0.5
    outputs = np.round(masks @ scores + rng.normal(scale=2.0, size=(m, q)), 0)  # rounding makes ties
    metric = LinearDatamodelingScore(n_bootstrap=500, seed=1)
    for lo, hi in ((0, 7), (7, 31), (31, 60)):
        metric.update(torch.from_numpy(scores), torch.from_numpy(masks[lo:hi]), torch.from_numpy(outputs[lo:hi]))
    got = metric.compute()
    ref = linear_datamodeling_score(scores, masks, outputs, n_bootstrap=500, seed=1)
    per_q = [spearmanr(masks @ scores[:, j], outputs[:, j]).statistic for j in range(q)]
    np.testing.assert_allclose(got["per_query"].numpy(), per_q, atol=1e-12)
    for key in ("lds", "ci_low", "ci_high"):
        assert got[key].item() == pytest.approx(ref[key].item(), abs=1e-12)
    assert 0.3 < got["lds"].item() < 0.95  # signal plus noise: neither trivial nor hopeless
    with pytest.raises(ValueError, match="same"):
        metric.update(scores[:, :2], masks[:5], outputs[:5, :2])


def test_lds_rejects_mismatched_shapes_and_constant_queries_are_nan():
    with pytest.raises(ValueError, match="columns"):
        linear_datamodeling_score(SCORES, MASKS[:, :2], OUTPUTS)
    with pytest.raises(ValueError, match="outputs"):
        linear_datamodeling_score(SCORES, MASKS, OUTPUTS[:4])
    outputs = OUTPUTS.copy()
    outputs[:, 1] = 7.0
    with pytest.warns(UserWarning, match="constant"):
        out = linear_datamodeling_score(SCORES, MASKS, outputs)
    assert math.isnan(out["per_query"][1].item()) and out["lds"].item() == pytest.approx(0.9)


# --- mislabel detection ----------------------------------------------------------------------------------------

def _noisy_scores(n=400, seed=0):
    """Suspicion scores for n examples, 10% of them with flipped labels (the truth mask of `flip_labels`)."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=round(0.1 * n), replace=False)] = True
    scores = rng.normal(size=n) + 1.5 * flipped  # flipped examples score higher on average
    return scores, flipped


def test_mislabel_detection_matches_sklearn_and_hand_recall():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from lightning_attrib.data.noise import flip_labels

    _, flipped = flip_labels(np.zeros(400, dtype=int), 0.1, num_classes=10, seed=0)
    scores = np.random.default_rng(0).normal(size=400) + 1.5 * flipped  # flipped examples score higher on average
    metric = MislabelDetection(top_fractions=(0.05, 0.1, 0.2))
    metric.update(torch.from_numpy(scores[:150]), torch.from_numpy(flipped[:150]))
    metric.update(scores[150:], flipped[150:])
    out = metric.compute()
    assert out["auroc"].item() == pytest.approx(roc_auc_score(flipped, scores), abs=1e-12)
    assert out["average_precision"].item() == pytest.approx(average_precision_score(flipped, scores), abs=1e-12)
    order = np.argsort(-scores)
    for frac, key in ((0.05, "5%"), (0.1, "10%"), (0.2, "20%")):
        k = math.ceil(frac * len(scores))
        hits = flipped[order[:k]].sum()
        assert out[f"recall@{key}"].item() == pytest.approx(hits / flipped.sum(), abs=1e-12)
        assert out[f"precision@{key}"].item() == pytest.approx(hits / k, abs=1e-12)
    assert out["num_mislabeled"].item() == 40
    assert 0.8 < out["auroc"].item() < 0.95  # the planted signal is detected, imperfectly
    assert out["recall@20%"].item() > out["recall@5%"].item()


def test_mislabel_detection_ties_and_huge_scores():
    from sklearn.metrics import average_precision_score, roc_auc_score

    # huge scores (a sigmoid would saturate them all to 1.0) with many ties
    scores, flipped = _noisy_scores(seed=1)
    scores = 1e6 * np.round(scores)
    out = mislabel_detection(scores, flipped, top_fractions=(0.1,))
    assert out["auroc"].item() == pytest.approx(roc_auc_score(flipped, scores), abs=1e-12)
    assert out["average_precision"].item() == pytest.approx(average_precision_score(flipped, scores), abs=1e-12)
    # all scores tied: the top 10% holds 10% of the flipped labels in expectation, precision = prevalence
    tied = mislabel_detection(np.zeros(400), flipped, top_fractions=(0.1,))
    assert tied["recall@10%"].item() == pytest.approx(0.1) and tied["precision@10%"].item() == pytest.approx(0.1)
    assert tied["auroc"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same length"):
        mislabel_detection(scores[:10], flipped)
    with pytest.raises(ValueError, match="top_fractions"):
        MislabelDetection(top_fractions=(0.0,))


# --- brittleness -----------------------------------------------------------------------------------------------

PRED_K = [4, 8, -1, 16, float("inf")]
VER_K = [4, 16, -1, 8, 32]


def test_brittleness_metric_hand_values():
    metric = Brittleness()
    metric.update(torch.tensor(PRED_K[:2]), torch.tensor(VER_K[:2]))
    metric.update(np.array(PRED_K[2:]), np.array(VER_K[2:]))
    out = metric.compute()
    assert out["agreement"].item() == pytest.approx(2 / 5)           # query 0 and the both-not-found query 2
    assert out["agreement_found"].item() == pytest.approx(1 / 3)     # queries 0, 1, 3 found by both
    assert out["predicted_found_rate"].item() == pytest.approx(3 / 5)
    assert out["verified_found_rate"].item() == pytest.approx(4 / 5)
    assert out["mean_predicted_k"].item() == pytest.approx(28 / 3)
    assert out["mean_verified_k"].item() == pytest.approx(15.0)
    assert out["mean_abs_log2_ratio"].item() == pytest.approx(2 / 3)  # |log2 .5| + |log2 2| over 3
    with pytest.raises(ValueError, match="support sizes"):
        metric.update([0.5], [1])


# --- DDP: 2 gloo processes, each updating its share, equal the single-process values ----------------------------

def _ddp_data():
    rng = np.random.default_rng(7)
    n, q, m = 50, 5, 41
    scores = rng.normal(size=(n, q))
    masks = rng.random((m, n)) < 0.5
    outputs = masks @ scores + rng.normal(scale=3.0, size=(m, q))
    sus, flipped = _noisy_scores(n=101, seed=2)
    return scores, masks, outputs, sus, flipped


def _metrics():
    return (LinearDatamodelingScore(n_bootstrap=300, seed=5), MislabelDetection(), Brittleness())


def _share(n, rank):
    """Rank 0 gets the first ~40% of the rows, rank 1 the rest (uneven on purpose); None = everything."""
    cut = (2 * n) // 5
    return slice(None) if rank is None else (slice(0, cut) if rank == 0 else slice(cut, n))


def _update(metrics, data, rank=None):
    scores, masks, outputs, sus, flipped = data
    lds, mis, brit = metrics
    rows = _share(len(masks), rank)
    lds.update(scores, masks[rows], outputs[rows])  # LDS work is split by subsets; every rank has all queries
    mis.update(sus[_share(len(sus), rank)], flipped[_share(len(sus), rank)])
    brit.update(np.array(PRED_K)[_share(5, rank)], np.array(VER_K)[_share(5, rank)])


def _results(metrics):
    out = {}
    for name, metric in zip(("lds", "mis", "brit"), metrics):
        for key, val in metric.compute().items():
            out[f"{name}/{key}"] = val.detach().cpu().clone()
    return out


def _ddp_worker(rank, world_size, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        metrics = _metrics()
        _update(metrics, _ddp_data(), rank)
        res = _results(metrics)
        if rank == 0:
            torch.save(res, path)
    finally:
        dist.destroy_process_group()


# fork: the workers inherit the imported modules (spawn re-imports lightning_attrib, ~10 s per process here)
START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_synced_metrics_equal_single_process(tmp_path):
    path = tmp_path / "rank0.pt"
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(path)), nprocs=2, join=False,
                             start_method=START)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the 2-process gloo metric sync did not finish in 120 s")
    synced = torch.load(path)
    single = _metrics()
    _update(single, _ddp_data())
    expected = _results(single)
    assert synced.keys() == expected.keys()
    for key, val in expected.items():
        torch.testing.assert_close(synced[key], val, rtol=1e-12, atol=1e-12, equal_nan=True, msg=key)
    assert expected["lds/num_subsets"].item() == 41 and expected["mis/num_examples"].item() == 101
    assert 0.2 < expected["lds/lds"].item() < 0.9


def test_average_ranks_matches_scipy():
    from scipy.stats import rankdata

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 5, size=(30, 4)).astype(float))
    np.testing.assert_array_equal(average_ranks(x).numpy(), rankdata(x.numpy(), axis=0))

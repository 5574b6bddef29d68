"""Leakage detection with planted truth: near-duplicates of test digits hidden in the training set."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_attrib.testing import train_mlp
from lightning_attrib.analysis import LeakageReport, detect_leakage, load_store_features
from lightning_attrib.analysis.leakage import robust_scale
from lightning_attrib.core import TRAK, Attributor, AttributionResult, FeatureStore
from lightning_attrib.data.digits import load_digits_tensors

N_TRAIN, N_QUERY, N_PLANTED, N_MISLABELED = 1200, 300, 20, 5






def attribute(model, x_tr, y_tr, x_q, y_q, out_dir):
    return Attributor(model, TRAK(), TensorDataset(x_tr, y_tr), TensorDataset(x_q, y_q), out_dir,
                      proj_dim=512, batch_size=256).run()


@pytest.fixture(scope="module")
def digits_split():
    x, y = load_digits_tensors()
    perm = np.random.default_rng(0).permutation(len(x))
    tr, q = perm[:N_TRAIN], perm[N_TRAIN:N_TRAIN + N_QUERY]
    return x[tr], y[tr], x[q], y[q]


@pytest.fixture(scope="module")
def planted(digits_split, tmp_path_factory):
    """20 near-duplicates (x + N(0, 0.02), clipped) of test images appended to the training set, with the
    test image's label, plus 5 near-duplicates of other test images with a wrong label (not leakage that helps)."""
    x_tr, y_tr, x_q, y_q = digits_split
    g = torch.Generator().manual_seed(1)
    queries = torch.randperm(N_QUERY, generator=g)[:N_PLANTED + N_MISLABELED]
    dups = (x_q[queries] + 0.02 * torch.randn(len(queries), 64, generator=g)).clamp(0, 1)
    labels = y_q[queries].clone()
    labels[N_PLANTED:] = (labels[N_PLANTED:] + 1 + torch.randint(0, 9, (N_MISLABELED,), generator=g)) % 10
    x_all, y_all = torch.cat([x_tr, dups]), torch.cat([y_tr, labels])
    result = attribute(train_mlp(x_all, y_all), x_all, y_all, x_q, y_q, tmp_path_factory.mktemp("planted"))
    truth = {(N_TRAIN + k, int(queries[k])) for k in range(N_PLANTED)}
    wrong = {(N_TRAIN + k, int(queries[k])) for k in range(N_PLANTED, N_PLANTED + N_MISLABELED)}
    return result, x_all, x_q, truth, wrong


@pytest.fixture(scope="module")
def clean(digits_split, tmp_path_factory):
    x_tr, y_tr, x_q, y_q = digits_split
    result = attribute(train_mlp(x_tr, y_tr), x_tr, y_tr, x_q, y_q, tmp_path_factory.mktemp("clean"))
    return result, x_tr, x_q


def test_recovers_planted_duplicates(planted):
    result, x_tr, x_q, truth, wrong = planted
    report = detect_leakage(result, x_tr, x_q, *load_store_features(result), top_k=50)
    top = [(p.train_index, p.query_index) for p in report.pairs[:N_PLANTED]]
    recall = sum(pair in truth for pair in top)
    print(f"\nleakage: top-{N_PLANTED} pairs recover {recall}/{N_PLANTED} planted duplicates; "
          f"flags {report.flags} (tau_attr={report.thresholds['attribution']:.2f}, "
          f"tau_dist={report.thresholds['distance']:.2f})")
    print(report.table(22))
    assert recall >= 18
    assert N_PLANTED - 2 <= report.flags <= N_PLANTED + 3
    flagged = {(p.train_index, p.query_index) for p in report.pairs if p.flagged}
    # near-identical inputs with a wrong label hurt their twin query: the attribution gate rejects them
    assert not flagged & wrong
    for p in report.pairs[:N_PLANTED]:
        assert p.train_id == int(result.train_ids[p.train_index]) and p.query_id == int(result.query_ids[p.query_index])
        assert p.feature_cosine is not None and p.feature_cosine > 0.9
        assert p.input_distance < 0.05 and p.flagged and p.leakage_score >= 1
    scores = [p.leakage_score for p in report.pairs]
    assert scores == sorted(scores, reverse=True)


def test_clean_dataset_has_few_flags(clean):
    result, x_tr, x_q = clean
    report = detect_leakage(result, x_tr, x_q, *load_store_features(result))
    print(f"\nleakage on clean digits: {report.flags} flags; best pair leakage score "
          f"{report.pairs[0].leakage_score:.2f}")
    assert report.flags <= 3


def test_inputs_without_features_and_datasets(planted):
    result, x_tr, x_q, truth, _ = planted
    as_dataset = detect_leakage(result, TensorDataset(x_tr, torch.zeros(len(x_tr))), x_q.numpy(), top_k=20)
    assert all(p.feature_cosine is None for p in as_dataset.pairs)
    assert sum((p.train_index, p.query_index) in truth for p in as_dataset.pairs) >= 18


def test_thresholds_are_configurable_and_report_saves(planted, tmp_path):
    result, x_tr, x_q, _, _ = planted
    strict = detect_leakage(result, x_tr, x_q, distance_threshold=1e6)
    assert strict.flags == 0 and strict.thresholds["distance"] == 1e6
    report = detect_leakage(result, x_tr, x_q, *load_store_features(result), min_cosine=1.01)
    assert report.flags == 0 and "cosine" in report.thresholds["rule"]
    path = report.save(tmp_path / "leak.json")
    data = json.loads(path.read_text())
    assert data["pairs"][0]["query_id"] == report.pairs[0].query_id and len(data["pairs"]) == len(report)


def test_load_store_features_matches_store(planted):
    result, *_ = planted
    ft, fq = load_store_features(result)
    root = result.out_dir / "features" / result.manifest["output"]
    stored = json.loads((root / "settings.json").read_text())
    store = FeatureStore(root, stored["settings"], stored["shard_size"], create=False)
    np.testing.assert_array_equal(ft, store.load("final", "train")[0])
    assert ft.shape == (N_TRAIN + N_PLANTED + N_MISLABELED, 512) and fq.shape == (N_QUERY, 512)
    ft2, _ = load_store_features(result.out_dir)  # a result directory works too
    np.testing.assert_array_equal(ft, ft2)
    with pytest.raises(FileNotFoundError, match="no snapshot|no train"):
        load_store_features(result, snapshot="nope")


def test_input_errors(planted):
    result, x_tr, x_q, _, _ = planted
    with pytest.raises(ValueError, match="rows but the result has"):
        detect_leakage(result, x_tr[:-1], x_q)
    with pytest.raises(ValueError, match="values per example"):
        detect_leakage(result, x_tr, x_q[:, :10])
    with pytest.raises(ValueError, match="both"):
        detect_leakage(result, x_tr, x_q, train_features=np.zeros((len(x_tr), 4)))


def test_robust_scale_and_tiny_synthetic_case(tmp_path):
    med, sig = robust_scale(np.array([[0.0], [0.0], [0.0], [5.0]]), axis=0)
    assert med[0, 0] == 0 and sig[0, 0] > 0  # MAD = 0 falls back to the mean absolute deviation
    rng = np.random.default_rng(0)
    x_tr, x_q = rng.random((200, 16)), rng.random((40, 16))
    x_tr[7] = x_q[3] + 1e-3  # one exact-ish leak
    scores = rng.normal(size=(200, 40)) * 0.01
    scores[7, 3] = 1.0
    result = AttributionResult(tmp_path, {}, scores.astype(np.float32), np.zeros(200), np.arange(200) + 1000,
                               np.arange(40) + 5000)
    report = detect_leakage(result, x_tr, x_q, top_k=5)
    assert isinstance(report, LeakageReport) and report.flags == 1
    assert (report.pairs[0].train_id, report.pairs[0].query_id) == (1007, 5003)

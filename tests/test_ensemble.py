"""lightning_attrib.ensemble: merged scores/self-influence are the members' means; mismatched members refused."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_attrib
from lightning_attrib.core import Attributor
from lightning_attrib.core.ensemble import EnsembleMismatchError, ensemble
from lightning_attrib.core.methods import make_method
from lightning_attrib.core.results import TopKScores, load_results, write_result


def _member(path, seed, method="trak", n=30, q=4, train_ids=None, query_ids=None, **manifest):
    rng = np.random.default_rng(seed)
    return write_result(path, manifest={"method": method, "output": "margin", "n_train": n, "n_query": q,
                                        "seed": seed, "damping": [0.1 * (seed + 1)], **manifest},
                        scores=rng.normal(size=(n, q)).astype(np.float32),
                        self_influence=rng.random(n).astype(np.float32),
                        train_ids=np.arange(n) if train_ids is None else train_ids,
                        query_ids=np.arange(q) if query_ids is None else query_ids)


def test_ensemble_equals_mean_of_members(tmp_path):
    members = [_member(tmp_path / f"m{s}", s) for s in range(3)]
    merged = lightning_attrib.ensemble([m.out_dir for m in members], tmp_path / "ens")
    want = np.mean([np.asarray(m.scores, dtype=np.float64) for m in members], axis=0)
    np.testing.assert_allclose(merged.scores, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(merged.self_influence, np.mean([m.self_influence for m in members], axis=0), rtol=1e-6)
    again = load_results(tmp_path / "ens")
    np.testing.assert_array_equal(again.scores, merged.scores)
    man = again.manifest
    assert man["method"] == "trak" and man["ensemble"]["num_models"] == 3
    assert [m["seed"] for m in man["ensemble"]["members"]] == [0, 1, 2]
    assert man["damping"] == pytest.approx([0.1, 0.2, 0.3])


def test_ensemble_of_real_trak_runs(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    train, query = TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
    runs = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        runs.append(Attributor(model, make_method("trak"), train, query, tmp_path / f"r{seed}", proj_dim=32,
                               seed=seed).run())
    merged = ensemble([r.out_dir for r in runs], tmp_path / "ens")
    np.testing.assert_allclose(merged.scores, (np.asarray(runs[0].scores, np.float64) + runs[1].scores) / 2,
                               rtol=1e-6, atol=1e-9)
    assert merged.manifest["proj_dim"] == 32 and len(merged.manifest["damping"]) == 2


@pytest.mark.parametrize("case,match", [
    ("method", "'method' differ"),
    ("n_query", "'n_query' differ"),
    ("train_ids", "train_ids differ .*same length, other ids or order"),
    ("query_ids", "query_ids differ"),
    ("topk", "top-k result cannot be averaged"),
])
def test_ensemble_refuses_mismatched_members(tmp_path, case, match):
    a = _member(tmp_path / "a", 0)
    if case == "method":
        b = _member(tmp_path / "b", 1, method="grad-dot")
    elif case == "n_query":
        b = _member(tmp_path / "b", 1, q=5)
    elif case == "train_ids":
        b = _member(tmp_path / "b", 1, train_ids=np.arange(30)[::-1].copy())
    elif case == "query_ids":
        b = _member(tmp_path / "b", 1, query_ids=np.arange(10, 14))
    else:
        k = 2
        b = write_result(tmp_path / "b", manifest={"method": "trak", "output": "margin", "n_train": 30, "n_query": 4},
                         topk=TopKScores(np.zeros((4, k), np.int64), np.zeros((4, k), np.float32),
                                         np.zeros((4, k), np.int64), np.zeros((4, k), np.float32)),
                         self_influence=np.zeros(30, np.float32), train_ids=np.arange(30), query_ids=np.arange(4))
    with pytest.raises(EnsembleMismatchError, match=match):
        ensemble([a.out_dir, b.out_dir], tmp_path / "ens")
    assert not (tmp_path / "ens" / "manifest.json").exists()


def test_ensemble_refuses_bad_arguments(tmp_path):
    a, b = _member(tmp_path / "a", 0), _member(tmp_path / "b", 1)
    with pytest.raises(ValueError, match="one of the members"):
        ensemble([a.out_dir, b.out_dir], a.out_dir)
    with pytest.raises(ValueError, match="listed twice"):
        ensemble([a.out_dir, a.out_dir], tmp_path / "ens")
    with pytest.raises(FileNotFoundError):
        ensemble([a.out_dir, tmp_path / "nothing"], tmp_path / "ens")


def test_ensemble_app_merges_given_results_and_reports_metrics(tmp_path):
    """`lightning-attrib ensemble ensemble.results=[...]`: the merged result, and the mislabel metrics of its
    self-influence computed against the data module's flipped labels (digits, 10% noise) through the logger."""
    import subprocess
    import sys

    from lightning_attrib.data import DigitsDataModule
    from lightning_attrib.metrics import mislabel_detection

    dm = DigitsDataModule(n_train=1200, n_val=300, noise=0.1, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    members = [_member(tmp_path / f"m{s}", s, n=1200, q=300) for s in range(2)]
    cmd = [sys.executable, "-m", "lightning_attrib", "ensemble", f"ensemble.results=[{members[0].out_dir},{members[1].out_dir}]",
           "data.noise=0.1", "logger=csv", f"out_dir={tmp_path / 'app'}", f"hydra.run.dir={tmp_path / 'app'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    merged = load_results(tmp_path / "app" / "ensemble")
    np.testing.assert_allclose(merged.self_influence, (members[0].self_influence + members[1].self_influence) / 2,
                               rtol=1e-6)
    want = mislabel_detection(torch.as_tensor(merged.self_influence, dtype=torch.float64),
                              torch.as_tensor(dm.train_flipped))
    logged = (tmp_path / "app").rglob("metrics.csv")
    text = next(logged).read_text()
    assert "attrib/mislabel/self_influence/auroc" in text
    assert f"{float(want['auroc']):.4f}" in out.stdout

"""The `lds` app's evaluation and guards, without retraining: datamodels skipped (with a warning) when there are too
few subsets while the LDS is still reported; results that cannot give an LDS refused before the retrainings; a
failed sweep names its log."""
import io
import json
import sys
import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from lightning_attrib import cli
from lightning_attrib.core.io import atomic_write_bytes
from lightning_attrib.core.results import TopKScores, write_result
from lightning_attrib.evaluation.subsets import random_subset_masks
from lightning_attrib.sweeps import evaluate, min_subsets_for_datamodels, run_subset_sweep, truth_path

N_TRAIN, N_QUERY = 40, 6


def _planted(tmp_path, num_subsets: int, seed: int = 0):
    """Truth files whose outputs are linear in the mask (a few strong examples per query) plus noise, and the
    matching attribution result."""
    rng = np.random.default_rng(seed)
    weights = 0.05 * rng.normal(size=(N_TRAIN, N_QUERY))
    for q in range(N_QUERY):
        weights[rng.choice(N_TRAIN, 4, replace=False), q] = 3.0 * rng.choice([-1.0, 1.0], 4)
    masks = random_subset_masks(N_TRAIN, num_subsets, 0.5, seed=seed)
    outputs = masks @ weights + 0.3 * rng.normal(size=(num_subsets, N_QUERY))
    for j in range(num_subsets):
        buf = io.BytesIO()
        np.savez(buf, mask=masks[j], outputs=outputs[j], index=j, seed=seed, alpha=0.5)
        truth_path(tmp_path / "lds", j).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(truth_path(tmp_path / "lds", j), buf.getvalue())
    write_result(tmp_path / "attrib", manifest={"method": "planted"}, self_influence=np.zeros(N_TRAIN),
                 train_ids=np.arange(N_TRAIN), query_ids=np.arange(N_QUERY), scores=weights)
    return masks, outputs, weights


def test_min_subsets_for_datamodels():
    assert min_subsets_for_datamodels(0.2) == 15  # 15 - 5 held out = 10 = 2 x 5 folds; 14 - 5 is too few
    assert min_subsets_for_datamodels(0.5) == 20  # 20 - 10 held out


@pytest.mark.parametrize("num_subsets", [10, 14])
def test_too_few_subsets_skip_datamodels_with_a_warning_and_report_the_lds(tmp_path, num_subsets):
    masks, outputs, weights = _planted(tmp_path, num_subsets)
    with pytest.warns(UserWarning, match=f"datamodels skipped: {num_subsets} subsets are too few"):
        report = evaluate(tmp_path / "lds", tmp_path / "attrib")
    expected = np.mean([spearmanr(masks @ weights[:, q], outputs[:, q]).statistic for q in range(N_QUERY)])
    assert report["lds"] == pytest.approx(expected, abs=1e-9) and report["lds"] > 0.5
    assert report["lds_ci"][0] <= report["lds"] <= report["lds_ci"][1]
    assert "datamodels_lds_heldout" not in report and "too few" in report["datamodels_skipped"]
    assert json.loads((tmp_path / "lds" / "lds.json").read_text()) == report


def test_enough_subsets_fit_datamodels(tmp_path):
    _planted(tmp_path, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(tmp_path / "lds", tmp_path / "attrib")
    assert report["datamodels_fit_subsets"] == 32 and report["datamodels_lds_heldout"] > 0.5
    assert (tmp_path / "lds" / "datamodels_weights.npy").exists()


def _lds_cfg(tmp_path, scores):
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="lightning_attrib.conf"):
        return compose("lds", overrides=[f"out_dir={tmp_path}", f"lds.scores={scores}", f"data.n_train={N_TRAIN}",
                                         f"data.n_val={N_QUERY}"])


def test_lds_app_refuses_mismatched_scores_before_retraining(tmp_path):
    write_result(tmp_path / "other", manifest={"method": "x"}, self_influence=np.zeros(N_TRAIN + 1),
                 train_ids=np.arange(N_TRAIN + 1), query_ids=np.arange(N_QUERY),
                 scores=np.zeros((N_TRAIN + 1, N_QUERY)))
    with pytest.raises(ValueError, match=r"\(41, 6\) but the configured data has \(n_train, n_query\) = \(40, 6\)"):
        cli.lds(_lds_cfg(tmp_path, tmp_path / "other"))
    assert not (tmp_path / "lds").exists()  # no sweep was started


def test_lds_app_refuses_a_top_k_result_before_retraining(tmp_path):
    k = 3
    topk = TopKScores(np.zeros((N_QUERY, k), np.int64), np.zeros((N_QUERY, k), np.float32),
                      np.zeros((N_QUERY, k), np.int64), np.zeros((N_QUERY, k), np.float32))
    write_result(tmp_path / "topk", manifest={"method": "x"}, self_influence=np.zeros(N_TRAIN),
                 train_ids=np.arange(N_TRAIN), query_ids=np.arange(N_QUERY), topk=topk)
    with pytest.raises(ValueError, match="attribution.top_k=null"):
        cli.lds(_lds_cfg(tmp_path, tmp_path / "topk"))
    assert not (tmp_path / "lds").exists()


def test_a_failed_sweep_names_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('subset 3 diverged'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exit code 3.*sweep\.log.*subset 3 diverged"):
        run_subset_sweep(cmd, tmp_path / "lds", 5, poll_s=0.05)


def _subset_cfg(tmp_path, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="lightning_attrib.conf"):
        return compose("subset", overrides=[f"out_dir={tmp_path / 'job'}", f"lds.dir={tmp_path / 'lds'}", "lds.index=0",
                                            "data.n_train=30", "data.n_val=4", "trainer.max_epochs=1", *overrides])


def test_a_sweep_never_mixes_subsets_trained_under_other_settings(tmp_path):
    from lightning_attrib.sweeps import load_truth, train_subset

    assert "written" in train_subset(_subset_cfg(tmp_path))
    assert "skipped" in train_subset(_subset_cfg(tmp_path, "hydra.job.name=other"))  # same settings: resumed
    with pytest.raises(ValueError, match="trained with other data/model/trainer/subset settings"):
        train_subset(_subset_cfg(tmp_path, "trainer.max_epochs=2"))
    # a file from other settings next to this sweep's: evaluation refuses the mix
    assert "written" in train_subset(_subset_cfg(tmp_path, "lds.index=1", "model.hidden=8"))
    with pytest.raises(ValueError, match="trained under different settings"):
        load_truth(tmp_path / "lds")

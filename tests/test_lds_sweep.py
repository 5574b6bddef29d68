"""LDS end to end through Hydra: full-data attribution, a joblib multirun of subset retrainings, evaluation."""
import csv
import json
import subprocess
import sys

import numpy as np
from scipy.stats import spearmanr

from lightning_attrib import load_results
from lightning_attrib.evaluation.subsets import random_subset_masks
from lightning_attrib.sweeps import load_truth


def test_lds_app_runs_subset_multirun_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    common = ["trainer.max_epochs=3", "data.n_train=120", "data.n_val=10", "attribution.proj_dim=64",
              "attribution.snapshot_every_n_epochs=3", "logger=csv"]
    cmd = [sys.executable, "-m", "lightning_attrib", "lds", *common, "lds.num_subsets=6", "lds.launcher=joblib",
           'lds.launcher_overrides=["hydra.launcher.n_jobs=2"]', f"hydra.run.dir={run_dir}",
           "+lds_logger._target_=lightning.pytorch.loggers.CSVLogger", f"+lds_logger.save_dir={tmp_path}/lds_log"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((run_dir / "lds" / "lds.json").read_text())
    assert report["num_subsets"] == 6 and report["n_train"] == 120 and report["n_query"] == 10

    # independent recomputation: masks are the seeded draws, LDS = mean Spearman(mask @ scores, truth)
    idx, masks, outputs = load_truth(run_dir / "lds")
    np.testing.assert_array_equal(masks, np.stack([random_subset_masks(120, 1, 0.5, 0, start=i)[0] for i in idx]))
    scores = np.asarray(load_results(run_dir / "attrib").scores, dtype=np.float64)
    rhos = [spearmanr(masks @ scores[:, q], outputs[:, q])[0] for q in range(10)]
    assert abs(report["lds"] - np.nanmean(rhos)) < 1e-9
    assert report["lds"] > 0.0  # a trained model's TRAK scores carry signal even with 6 subsets

    # the result was logged
    rows = list(csv.DictReader(open(next((tmp_path / "lds_log").rglob("metrics.csv")))))
    assert abs(float(rows[-1]["lds/lds"]) - report["lds"]) < 1e-6

    # resumable: re-running the sweep (basic launcher) skips every finished subset
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "lds" / "truth").glob("*.npz")}
    again = subprocess.run([sys.executable, "-m", "lightning_attrib", "subset", "-m", *common,
                            f"lds.dir={run_dir / 'lds'}", "lds.index=range(0,6)"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before

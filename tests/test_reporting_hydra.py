"""Results where users look: W&B offline run contents read back, other loggers' scalars, Hydra configs and apps."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lightning_attrib import AttributionCallback, CheckpointCapture
from lightning_attrib.data import DigitsDataModule
from lightning_attrib.models import LitClassifier

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path, logger, out="attrib"):
    L.seed_everything(0)
    dm = DigitsDataModule(n_train=150, n_val=20, noise=0.1, batch_size=50)
    cb = AttributionCallback(proj_dim=32, out_dir=tmp_path / out, num_suspects=10, num_gallery_queries=3, gallery_k=2)
    L.Trainer(accelerator="cpu", max_epochs=3, logger=logger, callbacks=[CheckpointCapture(every_n_epochs=1), cb],
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).fit(LitClassifier(arch="mlp", hidden=16), datamodule=dm)
    return cb


def test_wandb_offline_run_holds_metrics_tables_histogram_artifact(tmp_path, wandb_dirs):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="attrib-test", save_dir=str(tmp_path), offline=True)
    cb = _fit(tmp_path, logger)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)["summary"]
    auroc = summary["attrib/mislabel/self_influence/auroc"]
    assert auroc == pytest.approx(cb.metrics["attrib/mislabel/self_influence/auroc"])
    assert 0.5 < auroc <= 1.0 and "attrib/mislabel/loss_baseline/auroc" in summary
    assert summary["attrib/method"] == "trak" and len(summary["attrib/damping"]) == 3
    assert summary["attrib/suspects"]["nrows"] == 10 and summary["attrib/query_gallery"]["nrows"] == 3
    assert summary["attrib/self_influence_hist"]["_type"] == "histogram"
    table = json.loads(next((run_dir / "files" / "media" / "table" / "attrib").glob("suspects_*.json")).read_text())
    assert table["columns"] == ["rank", "train_id", "image", "given_label", "predicted_label", "self_influence", "flipped"]
    assert [row[1] for row in table["data"]] == [int(i) for i in cb.result.suspects(10)[0]]
    # images (suspects + gallery queries + proponents + opponents) and the result-file artifact were staged
    pngs = [p for p in Path(wandb_dirs).rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"]
    assert len(pngs) >= 10 + 3 * (1 + 2 + 2)


def test_other_loggers_get_the_scalars(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    cb = _fit(tmp_path, logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("attrib/") and v}
    assert logged["attrib/mislabel/self_influence/auroc"] == pytest.approx(cb.metrics["attrib/mislabel/self_influence/auroc"])


def _experiments():
    return sorted(p.stem for p in (ROOT / "lightning_attrib" / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", _experiments())
def test_each_experiment_config_instantiates(experiment, tmp_path):
    with initialize_config_module(version_base="1.3", config_module="lightning_attrib.conf"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"out_dir={tmp_path}"])
    dm, model = instantiate(cfg.data), instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert isinstance(model, L.LightningModule) and isinstance(trainer, L.Trainer)
    assert any(isinstance(c, AttributionCallback) for c in callbacks)
    x, y = next(iter(dm.train_dataloader()))
    assert model(x).shape == (len(x), dm.num_classes)


def test_hydra_multirun_two_jobs(tmp_path):
    cmd = [sys.executable, "-m", "lightning_attrib", "-m", "attribution.proj_dim=16,32", "logger=csv",
           "trainer.max_epochs=1", "data.n_train=64", "data.n_val=8", f"hydra.sweep.dir={tmp_path}",
           "attribution.keep_snapshots=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    dims = sorted(json.loads((tmp_path / str(j) / "attrib" / "manifest.json").read_text())["proj_dim"] for j in (0, 1))
    assert dims == [16, 32]


def test_user_config_dir_adds_an_experiment(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrainer:\n  max_epochs: 1\ndata:\n  n_train: 40\n  n_val: 6\nattribution:\n  proj_dim: 8\n")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_attrib", "--config-dir", str(tmp_path), "experiment=mine", "logger=csv",
           f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((run_dir / "attrib" / "manifest.json").read_text())
    assert manifest["proj_dim"] == 8 and manifest["n_train"] == 40


def test_attribute_app_scores_saved_snapshots_like_the_python_api(tmp_path):
    import numpy as np
    import torch

    from lightning_attrib import attribute, load_results

    torch.manual_seed(0)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    model = LitClassifier(arch="mlp", hidden=16)
    torch.save({"state_dict": model.state_dict(), "lr": 0.1, "step": 3}, snaps / "snapshot-step00000003.pt")
    cmd = [sys.executable, "-m", "lightning_attrib", "attribute", f"snapshots={snaps}", "data.n_train=50",
           "data.n_val=7", "model.hidden=16", "attribution.proj_dim=16", f"hydra.run.dir={tmp_path / 'cli'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cli = load_results(tmp_path / "cli" / "attrib")
    dm = DigitsDataModule(n_train=50, n_val=7)
    api = attribute(LitClassifier(arch="mlp", hidden=16), dm.train_set, dm.val_set, tmp_path / "api", snapshots=snaps,
                    proj_dim=16)
    assert cli.manifest["snapshots"][0]["lr"] == 0.1
    scale = np.abs(np.asarray(api.scores)).max()  # the subprocess runs 2 BLAS threads, pytest 1: summation order differs
    assert np.abs(np.asarray(cli.scores) - np.asarray(api.scores)).max() <= 1e-5 * scale

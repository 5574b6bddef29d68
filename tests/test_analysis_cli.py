"""Leakage and ModelDiff from the callback and the CLI, on two small recipes trained with Lightning."""
import json
import subprocess
import sys

import lightning as L
import pytest

from lightning_attrib import AttributionCallback
from lightning_attrib.data import DigitsDataModule
from lightning_attrib.models import LitClassifier

N_TRAIN, N_VAL = 200, 30


def fit(out_dir, weight_decay, leakage=False, logger=False):
    L.seed_everything(0)
    cb = AttributionCallback(proj_dim=64, out_dir=out_dir, leakage=leakage, num_gallery_queries=2, gallery_k=2)
    L.Trainer(accelerator="cpu", max_epochs=4, logger=logger, callbacks=[cb], enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir).fit(
        LitClassifier(arch="mlp", hidden=32, weight_decay=weight_decay),
        datamodule=DigitsDataModule(n_train=N_TRAIN, n_val=N_VAL, batch_size=50))
    return cb


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    a = fit(root / "a", 0.0, leakage=True)
    b = fit(root / "b", 0.05)
    return root, a, b


def test_callback_leakage_report(recipes):
    root, a, _ = recipes
    saved = json.loads((root / "a" / "leakage.json").read_text())
    assert saved["flags"] == a.leakage_report.flags == a.metrics["attrib/leakage/flags"]
    # digits' train and validation splits are disjoint: nothing should look like a duplicate
    assert a.leakage_report.flags <= 3
    assert len(saved["pairs"]) == min(50, saved["n_candidates"])


def test_modeldiff_cli_writes_numbers_and_wandb_tables(recipes, tmp_path, wandb_dirs):
    root, _, _ = recipes
    cmd = [sys.executable, "-m", "lightning_attrib", "modeldiff", f"a={root / 'a'}", f"b={root / 'b'}",
           "n_components=2", "data=digits", f"data.n_train={N_TRAIN}", f"data.n_val={N_VAL}", "logger=wandb",
           f"logger.save_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'md'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "md" / "modeldiff" / "modeldiff.json").read_text())
    comps = summary["b_minus_a"]["components"]
    assert len(comps) == 2 and len(comps[0]["top_train"]) == 16
    tables = list(tmp_path.rglob("media/table/modeldiff/*/component_0/top_train*.table.json"))
    assert len(tables) == 2  # a_minus_b and b_minus_a
    assert json.loads(tables[0].read_text())["columns"] == ["rank", "train_id", "image", "loading"]


def test_modeldiff_cli_refuses_mismatched_results(recipes, tmp_path):
    root, _, _ = recipes
    from lightning_attrib.core import TRAK, Attributor

    dm = DigitsDataModule(n_train=N_TRAIN - 10, n_val=N_VAL)
    Attributor(LitClassifier(arch="mlp", hidden=32), TRAK(), dm.train_set, dm.val_set, tmp_path / "c", proj_dim=16).run()
    out = subprocess.run([sys.executable, "-m", "lightning_attrib", "modeldiff", f"a={root / 'a'}", f"b={tmp_path / 'c'}",
                          f"hydra.run.dir={tmp_path / 'md'}"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "has 200 train examples, result_b 190" in out.stderr


def test_leakage_cli_on_saved_result(recipes, tmp_path):
    root, a, _ = recipes
    out = subprocess.run([sys.executable, "-m", "lightning_attrib", "leakage", f"result={root / 'a'}",
                          f"data.n_train={N_TRAIN}", f"data.n_val={N_VAL}", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((tmp_path / "leakage.json").read_text())
    assert saved["flags"] == a.leakage_report.flags  # same detector, same inputs

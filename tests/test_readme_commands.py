"""Every `lightning-attrib` command of README.md's "Command line (Hydra)" block, run as written (plus speed-only
overrides: fewer examples, epochs and subsets) in one working directory, in README order; the outputs a command
needs (outputs/DATE/TIME, outputs/A, outputs/B, my_configs) come from the commands before it or are made here.

The commands run through the installed console script when there is one, so a user's `_target_` in the working
directory must resolve without PYTHONPATH=. (the console script, unlike `python -m`, does not put it on sys.path).
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL = 150, 20
DATA = [f"data.n_train={N_TRAIN}", f"data.n_val={N_VAL}"]
SPEED = {  # app -> overrides appended to the README command (sizes and counts only)
    "train": ["trainer.max_epochs=5", *DATA],
    "model=cnn": ["trainer.max_epochs=1", *DATA],  # one snapshot: a 4096 x 4096 kernel per snapshot is the cost
    "attribute": [*DATA, "attribution.proj_dim=256"],
    "lds": ["trainer.max_epochs=5", *DATA, "lds.num_subsets=10"],  # 10: too few for datamodels (skipped, warned)
    "modeldiff": DATA,
    "leakage": DATA,
    "callbacks=in_run": ["trainer.max_epochs=3", *DATA],
    "callbacks=capture": ["trainer.max_epochs=3", *DATA],
    "ensemble": ["trainer.max_epochs=3", *DATA, "ensemble.seeds=2"],
}
USER_MODULE = '''
from lightning_attrib.models import LitClassifier


class DeepMLP(LitClassifier):
    """A user's own module, found from the working directory."""

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "depth": 2})
'''
USER_EXPERIMENT = """# @package _global_
model:
  _target_: my_models.DeepMLP
  hidden: 24
attribution:
  proj_dim: 48
"""


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Command line (Hydra)"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    commands = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    return [c for c in commands if c.startswith("lightning-attrib")]


COMMANDS = readme_commands()


def _launcher() -> list[str]:
    script = Path(sys.executable).with_name("lightning-attrib")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_attrib"]


def _speed(args: list[str]) -> list[str]:
    key = next((a for a in args if a in SPEED), "train")
    return SPEED[key]


class Workspace:
    """The user's working directory and what the commands left in it."""

    def __init__(self, cwd: Path):
        self.cwd, self.runs = cwd, {}
        self.env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            self.env[var] = str(cwd / "wandb_home")
        (cwd / "wandb_home").mkdir()
        (cwd / "my_models.py").write_text(USER_MODULE)
        (cwd / "my_configs" / "experiment").mkdir(parents=True)
        (cwd / "my_configs" / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)

    def run_dirs(self) -> set[Path]:
        return {p.parent for p in self.cwd.rglob(".hydra")}

    def run(self, command: str) -> tuple[subprocess.CompletedProcess, list[Path]]:
        args = shlex.split(command)[1:]
        # placeholders: the demo run stands for outputs/DATE/TIME and outputs/A, a damping-sweep job for outputs/B
        subst = {"outputs/DATE/TIME": self.runs.get("demo"), "outputs/A": self.runs.get("demo"),
                 "outputs/B": self.runs.get("damping0")}
        for key, val in subst.items():
            args = [a.replace(key, str(val.relative_to(self.cwd))) if val is not None else a for a in args]
        before = self.run_dirs()
        out = subprocess.run([*_launcher(), *args, *_speed(args)], cwd=self.cwd, env=self.env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{command}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
        assert "Traceback" not in out.stdout + out.stderr
        return out, sorted(self.run_dirs() - before)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("user_cwd"))


def _wandb(run_dir: Path, summary: bool = True) -> dict | list:
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", *(["--summary"] if summary else []), "--json",
           str(run_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if summary else [json.loads(line) for line in out.stdout.splitlines() if line]


def _wandb_runs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("offline-run-*") if p.is_dir())


def _manifest(run: Path) -> dict:
    return json.loads((run / "attrib" / "manifest.json").read_text())


def _command(fragment: str) -> str:
    matches = [c for c in COMMANDS if fragment in c]
    assert len(matches) == 1, f"README should have one command with {fragment!r}: {COMMANDS}"
    return matches[0]


def test_readme_block_is_what_this_test_runs():
    # every README command is run below (a new one must get a test here)
    fragments = ["lightning-attrib experiment=demo", "model=cnn", "hparams_search=damping", "attribute snapshots=",
                 "--config-dir", "lds experiment=demo", "modeldiff", "leakage", "callbacks=in_run",
                 "callbacks=capture", "ensemble experiment=demo"]
    assert len(COMMANDS) == len(fragments) == len({_command(f) for f in fragments})


def test_demo(ws):
    out, runs = ws.run(_command("lightning-attrib experiment=demo"))
    assert len(runs) == 1
    ws.runs["demo"] = run = runs[0]
    manifest = _manifest(run)
    assert manifest["method"] == "trak" and manifest["proj_dim"] == 1024 and manifest["n_train"] == N_TRAIN
    assert len(manifest["snapshots"]) == 1  # demo: every 5 epochs, 5 epochs
    # each log line once (Lightning's own handler is dropped under Hydra's)
    assert (out.stdout + out.stderr).count("Seed set to 0") == 1
    # W&B: the resolved config (attribution settings included) and the mislabel metrics
    summary = _wandb(_wandb_runs(run)[0])
    assert summary["config"]["attribution"]["proj_dim"] == 1024
    assert summary["config"]["attribution"]["snapshot_every_n_epochs"] == 5
    assert summary["config"]["data"]["noise"] == 0.1
    assert 0.5 < summary["summary"]["attrib/mislabel/self_influence/auroc"] <= 1.0


def test_cnn_with_csv_logger(ws):
    _, runs = ws.run(_command("model=cnn"))
    manifest = _manifest(runs[0])
    assert manifest["proj_dim"] == 4096 and manifest["n_train"] == N_TRAIN
    import yaml

    hparams = yaml.safe_load(next(runs[0].rglob("hparams.yaml")).read_text())
    assert hparams["model"]["image_shape"] == [1, 8, 8] and hparams["attribution"]["proj_dim"] == 4096


def test_damping_sweep(ws):
    _, runs = ws.run(_command("hparams_search=damping"))
    assert len(runs) == 3
    by_job = {int(r.name): _manifest(r) for r in runs}
    ws.runs["damping0"] = next(r for r in runs if r.name == "0")
    # ratios 0.1, 1, 10 on identical (deterministic) training: the damping used scales exactly with the ratio
    d = {j: np.array(m["damping"], dtype=float) for j, m in by_job.items()}
    np.testing.assert_allclose(d[1] / d[0], 10.0, rtol=1e-6)
    np.testing.assert_allclose(d[2] / d[1], 10.0, rtol=1e-6)


def test_attribute_on_two_ranks_equals_the_python_api(ws):
    import torch

    from lightning_attrib import attribute, load_results
    from lightning_attrib.data import DigitsDataModule
    from lightning_attrib.models import LitClassifier

    out, runs = ws.run(_command("attribute snapshots="))
    cli = load_results(runs[0] / "attrib")
    assert cli.manifest["world_size"] == 2 and len(cli.manifest["snapshots"]) == 1
    assert out.stdout.count("lightning-attrib attribute:") == 1  # printed by rank 0 only
    torch.set_num_threads(1)
    dm = DigitsDataModule(n_train=N_TRAIN, n_val=N_VAL)
    api = attribute(LitClassifier(arch="mlp"), dm.train_set, dm.val_set, ws.cwd / "api",
                    snapshots=ws.runs["demo"] / "snapshots", proj_dim=256)
    scale = np.abs(np.asarray(api.scores)).max()
    assert np.abs(np.asarray(cli.scores) - np.asarray(api.scores)).max() <= 1e-5 * scale


def test_user_config_dir_and_user_target_from_the_working_directory(ws):
    _, runs = ws.run(_command("--config-dir"))
    assert _manifest(runs[0])["proj_dim"] == 48
    summary = _wandb(_wandb_runs(runs[0])[0])
    assert summary["config"]["model"]["_target_"] == "my_models.DeepMLP"
    import torch

    snap = torch.load(sorted((runs[0] / "snapshots").glob("*.pt"))[-1], weights_only=False)
    assert {"net.1.weight", "net.3.weight", "net.5.weight"} <= set(snap["state_dict"])  # depth 2: the user's class


def test_lds_with_too_few_subsets_for_datamodels(ws):
    from scipy.stats import spearmanr

    from lightning_attrib import load_results
    from lightning_attrib.sweeps import load_truth

    out, runs = ws.run(_command("lds experiment=demo"))
    run = next(r for r in runs if (r / "lds").is_dir())
    report = json.loads((run / "lds" / "lds.json").read_text())
    assert report["num_subsets"] == 10 and "too few" in report["datamodels_skipped"]
    _, masks, outputs = load_truth(run / "lds")
    scores = np.asarray(load_results(run / "attrib").scores, dtype=np.float64)
    rhos = [spearmanr(masks @ scores[:, q], outputs[:, q]).statistic for q in range(N_VAL)]
    assert report["lds"] == pytest.approx(np.nanmean(rhos), abs=1e-9) and report["lds"] > 0.1
    text = out.stdout + out.stderr
    assert text.count("LDS =") == 1 and text.count("datamodels skipped: 10 subsets are too few") == 1
    # each log line once; the subset retrainings' library warnings not at all (the full run's at most once)
    assert text.count("Seed set to 0") == 1 and text.count("LeafSpec") <= 1 and "val_dataloader" not in text
    assert len(re.findall(r"LDS subsets: 100%", text)) >= 1 and "Launching 10 jobs" not in text  # one bar, no job log
    # W&B: the attribution run and the LDS run, same project and group; the LDS run holds LDS, CI and the scatter
    wandb_runs = _wandb_runs(run)
    assert len(wandb_runs) == 2
    headers = [next(r["run"] for r in _wandb(w, summary=False) if r["type"] == "run") for w in wandb_runs]
    assert headers[0]["project"] == headers[1]["project"] == "lightning-attrib"
    assert headers[0]["run_group"] == headers[1]["run_group"] != ""
    lds_run = next(w for w, h in zip(wandb_runs, headers) if h.get("job_type") == "lds")
    summary = _wandb(lds_run)["summary"]
    assert summary["lds/lds"] == pytest.approx(report["lds"], abs=1e-12)
    assert [summary["lds/ci_low"], summary["lds/ci_high"]] == pytest.approx(report["lds_ci"], abs=1e-12)
    assert "lds/scatter_table" in summary


def test_modeldiff_of_two_runs(ws):
    _, runs = ws.run(_command("modeldiff"))
    summary = json.loads((runs[0] / "modeldiff" / "modeldiff.json").read_text())
    comps = summary["b_minus_a"]["components"]
    assert len(comps) == 5 and all(len(c["top_train"]) == 16 for c in comps)
    assert len(list(runs[0].rglob("media/table/modeldiff/*/component_0/top_train*.table.json"))) == 2
    config = _wandb(_wandb_runs(runs[0])[0])["config"]
    assert config["n_components"] == 5 and config["a"].endswith("attrib")


def test_leakage_of_a_saved_result(ws):
    _, runs = ws.run(_command("leakage"))
    report = json.loads((runs[0] / "leakage.json").read_text())
    assert report["flags"] <= 3 and len(report["pairs"]) == min(50, report["n_candidates"])


def test_in_run_tracin_needs_no_second_pass(ws):
    from lightning_attrib import load_results

    _, runs = ws.run(_command("callbacks=in_run"))
    res, inrun = load_results(runs[0] / "attrib"), load_results(runs[0] / "inrun_tracin")
    assert res.manifest["method"] == "tracin" and res.manifest["post_hoc_examples"] == 0
    assert not (runs[0] / "attrib" / "features").exists()       # the training set was never re-read
    np.testing.assert_array_equal(np.asarray(res.scores), np.asarray(inrun.scores))  # the capture's own sums


def test_captured_trak_takes_the_training_features_from_the_steps(ws):
    from lightning_attrib import load_results

    _, runs = ws.run(_command("callbacks=capture"))
    res = load_results(runs[0] / "attrib")
    info = res.manifest["train_features"]
    assert res.manifest["method"] == "trak" and info["source"] == "GradientCapture snapshot windows"
    assert set(info["captured_rows"].values()) == {N_TRAIN} and set(info["post_hoc_rows"].values()) == {0}
    assert np.isfinite(np.asarray(res.scores)).all()


def test_ensemble_of_seeds_is_the_mean_of_its_members(ws):
    from lightning_attrib import load_results

    out, runs = ws.run(_command("ensemble experiment=demo"))
    top = next(r for r in runs if (r / "ensemble").is_dir())
    merged = load_results(top / "ensemble")
    members = [load_results(top / "members" / f"seed{s}" / "attrib") for s in (0, 1)]
    assert merged.manifest["ensemble"]["num_models"] == 2
    assert not np.allclose(members[0].self_influence, members[1].self_influence)   # different models
    np.testing.assert_allclose(merged.self_influence, np.mean([m.self_influence for m in members], axis=0),
                               rtol=1e-5, atol=1e-7)
    assert "attrib/mislabel/self_influence/auroc" in out.stdout

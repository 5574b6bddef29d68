"""DDP for real on CPU (gloo): 1 rank == 2 ranks, uneven/empty shards, crash + resume, fit under DDP.

Two-rank runs are subprocesses of tests/scripts/ddp_run.py: inside pytest, strategy="ddp" would re-launch pytest.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_attrib import load_results
from lightning_attrib.standalone import snapshots_from
from lightning_attrib.core import TRAK, Attributor
from lightning_attrib.models import LitClassifier

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"


def run(*args, expect_ok=True, timeout=240):
    out = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    d = tmp_path_factory.mktemp("snaps")
    torch.manual_seed(0)
    for step in range(2):
        model = LitClassifier(arch="mlp", hidden=16)
        torch.save({"state_dict": model.state_dict(), "lr": 0.1, "step": step}, d / f"snapshot-step{step:08d}.pt")
    return d


def assert_same(a, b, rtol=1e-5):
    np.testing.assert_array_equal(a.train_ids, b.train_ids)
    np.testing.assert_array_equal(a.query_ids, b.query_ids)
    scale = np.abs(np.asarray(a.scores)).max()
    assert np.abs(np.asarray(a.scores) - np.asarray(b.scores)).max() <= rtol * scale
    assert np.abs(a.self_influence - b.self_influence).max() <= rtol * np.abs(a.self_influence).max()


def single_rank(snapshot_dir, out, n_train=203, n_query=11):
    """The same attribution in this process, one rank (LocalDist)."""
    from tests.scripts.ddp_run import datasets

    train, query = datasets(n_train, n_query)
    return Attributor(LitClassifier(arch="mlp", hidden=16), TRAK(), train, query, out, proj_dim=64, shard_size=16,
                      batch_size=8).run(snapshots_from(snapshot_dir))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, snapshots):
    out = tmp_path_factory.mktemp("two_ranks")
    run("attribute", "--out", out, "--devices", 2, "--strategy", "ddp", "--snapshots", snapshots)
    return load_results(out)


def test_two_ranks_equal_one_rank_with_uneven_shards(tmp_path, snapshots, two_ranks):
    one = single_rank(snapshots, tmp_path)  # 203 rows in 13 shards of 16: rank 0 gets 7 shards, rank 1 gets 6
    assert two_ranks.manifest["world_size"] == 2 and one.manifest["world_size"] == 1
    assert two_ranks.scores.shape == (203, 11)
    assert_same(one, two_ranks)


def test_rank_with_empty_query_block(tmp_path, snapshots):
    run("attribute", "--out", tmp_path / "two", "--devices", 2, "--strategy", "ddp", "--snapshots", snapshots,
        "--n-train", 37, "--n-query", 1)
    assert_same(single_rank(snapshots, tmp_path / "one", 37, 1), load_results(tmp_path / "two"))


def test_crashed_rank_resumes_from_finished_shards(tmp_path, snapshots, two_ranks):
    common = ["--snapshots", snapshots, "--devices", 2, "--strategy", "ddp"]
    crashed = run("attribute", "--out", tmp_path, "--crash-rank", 1, "--crash-after", 2, *common, expect_ok=False)
    assert crashed.returncode != 0
    assert not (tmp_path / "scores.npy").exists()
    train_dir = tmp_path / "features" / "margin" / "snapshot-step00000000" / "train"
    before = {p.name: p.stat().st_mtime_ns for p in train_dir.glob("shard-*.npy")}
    assert 2 < len(before) < 13  # 203 rows / 16 = 13 shards: some were finished, not all
    run("attribute", "--out", tmp_path, *common)
    after = {p.name: p.stat().st_mtime_ns for p in train_dir.glob("shard-*.npy")}
    assert len(after) == 13
    assert all(after[name] == mtime for name, mtime in before.items())  # finished shards were reused, not rewritten
    assert_same(two_ranks, load_results(tmp_path))


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_fit_under_ddp_writes_one_result_equal_to_single_rank(tmp_path, strategy):
    out = run("fit", "--out", tmp_path, "--devices", 2, "--strategy", strategy)
    assert "RESULT rows=203 cols=11 world=2" in out.stdout  # read back in the launching process (ddp_spawn: parent)
    res = load_results(tmp_path / "attrib")
    np.testing.assert_array_equal(res.train_ids, np.arange(203))  # no DistributedSampler padding duplicates
    snaps = snapshots_from(tmp_path / "snaps")
    assert len(snaps) == 2
    assert_same(single_rank(tmp_path / "snaps", tmp_path / "single"), res)

"""Top-k scoring (`Attributor(top_k=k)`): the same proponents/opponents as the full score matrix, without it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib import load_results
from lightning_attrib.core import TRAK, Attributor, Snapshot
from lightning_attrib.core.scoring import RunningTopK
from lightning_attrib.core.results import TOPK_FILES, FullScoresUnavailable

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _snapshots():
    g = torch.Generator().manual_seed(1)
    base = _model().state_dict()
    return [Snapshot(f"s{i}", state_dict={k: v + 0.2 * i * torch.randn(v.shape, generator=g) for k, v in base.items()})
            for i in range(2)]


def reference_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(proponent rows, their scores, opponent rows, their scores), each (n_query, k), from the full matrix."""
    pro = np.argsort(-scores, axis=0, kind="stable")[:k].T
    opp = np.argsort(scores, axis=0, kind="stable")[:k].T
    cols = np.arange(scores.shape[1])[:, None]
    return pro, scores[pro, cols], opp, scores[opp, cols]


def assert_same_topk(rows, values, ref_rows, ref_values, full, atol=0.0):
    """Same scores rank by rank; same rows wherever the score is not tied (within atol) with another row's."""
    np.testing.assert_allclose(values, ref_values, rtol=0, atol=atol)
    for q in range(rows.shape[0]):
        col = full[:, q]
        np.testing.assert_allclose(col[rows[q]], ref_values[q], rtol=0, atol=atol)  # the rows really score that
        for j in range(rows.shape[1]):
            tied = np.sum(np.abs(col - ref_values[q, j]) <= atol) > 1
            assert tied or rows[q, j] == ref_rows[q, j], (q, j)


@pytest.fixture(scope="module")
def full_and_topk(tmp_path_factory):
    """One featurization; the full matrix, then top-k from the same store (several shards and query chunks)."""
    out = tmp_path_factory.mktemp("topk")
    kw = dict(proj_dim=32, shard_size=16, query_chunk=5)
    train, query = _data(150, 0), _data(13, 1)
    full = Attributor(_model(), TRAK(), train, query, out, **kw).run(_snapshots())
    full_scores = np.array(full.scores)
    topk = Attributor(_model(), TRAK(), train, query, out, top_k=7, **kw).run(_snapshots())
    return full_scores, full, topk, out


def test_topk_equals_topk_of_the_full_matrix(full_and_topk):
    full_scores, full, topk, _ = full_and_topk
    pro, pro_s, opp, opp_s = reference_topk(full_scores, 7)
    t = topk.topk
    assert t.proponents.shape == t.opponents.shape == (13, 7) and t.proponents.dtype == np.int64
    # same Attributor, same blocks, same float32 GEMMs: the scores agree bit for bit
    assert_same_topk(t.proponents, t.proponent_scores, pro, pro_s, full_scores)
    assert_same_topk(t.opponents, t.opponent_scores, opp, opp_s, full_scores)
    for q in (0, 6, 12):
        for method in ("top_proponents", "top_opponents"):
            ids, vals = getattr(topk, method)(q, 3)
            ref_ids, ref_vals = getattr(full, method)(q, 3)
            np.testing.assert_array_equal(vals, ref_vals)
            np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(topk.self_influence, full.self_influence)


def test_topk_result_files_and_clear_errors(full_and_topk):
    _, _, topk, out = full_and_topk
    assert not (out / "scores.npy").exists()  # the earlier full run's matrix is not left to be mistaken for this one
    assert all((out / name).exists() for name in TOPK_FILES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["top_k"] == 7 and manifest["score_dtype"] == "float32"
    res = load_results(out)
    assert res.top_k == 7 and not res.has_scores and set(TOPK_FILES) <= set(res.files)
    with pytest.raises(FullScoresUnavailable, match=r"top 7 .*rerun attribution without top_k"):
        res.scores
    with pytest.raises(ValueError, match="keeps the top 7 per query"):
        res.top_proponents(0, 8)
    with pytest.raises(IndexError, match="13 queries"):
        res.top_opponents(13, 2)


def test_full_run_after_topk_run_replaces_the_topk_files(tmp_path):
    train, query = _data(40, 0), _data(4, 1)
    Attributor(_model(), TRAK(), train, query, tmp_path, proj_dim=8, top_k=3).run()
    res = Attributor(_model(), TRAK(), train, query, tmp_path, proj_dim=8).run()
    assert res.has_scores and res.top_k is None and res.scores.shape == (40, 4)
    assert not any((tmp_path / name).exists() for name in TOPK_FILES)


def test_top_k_larger_than_n_train_ranks_all_and_float64_matches(tmp_path):
    train, query = _data(20, 0), _data(3, 1)
    full = Attributor(_model(), TRAK(), train, query, tmp_path / "full", proj_dim=8, score_dtype="float64").run()
    res = Attributor(_model(), TRAK(), train, query, tmp_path / "k", proj_dim=8, top_k=50, score_dtype="float64").run()
    assert res.top_k == 20 and res.manifest["score_dtype"] == "float64"
    scores = np.asarray(full.scores)
    np.testing.assert_array_equal(np.sort(res.topk.proponents, axis=1), np.tile(np.arange(20), (3, 1)))
    assert_same_topk(res.topk.proponents, res.topk.proponent_scores, *reference_topk(scores, 20)[:2], scores)


@pytest.mark.parametrize("kw,match", [
    ({"top_k": 0}, "top_k must be None"), ({"top_k": 2.5}, "top_k must be None"),
    ({"top_k": True}, "top_k must be None"),
    ({"score_dtype": "float16"}, "score_dtype must be 'float32'"),
])
def test_bad_top_k_and_score_dtype_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Attributor(_model(), TRAK(), _data(5, 0), _data(2, 1), tmp_path, **kw)


def test_running_topk_over_blocks_equals_one_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(100, 6, generator=g)
    for largest in (True, False):
        running = RunningTopK(5, largest)
        for lo in range(0, 100, 7):  # uneven blocks, the last one short
            running.update(lo, scores[lo:lo + 7])
        values, rows = torch.topk(scores.T, 5, dim=1, largest=largest)
        torch.testing.assert_close(running.values, values, rtol=0, atol=0)
        torch.testing.assert_close(running.rows, rows, rtol=0, atol=0)


def test_topk_on_two_ddp_ranks_equals_one_rank_full_matrix(tmp_path):
    """Each rank keeps the top k of its query block; rank 0 stacks them (a real 2-rank gloo run, ~10 s)."""
    from tests.test_ddp import single_rank

    torch.manual_seed(0)
    from lightning_attrib.models import LitClassifier

    snaps = tmp_path / "snaps"
    snaps.mkdir()
    for step in range(2):
        model = LitClassifier(arch="mlp", hidden=16)
        torch.save({"state_dict": model.state_dict(), "lr": 0.1, "step": step}, snaps / f"snapshot-step{step:08d}.pt")
    out = subprocess.run([sys.executable, str(SCRIPT), "attribute", "--out", str(tmp_path / "two"), "--devices", "2",
                          "--strategy", "ddp", "--snapshots", str(snaps), "--top-k", "5"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    two = load_results(tmp_path / "two")
    assert two.manifest["world_size"] == 2 and two.topk.proponents.shape == (11, 5)
    full = np.asarray(single_rank(snaps, tmp_path / "one").scores)  # 203 x 11, one rank
    atol = 1e-5 * np.abs(full).max()  # two ranks sum the kernel in another order: scores agree to float32 rounding
    pro, pro_s, opp, opp_s = reference_topk(full, 5)
    assert_same_topk(two.topk.proponents, two.topk.proponent_scores, pro, pro_s, full, atol)
    assert_same_topk(two.topk.opponents, two.topk.opponent_scores, opp, opp_s, full, atol)


def test_wandb_gallery_reads_a_topk_result(full_and_topk):
    """The W&B query gallery works from top-k files alone; k is capped at the result's top_k."""
    pytest.importorskip("wandb")
    from lightning_attrib.reporting.reporters import WandbReporter

    _, full, topk, _ = full_and_topk
    train, query = _data(150, 0), _data(13, 1)
    table = WandbReporter(None, [])._gallery_table(topk, train, query, None, None, False, n_queries=3, k=9)
    assert len(table.data) == 3 and "proponent_7" in table.columns and "proponent_8" not in table.columns
    ref = WandbReporter(None, [])._gallery_table(full, train, query, None, None, False, n_queries=3, k=7)
    assert table.data == ref.data  # same proponents/opponents and scores as from the full matrix
    assert set(topk.files) == {"manifest.json", "self_influence.npy", "train_ids.npy", "query_ids.npy", *TOPK_FILES}

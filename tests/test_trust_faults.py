"""Issue 14, "never silently wrong": each bad input or fault of the issue's table gives a correct result or a clear
error (the rows owned by the store / results / pipeline). Every test here failed on the code before the fix."""
import json
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor, Snapshot, load_results
from lightning_attrib.core.io import BatchFingerprint, file_sha256
from lightning_attrib.core.lock import OutDirLockedError
from lightning_attrib.core.methods import make_method
from lightning_attrib.core.results import ResultError
from lightning_attrib.core.store import CorruptShardError, FeatureStore


def _data(n, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y if labels is None else labels)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


KW = dict(proj_dim=16, projector="rademacher", shard_size=8, batch_size=4)


def _run(out, train, query, method=None, **kw):
    return Attributor(_model(), method or TRAK(), train, query, out, **{**KW, **kw}).run()


def _assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))
    np.testing.assert_array_equal(a.self_influence, b.self_influence)


# -- 1. content-addressed features ---------------------------------------------------------------------------
@pytest.mark.parametrize("changed", ["train labels", "train examples", "query examples"])
def test_same_length_other_data_is_recomputed_not_reused(tmp_path, changed):
    train, query = _data(30), _data(6, seed=1)
    old = _run(tmp_path / "run", train, query)
    if changed == "train labels":
        train = _data(30, labels=(train.tensors[1] + 1) % 3)
    elif changed == "train examples":
        train = _data(30, seed=5)
    else:
        query = _data(6, seed=7)
    with pytest.warns(RuntimeWarning, match="examples .* differ from this run's"):
        rerun = _run(tmp_path / "run", train, query)
    fresh = _run(tmp_path / "fresh", train, query)
    _assert_same(rerun, fresh)
    assert not np.array_equal(np.asarray(rerun.scores), np.asarray(old.scores))


def test_resume_with_permuted_labels_recomputes_the_finished_shards(tmp_path):
    train, query = _data(40), _data(6, seed=1)

    def crash_after_three(stage, done, total):
        if stage.endswith("/train") and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", train, query, progress=crash_after_three)
    assert len(list((tmp_path / "run").rglob("shard-*.json"))) == 3
    permuted = _data(40, labels=train.tensors[1][torch.randperm(40, generator=torch.Generator().manual_seed(1))])
    resumed = _run(tmp_path / "run", permuted, query)
    _assert_same(resumed, _run(tmp_path / "fresh", permuted, query))


def test_data_fingerprint_does_not_depend_on_batching():
    x, y = torch.randn(10, 3), torch.arange(10)
    whole, parts = BatchFingerprint(), BatchFingerprint()
    whole.update((x, y))
    for lo in range(0, 10, 3):
        parts.update((x[lo:lo + 3], y[lo:lo + 3]))
    assert whole.hexdigest() == parts.hexdigest()
    other = BatchFingerprint()
    other.update((x, y.flip(0)))
    assert other.hexdigest() != whole.hexdigest()


# -- 2. one writer, results published as one unit ----------------------------------------------------------------
def _lock_file(out_dir, pid, host=None):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "start": None}))


def test_live_writer_blocks_a_second_run_before_any_work(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_file(tmp_path / "run", holder.pid)
        with pytest.raises(OutDirLockedError, match=f"another live process \\(pid {holder.pid}"):
            _run(tmp_path / "run", _data(10), _data(3), method=make_method("grad-dot"))
        assert not (tmp_path / "run" / "features").exists()  # refused before any work
        _lock_file(tmp_path / "other", 123, host="some-other-node")
        with pytest.raises(OutDirLockedError, match="on host 'some-other-node'.*delete"):
            _run(tmp_path / "other", _data(10), _data(3))
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_file(tmp_path / "run", dead.pid)
    with pytest.warns(RuntimeWarning, match=f"stale lock .* process {dead.pid}"):
        res = _run(tmp_path / "run", _data(10), _data(3))
    _assert_same(res, _run(tmp_path / "fresh", _data(10), _data(3)))
    assert not (tmp_path / "run" / ".lock").exists()  # released at the end


def test_two_processes_trak_and_grad_dot_into_one_out_dir(tmp_path):
    """Both start together; whichever gets the lock writes a result whose manifest names its own method and whose
    scores are that method's; the other fails at once with the lock message (or runs after the first finished)."""
    script = (
        "import sys, torch; from torch import nn; from torch.utils.data import TensorDataset\n"
        "from lightning_attrib.core import Attributor; from lightning_attrib.core.methods import make_method\n"
        "torch.set_num_threads(1); torch.manual_seed(0)\n"
        "m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))\n"
        "g = torch.Generator().manual_seed(0); x, y = torch.randn(400, 6, generator=g), torch.randint(0, 3, (400,), generator=g)\n"
        "Attributor(m, make_method(sys.argv[1]), TensorDataset(x, y), TensorDataset(x[:5], y[:5]), sys.argv[2],\n"
        "           proj_dim=16, projector='rademacher', shard_size=8, batch_size=4).run()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    procs = {m: subprocess.Popen([sys.executable, "-c", script, m, str(tmp_path / "run")], env=env,
                                 stderr=subprocess.PIPE, text=True) for m in ("trak", "grad-dot")}
    errs = {m: p.communicate(timeout=120)[1] for m, p in procs.items()}
    ok = [m for m, p in procs.items() if p.returncode == 0]
    for m, p in procs.items():
        if p.returncode != 0:
            assert "OutDirLockedError" in errs[m] and "one writer per out_dir" in errs[m], errs[m][-2000:]
    assert ok, errs
    res = load_results(tmp_path / "run")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 6, generator=g), torch.randint(0, 3, (400,), generator=g)
    method = res.manifest["method"]
    assert method in ok
    torch.set_num_threads(1)
    ref = Attributor(_model(), make_method(method), TensorDataset(x, y), TensorDataset(x[:5], y[:5]),
                     tmp_path / "ref", **KW).run()
    np.testing.assert_array_equal(np.asarray(res.scores), np.asarray(ref.scores))


def test_crash_after_scores_before_manifest_never_mixes(tmp_path, monkeypatch):
    old = _run(tmp_path / "run", _data(20), _data(4, seed=1))
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("manifest.json") and ".staging-" in str(src) and ".staging-" not in str(dst):
            raise KeyboardInterrupt  # killed after scores.npy landed, before manifest.json
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", _data(20, seed=3), _data(4, seed=1))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not np.array_equal(np.load(tmp_path / "run" / "scores.npy"), np.asarray(old.scores))  # new scores there
    with pytest.raises(FileNotFoundError, match="not a finished attribution result .*interrupted"):
        load_results(tmp_path / "run")
    # an older writer's order (files first, manifest last) over an older result: the checksums catch the mix
    manifest_old = json.loads(json.dumps(old.manifest))
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest_old))
    with pytest.raises(ResultError, match="scores.npy does not match manifest.json"):
        load_results(tmp_path / "run")
    rerun = _run(tmp_path / "run", _data(20, seed=3), _data(4, seed=1))
    _assert_same(rerun, _run(tmp_path / "fresh", _data(20, seed=3), _data(4, seed=1)))
    assert not list((tmp_path / "run").glob(".staging-*"))


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    res = _run(tmp_path, _data(10), _data(3))
    files = res.manifest["files"]
    assert sorted(files) == sorted(f for f in res.files if f != "manifest.json")
    for name, entry in files.items():
        assert entry == {"size": (tmp_path / name).stat().st_size, "sha256": file_sha256(tmp_path / name)}
    assert res.manifest["features"]["proj_dim"] == 16 and res.manifest["format_version"].startswith("2.")


# -- 3. shard integrity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["flip 200 bytes", "truncate"])
def test_corrupt_shard_is_named_and_recomputed_on_resume(tmp_path, fault):
    train, query = _data(30), _data(4, seed=1)
    good = _run(tmp_path / "run", train, query)
    shard = tmp_path / "run" / "features" / "margin" / "final" / "train" / "shard-000001.npy"
    raw = bytearray(shard.read_bytes())
    if fault == "truncate":
        shard.write_bytes(bytes(raw[:len(raw) // 2]))
    else:
        rng = np.random.default_rng(0)
        for pos in rng.choice(np.arange(128, len(raw)), 200, replace=False):
            raw[pos] ^= 0xFF
        shard.write_bytes(bytes(raw))
    settings = json.loads((shard.parents[2] / "settings.json").read_text())
    store = FeatureStore(shard.parents[2], settings["settings"], settings["shard_size"], create=False)
    with pytest.raises(CorruptShardError, match="shard 1 of final/train .*shard-000001.npy"):
        store.read_features("final", "train", 1)
    with pytest.warns(RuntimeWarning, match="recomputing shard 1 of final/train .*shard-000001.npy"):
        resumed = _run(tmp_path / "run", train, query)
    _assert_same(resumed, good)


# -- 4. finite or refused ----------------------------------------------------------------------------------------
class _Poisoned(nn.Module):
    """Logits of a small MLP; examples whose first input is 99 get `value` in logit class 1 (inf) or everywhere
    (NaN), written over the logits so that no gradient flows from it."""

    def __init__(self, value):
        super().__init__()
        self.net, self.value = _model(), value

    def forward(self, x):
        logits = self.net(x)
        poison = (x[:, :1] == 99).expand_as(logits)
        if self.value == float("inf"):
            poison = poison & (torch.arange(logits.shape[1]) == 1)
        return torch.where(poison, torch.full_like(logits, self.value), logits)


def _poisoned_data(bad_rows, n=20):
    ds = _data(n)
    ds.tensors[0][bad_rows, 0] = 99
    ds.tensors[1][bad_rows] = 0
    return ds


@pytest.mark.parametrize("value, what", [(float("inf"), "output"), (float("nan"), "output")])
def test_non_finite_outputs_are_an_error_naming_example_and_snapshot(tmp_path, value, what):
    with pytest.raises(ValueError, match=f"non-finite {what} .*train example 13 at snapshot 'final'"):
        Attributor(_Poisoned(value), TRAK(), _poisoned_data([13]), _data(3), tmp_path, **KW).run()


def test_excluded_examples_are_listed_and_the_rest_is_exact(tmp_path):
    bad = [5, 13]
    train = _poisoned_data(bad)
    res = Attributor(_Poisoned(float("nan")), TRAK(), train, _data(3), tmp_path / "x", non_finite="exclude",
                     **KW).run()
    assert res.manifest["excluded"] == {"train": bad, "query": []} and res.manifest["non_finite"] == "exclude"
    scores = np.asarray(res.scores)
    assert np.isnan(scores[bad]).all() and np.isnan(res.self_influence[bad]).all()
    keep = [i for i in range(20) if i not in bad]
    # the other rows equal a run without the excluded examples (zero features: no effect on the kernel)
    ref = Attributor(_Poisoned(float("nan")), TRAK(), TensorDataset(*(t[keep] for t in train.tensors)), _data(3),
                     tmp_path / "ref", **KW).run()
    np.testing.assert_allclose(scores[keep], np.asarray(ref.scores), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.self_influence[keep], ref.self_influence, rtol=1e-5)
    assert set(res.suspects(5)[0]).isdisjoint(bad)
    top = Attributor(_Poisoned(float("nan")), TRAK(), train, _data(3), tmp_path / "top", non_finite="exclude",
                     top_k=18, **KW).run()
    assert all(set(top.topk.proponents[q]).isdisjoint(bad) for q in range(3))


# -- 5. validate before writing -----------------------------------------------------------------------------------
def test_unknown_projector_lists_every_kind_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        Attributor(_model(), TRAK(), _data(10), _data(3), out, projector="sparse")
    for kind in ("tensorsketch", "factorized", "rademacher", "gaussian", "identity"):
        assert repr(kind) in str(err.value)
    assert "'sparse'" in str(err.value) and not out.exists()
    _assert_same(_run(out, _data(10), _data(3)), _run(tmp_path / "fresh", _data(10), _data(3)))


def test_unreadable_snapshot_fails_at_once_with_path_and_fix(tmp_path):
    missing = tmp_path / "snaps" / "epoch3.pt"
    with pytest.raises(FileNotFoundError, match=f"cannot read snapshot 'epoch3' at {missing}.*every node"):
        Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path / "run", **KW).run(
            [Snapshot("epoch3", path=str(missing))])
    assert not (tmp_path / "run" / "features").exists()


# -- load_results refuses what it cannot trust ----------------------------------------------------------------------
def test_load_results_refuses_newer_format_and_wrong_shapes(tmp_path):
    _run(tmp_path, _data(10), _data(3))
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": "9.0.0"}))
    with pytest.raises(ResultError, match="newer lightning-attrib \\(result format 9.0.0.*Upgrade"):
        load_results(tmp_path)
    # scores.npy of the wrong shape, with a manifest that vouches for its bytes: the shape check still refuses
    np.save(tmp_path / "scores.npy", np.zeros((3, 10), np.float32))
    manifest["files"]["scores.npy"] = {"size": (tmp_path / "scores.npy").stat().st_size,
                                       "sha256": file_sha256(tmp_path / "scores.npy")}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ResultError, match=r"scores.npy \(3, 10\) != \(10, 3\)"):
        load_results(tmp_path)


def test_write_result_refuses_non_finite_scores(tmp_path):
    from lightning_attrib.core.results import write_result

    scores = np.ones((4, 2), np.float32)
    scores[2, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite score .* train example 2, query 1"):
        write_result(tmp_path, manifest={}, self_influence=np.ones(4), train_ids=np.arange(4),
                     query_ids=np.arange(2), scores=scores)
    assert not (tmp_path / "scores.npy").exists()
    res = write_result(tmp_path, manifest={"excluded": {"train": [2]}}, self_influence=np.ones(4),
                       train_ids=np.arange(4), query_ids=np.arange(2), scores=scores)
    assert res.scores[2, 1] == np.inf and load_results(tmp_path).manifest["files"]["scores.npy"]["size"] > 0


def test_attribute_refuses_bad_arguments_before_any_rank_or_file(tmp_path):
    from lightning_attrib import attribute

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="projector must be one of: 'tensorsketch'.*'identity'.*Got 'sparse'"):
        attribute(_model(), _data(10), _data(3), out, projector="sparse")
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['proj_dims'\]"):
        attribute(_model(), _data(10), _data(3), out, proj_dims=8)
    with pytest.raises(ValueError, match="non_finite must be 'raise'"):
        attribute(_model(), _data(10), _data(3), out, non_finite="skip")
    assert not out.exists()


def test_lock_admits_one_writer_at_a_time_across_processes(tmp_path):
    """Four processes grab the lock repeatedly for 1.5 s: the times they hold it never overlap."""
    script = (
        "import importlib.util, json, sys, time\n"
        "spec = importlib.util.spec_from_file_location('lock', sys.argv[2])\n"  # stdlib only: no torch import
        "lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)\n"
        "OutDirLock, OutDirLockedError = lock.OutDirLock, lock.OutDirLockedError\n"
        "spans, deadline = [], time.time() + 1.5\n"
        "while time.time() < deadline:\n"
        "    try:\n"
        "        with OutDirLock(sys.argv[1]):\n"
        "            t0 = time.time(); time.sleep(0.02); spans.append((t0, time.time()))\n"
        "    except OutDirLockedError:\n"
        "        pass\n"
        "print(json.dumps(spans))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    import lightning_attrib.core.lock as lock_module

    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run"), lock_module.__file__], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    spans = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(len(s) for s in spans) > 10, [len(s) for s in spans]
    flat = sorted(tuple(s) for proc in spans for s in proc)
    assert all(b[0] >= a[1] for a, b in zip(flat, flat[1:]))  # no two holders at once
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("damaged", ["settings.json", "final/fingerprint.json", "final/train/ids.npy",
                                     "final/train/shard-000002.json", "final/query/loss_weight-000000.npy"])
def test_damaged_store_metadata_is_recomputed(tmp_path, damaged):
    train, query = _data(30), _data(4, seed=1)
    good = _run(tmp_path / "run", train, query)
    path = tmp_path / "run" / "features" / "margin" / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _run(tmp_path / "run", train, query)
    assert any("recomputing" in str(w.message) for w in caught)
    _assert_same(again, good)

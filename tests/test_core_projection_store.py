"""Projection (JL, determinism, chunking), store resumption, and the errors bad input gets."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor, RandomProjector, Snapshot, StoreMismatchError
from lightning_attrib.core import gradients as gradients_mod
from lightning_attrib.core.projection import BLOCK_ROWS


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_preserves_inner_products(kind):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20, 3000, generator=g)
    proj = RandomProjector(3000, 4096, kind, seed=1)
    pv = proj(v).double()
    gram, pgram = (v.double() @ v.double().T), pv @ pv.T
    norms = v.double().norm(dim=1)
    err = (pgram - gram).abs() / (norms[:, None] * norms[None, :])
    assert err.max() < 0.08  # JL: distortion ~ 1/sqrt(k) = 0.016 per pair, 5 sigma margin
    assert err.mean() < 0.02


def test_projection_deterministic_and_chunking_invariant():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 5 * BLOCK_ROWS + 17, generator=g)
    a = RandomProjector(v.shape[1], 64, seed=7, chunk_rows=BLOCK_ROWS, cache_bytes=0)(v)
    b = RandomProjector(v.shape[1], 64, seed=7, chunk_rows=8 * BLOCK_ROWS)(v)
    c = RandomProjector(v.shape[1], 64, seed=7)(v)
    assert torch.equal(b, c)  # same seed -> bit-identical
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)  # chunking only reorders the sum
    full = v.double() @ RandomProjector(v.shape[1], 64, seed=7).matrix().double()
    torch.testing.assert_close(c.double(), full, rtol=1e-5, atol=1e-5)
    assert not torch.equal(c, RandomProjector(v.shape[1], 64, seed=8)(v))


def _data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


class _Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    # dense projector: the count below hooks its per-example gradients (the store logic is the same for all)
    train, query = _data(50), _data(12, seed=1)
    reference = Attributor(_model(), TRAK(), train, query, tmp_path / "ref", proj_dim=32, shard_size=8, projector="rademacher").run()

    calls = {"examples": 0}
    original = gradients_mod.PerExampleGradients.__call__

    def counting(self, batch):
        out = original(self, batch)
        calls["examples"] += out.shape[0]
        return out

    monkeypatch.setattr(gradients_mod.PerExampleGradients, "__call__", counting)

    def crash_after_three(stage, done, total):
        if stage.endswith("/train") and done == 3:
            raise _Crash("simulated crash")

    with pytest.raises(_Crash):
        Attributor(_model(), TRAK(), train, query, tmp_path / "run", proj_dim=32, shard_size=8, projector="rademacher",
                   progress=crash_after_three).run()
    assert calls["examples"] == 24  # three shards of 8 finished and were kept
    calls["examples"] = 0
    resumed = Attributor(_model(), TRAK(), train, query, tmp_path / "run", proj_dim=32, shard_size=8, projector="rademacher").run()
    assert calls["examples"] == (50 - 24) + 12  # only the unfinished train rows and the queries
    np.testing.assert_array_equal(np.asarray(resumed.scores), np.asarray(reference.scores))
    np.testing.assert_array_equal(resumed.self_influence, reference.self_influence)
    np.testing.assert_array_equal(resumed.train_ids, np.arange(50))


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        Attributor(_model(), TRAK(), _data(0), _data(3), tmp_path)
    with pytest.raises(ValueError, match="query_dataset is empty"):
        Attributor(_model(), TRAK(), _data(5), _data(0), tmp_path)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_proj_dim_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="proj_dim must be a positive integer"):
        Attributor(_model(), TRAK(), _data(5), _data(3), tmp_path, proj_dim=bad)


def test_unwritable_out_dir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="out_dir=.* is not writable"):
        Attributor(_model(), TRAK(), _data(5), _data(3), blocker / "sub")


def test_non_finite_gradient_names_the_example_and_keeps_finished_shards(tmp_path):
    ds = _data(30)
    ds.tensors[0][17, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite gradient for train example 17"):
        Attributor(_model(), TRAK(), ds, _data(3), tmp_path, proj_dim=8, shard_size=8).run()
    train_dir = tmp_path / "features" / "margin" / "final" / "train"
    done = sorted(p.name for p in train_dir.glob("shard-*.npy"))
    assert done == ["shard-000000.npy", "shard-000001.npy"]  # the shards before the bad one survive
    weights = sorted(p.name for p in train_dir.glob("loss_weight-*.npy"))
    assert weights == ["loss_weight-000000.npy", "loss_weight-000001.npy"]
    assert not list(train_dir.glob(".*tmp*"))  # no temporary file left behind


def _same_result(a, b):
    np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))
    np.testing.assert_array_equal(a.self_influence, b.self_influence)


def test_store_written_with_other_settings_is_recomputed(tmp_path):
    # issue 12/14: a rerun into the same out_dir with other settings recomputes the features (never raises after
    # training, never reuses): each result equals a fresh run's, and the warning names what changed
    Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path, proj_dim=8).run()
    with pytest.warns(RuntimeWarning, match="proj_dim: stored 8 vs now 16"):
        res = Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path, proj_dim=16).run()
    _same_result(res, Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path / "fresh16", proj_dim=16).run())
    with pytest.warns(RuntimeWarning, match="seed: stored 0 vs now 1"):
        res = Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path, proj_dim=16, seed=1).run()
    _same_result(res, Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path / "fresh_s1", proj_dim=16,
                                 seed=1).run())
    other = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.warns(RuntimeWarning, match="params"):
        res = Attributor(other, TRAK(), _data(10), _data(3), tmp_path, proj_dim=8).run()
    _same_result(res, Attributor(other, TRAK(), _data(10), _data(3), tmp_path / "fresh_other", proj_dim=8).run())


def test_changed_checkpoint_weights_are_recomputed(tmp_path):
    model = _model()
    Attributor(model, TRAK(), _data(10), _data(3), tmp_path, proj_dim=8).run([Snapshot("epoch1", state_dict=model.state_dict())])
    changed = {k: v + 1 for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="weights changed"):
        res = Attributor(model, TRAK(), _data(10), _data(3), tmp_path, proj_dim=8).run([Snapshot("epoch1", state_dict=changed)])
    _same_result(res, Attributor(model, TRAK(), _data(10), _data(3), tmp_path / "fresh", proj_dim=8).run(
        [Snapshot("epoch1", state_dict=changed)]))
    # a permutation keeps every tensor's sum and sum of squares (the old fingerprint): still recomputed
    swapped = {k: v.clone() for k, v in changed.items()}
    swapped["0.weight"] = swapped["0.weight"].flip(0)
    res = Attributor(model, TRAK(), _data(10), _data(3), tmp_path, proj_dim=8).run([Snapshot("epoch1", state_dict=swapped)])
    _same_result(res, Attributor(model, TRAK(), _data(10), _data(3), tmp_path / "fresh_swapped", proj_dim=8).run(
        [Snapshot("epoch1", state_dict=swapped)]))


def test_snapshot_of_another_architecture_is_refused(tmp_path):
    other = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).state_dict()
    with pytest.raises(ValueError, match="does not fit the module"):
        Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path, proj_dim=8).run([Snapshot("x", state_dict=other)])


def test_changed_dataset_is_recomputed(tmp_path):
    Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path, proj_dim=8).run()
    res = Attributor(_model(), TRAK(), _data(12), _data(3), tmp_path, proj_dim=8).run()
    _same_result(res, Attributor(_model(), TRAK(), _data(12), _data(3), tmp_path / "fresh", proj_dim=8).run())


def test_self_influence_can_be_skipped_and_says_so(tmp_path):
    full = Attributor(_model(), TRAK(), _data(20), _data(4), tmp_path / "a", proj_dim=8).run()
    res = Attributor(_model(), TRAK(), _data(20), _data(4), tmp_path / "b", proj_dim=8, self_influence=False).run()
    assert np.isnan(res.self_influence).all() and res.manifest["self_influence_computed"] is False
    np.testing.assert_array_equal(np.asarray(res.scores), np.asarray(full.scores))


def test_params_subset_equals_freezing_the_other_parameters(tmp_path):
    sub = Attributor(_model(), TRAK(), _data(20), _data(4), tmp_path / "sub", proj_dim=8, params=["2."]).run()
    frozen = _model()
    frozen[0].requires_grad_(False)
    ref = Attributor(frozen, TRAK(), _data(20), _data(4), tmp_path / "frozen", proj_dim=8).run()
    np.testing.assert_array_equal(np.asarray(sub.scores), np.asarray(ref.scores))
    assert sub.manifest["params"] == ["2.weight", "2.bias"]


def test_each_snapshot_gets_its_own_projection(tmp_path):
    model = _model()
    snaps = [Snapshot(n, state_dict=model.state_dict()) for n in ("a", "b")]  # same weights, two names
    Attributor(_model(), TRAK(), _data(10), _data(3), tmp_path, proj_dim=64, projector="rademacher").run(snaps)
    from lightning_attrib.core import FeatureStore
    from lightning_attrib.core.store import StoreMismatchError  # noqa: F401

    import json
    settings = json.loads((tmp_path / "features" / "margin" / "settings.json").read_text())["settings"]
    store = FeatureStore(tmp_path / "features" / "margin", settings, 512, create=False)
    fa, fb = store.load("a", "train")[0], store.load("b", "train")[0]
    assert not np.allclose(fa, fb)  # independent projections of identical gradients
    np.testing.assert_allclose((fa * fa).sum(1), (fb * fb).sum(1), rtol=0.9)  # both JL sketches of one vector


def test_store_shards_are_npy_features_written_last(tmp_path):
    from lightning_attrib.core import FeatureStore

    store = FeatureStore(tmp_path, {"k": 4}, shard_size=3)
    store.create("s", "train", np.arange(5))
    f, w = np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(3, np.float32)
    store.write_shard("s", "train", 0, f, w)
    store.write_shard("s", "train", 1, f[:2], w[:2])
    (tmp_path / "s" / "train" / "shard-000001.npy").unlink()  # a crash after the loss weights, before the features
    assert store.pending_shards("s", "train") == [1]
    store.write_shard("s", "train", 1, f[:2] + 1, w[:2] * 2)  # the rerun overwrites the orphaned loss weights
    feats, weights = store.load("s", "train")
    np.testing.assert_array_equal(feats, np.concatenate([f, f[:2] + 1]))
    np.testing.assert_array_equal(weights, [1, 1, 1, 2, 2])
    mapped = store.read_features("s", "train", 0)  # copy-on-write map: writable, the file never changes
    mapped[:] = -1
    np.testing.assert_array_equal(store.read_features("s", "train", 0, mmap=False), f)
    with pytest.raises(ValueError, match=r"\(m, k\) features and \(m,\) loss weights"):
        store.write_shard("s", "train", 0, f, w[:2])


def test_store_of_the_older_npz_format_is_refused(tmp_path):
    import json

    from lightning_attrib.core import FeatureStore

    (tmp_path / "settings.json").write_text(json.dumps({"settings": {"k": 4}, "shard_size": 3}))  # no "format": v1
    with pytest.raises(StoreMismatchError, match="older lightning-attrib.*Delete that directory"):
        FeatureStore(tmp_path, {"k": 4}, shard_size=3)

"""The Lightning callbacks: result files, equality with the plain-torch engine, zero-config batches, resumption."""
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_attrib import AttributionCallback, CheckpointCapture, load_results
from lightning_attrib.core import TRAK, Attributor
from lightning_attrib.core.batches import BatchFormatError
from lightning_attrib.data import load_digits_tensors
from lightning_attrib.models import LitClassifier

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def digits(n_train=120, n_val=30):
    x, y = load_digits_tensors()
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val])


def trainer(tmp_path, callbacks, max_epochs=3, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kw)


def test_callback_writes_results_equal_to_plain_engine(tmp_path):
    train, val = digits()
    L.seed_everything(0)
    model = LitClassifier(arch="mlp", hidden=16, lr=0.05)
    capture = CheckpointCapture(dirpath=tmp_path / "snaps", every_n_epochs=1)
    attrib = AttributionCallback(proj_dim=64, out_dir=tmp_path / "attrib", shard_size=50)
    trainer(tmp_path, [capture, attrib]).fit(model, DataLoader(train, batch_size=32, shuffle=True),
                                             DataLoader(val, batch_size=64))
    res = load_results(tmp_path / "attrib")
    assert res.scores.shape == (120, 30) and res.self_influence.shape == (120,)
    np.testing.assert_array_equal(res.train_ids, np.arange(120))  # index order despite shuffle=True in training
    np.testing.assert_array_equal(res.query_ids, np.arange(30))
    assert [s["name"] for s in res.manifest["snapshots"]] == [s.name for s in capture.snapshots]
    assert len(capture.snapshots) == 3 and all(s.lr == pytest.approx(0.05) for s in capture.snapshots)
    # the same snapshots through the plain-torch engine give the same scores
    ref = Attributor(LitClassifier(arch="mlp", hidden=16), TRAK(), train, val, tmp_path / "ref", proj_dim=64,
                     shard_size=50).run(capture.snapshots)
    np.testing.assert_allclose(np.asarray(res.scores), np.asarray(ref.scores), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.self_influence, ref.self_influence, rtol=1e-6)
    # the user's model keeps its final weights
    final = capture.snapshots[-1].load()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, final[k])


def test_callback_top_k_equals_top_of_the_full_matrix(tmp_path):
    """`AttributionCallback(top_k=k)` never writes the full matrix; its proponents are the top-k rows of the full
    scores of the same snapshots."""
    train, val = digits()
    L.seed_everything(0)
    capture = CheckpointCapture(dirpath=tmp_path / "snaps", every_n_epochs=1)
    attrib = AttributionCallback(proj_dim=64, out_dir=tmp_path / "attrib", shard_size=50, top_k=5)
    trainer(tmp_path, [capture, attrib]).fit(LitClassifier(arch="mlp", hidden=16, lr=0.05),
                                             DataLoader(train, batch_size=32), DataLoader(val, batch_size=64))
    res = load_results(tmp_path / "attrib")
    assert not (tmp_path / "attrib" / "scores.npy").exists() and res.top_k == 5
    full = Attributor(LitClassifier(arch="mlp", hidden=16), TRAK(), train, val, tmp_path / "ref", proj_dim=64,
                      shard_size=50).run(capture.snapshots)
    scores = np.asarray(full.scores)
    for q in (0, 7, 29):
        ids, vals = res.top_proponents(query=q, k=5)
        np.testing.assert_allclose(vals, np.sort(scores[:, q])[::-1][:5], rtol=1e-5)
    with pytest.raises(ValueError, match="full score matrix"):
        AttributionCallback(top_k=5, leakage=True)


class DictDigits(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"image": x, "label": y, "meta": i}


def test_zero_config_reads_dict_batches_like_tuples(tmp_path):
    train, val = digits(60, 10)
    results = {}
    for kind, wrap in (("tuple", lambda d: d), ("dict", DictDigits)):
        L.seed_everything(0)
        model = LitClassifier(arch="logreg", lr=0.05)
        cb = AttributionCallback(proj_dim=32, out_dir=tmp_path / kind)
        trainer(tmp_path, [cb], max_epochs=2).fit(model, DataLoader(wrap(train), batch_size=20),
                                                  DataLoader(wrap(val), batch_size=20))
        results[kind] = load_results(tmp_path / kind)
    np.testing.assert_allclose(np.asarray(results["dict"].scores), np.asarray(results["tuple"].scores), rtol=1e-5)


class OpaqueBatches(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"pixels": torch.zeros(64), "cls": torch.tensor(0)}


class OpaqueModule(LitClassifier):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch["pixels"]), batch["cls"])

    def validation_step(self, batch, batch_idx):
        pass


def test_unreadable_batches_ask_for_output_fn(tmp_path):
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "a")
    with pytest.raises(BatchFormatError, match="Pass `output_fn=`"):
        trainer(tmp_path, [cb], max_epochs=1).fit(OpaqueModule(arch="logreg"), DataLoader(OpaqueBatches(), batch_size=4),
                                                  DataLoader(OpaqueBatches(), batch_size=4))
    # with an output function it works
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "b", method_kwargs={"use_q": False},
                             output_fn=lambda m, b: m(b["pixels"]).gather(1, b["cls"].view(-1, 1)).squeeze(1))
    trainer(tmp_path, [cb], max_epochs=1).fit(OpaqueModule(arch="logreg"), DataLoader(OpaqueBatches(), batch_size=4),
                                              DataLoader(OpaqueBatches(), batch_size=4))
    assert load_results(tmp_path / "b").scores.shape == (8, 8)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "nope"}, "unknown attribution method"),
    ({"proj_dim": 0}, "proj_dim must be a positive integer"),
    ({"projector": "sparse?"}, "projector must be one of"),
    ({"train_dataset": object()}, "train_dataset must be a map-style dataset"),
    ({"method_kwargs": {"dampin": 1}}, "bad arguments for method 'trak'"),
])
def test_constructor_validates_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AttributionCallback(**kwargs)


def test_checkpoint_capture_validates_arguments():
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer"):
        CheckpointCapture(every_n_epochs=0)
    with pytest.raises(ValueError, match="set every_n_epochs or every_n_steps"):
        CheckpointCapture(every_n_epochs=None, num_snapshots=None)


def test_unwritable_out_dir_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    train, val = digits(20, 5)
    model = LitClassifier(arch="logreg")
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "file" / "attrib")
    with pytest.raises(ValueError, match="is not writable"):
        trainer(tmp_path, [cb], max_epochs=1).fit(model, DataLoader(train), DataLoader(val))
    assert model.global_step == 0


def test_resumed_fit_keeps_captured_snapshots(tmp_path):
    train, val = digits(60, 10)
    L.seed_everything(0)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    capture = CheckpointCapture(dirpath=tmp_path / "snaps", every_n_epochs=1)
    t = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[capture, ckpt_cb], logger=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    t.fit(LitClassifier(arch="logreg"), DataLoader(train, batch_size=20), DataLoader(val))
    first = [s.name for s in capture.snapshots]
    assert len(first) == 2
    capture2 = CheckpointCapture(dirpath=tmp_path / "snaps", every_n_epochs=1)
    t2 = L.Trainer(accelerator="cpu", max_epochs=4, callbacks=[capture2], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    t2.fit(LitClassifier(arch="logreg"), DataLoader(train, batch_size=20), DataLoader(val),
           ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    names = [s.name for s in capture2.snapshots]
    assert names[:2] == first and len(names) == 4
    steps = [s.step for s in capture2.snapshots]
    assert steps == sorted(steps) and steps[-1] == 12  # 3 batches x 4 epochs


def test_keep_limits_snapshots_on_disk(tmp_path):
    train, val = digits(40, 5)
    capture = CheckpointCapture(dirpath=tmp_path / "snaps", every_n_steps=1, keep=2)
    trainer(tmp_path, [capture], max_epochs=2).fit(LitClassifier(arch="logreg"), DataLoader(train, batch_size=10),
                                                   DataLoader(val))
    assert [s.step for s in capture.snapshots] == [7, 8]
    assert sorted(p.name for p in (tmp_path / "snaps").glob("*.pt")) == ["snapshot-step00000007.pt",
                                                                          "snapshot-step00000008.pt"]

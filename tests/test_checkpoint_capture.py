"""CheckpointCapture's default (3 snapshots spread over the planned training) and its snapshot index."""
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_attrib import AttributionCallback, CheckpointCapture, load_results, snapshots_from
from lightning_attrib.callbacks.checkpoint_capture import spread
from lightning_attrib.models import LitClassifier
from tests.test_callbacks import digits, trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def test_spread_points():
    assert spread(15, 3) == [5, 10, 15] and spread(10, 3) == [3, 7, 10] and spread(2, 3) == [1, 2]


@pytest.mark.parametrize("kw,steps", [({"max_epochs": 6}, [6, 12, 18]),              # epochs 2, 4, 6 of 3 batches
                                      ({"max_epochs": 50, "max_steps": 10}, [3, 7, 10])])
def test_default_spreads_three_snapshots_ending_with_final_weights(tmp_path, kw, steps):
    train, val = digits(60, 10)
    cap = CheckpointCapture(dirpath=tmp_path / "snaps")
    model = LitClassifier(arch="logreg")
    L.Trainer(accelerator="cpu", callbacks=[cap], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, **kw).fit(model, DataLoader(train, batch_size=20))
    assert [s.step for s in cap.snapshots] == steps
    final = torch.load(cap.snapshots[-1].path, weights_only=False)["state_dict"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(final[k], v)
    assert [s.name for s in snapshots_from(tmp_path / "snaps")] == [s.name for s in cap.snapshots]


def test_early_stop_still_captures_final_weights(tmp_path):
    class StopAfter(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch >= 1    # planned 9 epochs (3, 6, 9), stops after 2

    train, _ = digits(60, 10)
    cap = CheckpointCapture(dirpath=tmp_path / "snaps")
    trainer(tmp_path, [cap, StopAfter()], max_epochs=9).fit(LitClassifier(arch="logreg"), DataLoader(train, batch_size=20))
    assert [s.step for s in cap.snapshots] == [6]


def test_unbounded_fit_is_refused_before_training(tmp_path):
    train, _ = digits(40, 5)
    model = LitClassifier(arch="logreg")
    with pytest.raises(ValueError, match="neither max_epochs nor max_steps"):
        trainer(tmp_path, [CheckpointCapture(dirpath=tmp_path / "s")], max_epochs=-1).fit(model, DataLoader(train))
    assert model.global_step == 0


def test_index_refuses_a_deleted_or_altered_snapshot(tmp_path):
    train, _ = digits(60, 10)
    cap = CheckpointCapture(dirpath=tmp_path / "snaps", every_n_epochs=1)
    trainer(tmp_path, [cap], max_epochs=3).fit(LitClassifier(arch="logreg"), DataLoader(train, batch_size=20))
    assert len(snapshots_from(tmp_path / "snaps")) == 3
    victim = tmp_path / "snaps" / "snapshot-step00000006.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="snapshot-step00000006.pt differs from what"):
        snapshots_from(tmp_path / "snaps")
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="snapshot-step00000006.pt is listed in .* but missing"):
        snapshots_from(tmp_path / "snaps")
    with pytest.raises(FileNotFoundError, match="snapshot-step00000006.pt"):
        cap.snapshots


@pytest.mark.parametrize("method", ["trak", "influence", "tracin", "grad-dot", "grad-cos"])
def test_every_method_runs_with_the_default_capture(tmp_path, method):
    train, val = digits(60, 8)
    L.seed_everything(0)
    cap = CheckpointCapture(dirpath=tmp_path / "snaps")
    cb = AttributionCallback(method=method, proj_dim=16, out_dir=tmp_path / "attrib", log_images=False,
                             projector="identity" if method == "influence" else "tensorsketch")
    trainer(tmp_path, [cap, cb], max_epochs=3).fit(LitClassifier(arch="logreg"), DataLoader(train, batch_size=20),
                                                   DataLoader(val))
    res = load_results(tmp_path / "attrib")
    assert res.scores.shape == (60, 8) and torch.isfinite(torch.as_tensor(np.asarray(res.scores))).all()
    used = [s["step"] for s in res.manifest["snapshots"]]
    assert used == ([3, 6, 9] if method in ("trak", "tracin") else [9])

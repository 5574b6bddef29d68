"""Captured TRAK: AttributionCallback takes TRAK's training features from a GradientCapture's snapshot windows
(`core/windows.py`): equal to post-hoc features at the same weights, missing rows featurized post hoc, a training
loss that is not the task's detected (post hoc instead), zero-configuration result files."""

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback, CheckpointCapture, GradientCapture
from lightning_attrib.core.capture import make_capture_projector
from lightning_attrib.core.results import load_results
from lightning_attrib.core.store import FeatureStore
from lightning_attrib.core.tasks import resolve_output
from lightning_attrib.core.windows import LossToMargin
from lightning_attrib.core.tasks import MultiClass, Regression
from lightning_attrib.data import load_digits_tensors


class _Net(L.LightningModule):
    def __init__(self, lr=0.05, smoothing=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 10))
        self.lr, self.smoothing = lr, smoothing

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, label_smoothing=self.smoothing)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n_train=240, n_query=40):
    x, y = load_digits_tensors()
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:n_train + n_query],
                                                                  y[n_train:n_train + n_query])


def _fit(tmp_path, model, callbacks, epochs=3, batch_size=40, **trainer_kwargs):
    train, query = _data()
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(query, batch_size=40))
    return trainer, train


@pytest.mark.parametrize("projector,every,accumulate", [("tensorsketch", 1, 1), ("factorized", 1, 1),
                                                         ("tensorsketch", 3, 1), ("tensorsketch", 1, 2)])
def test_captured_features_equal_post_hoc_features_at_the_same_weights(tmp_path, projector, every, accumulate):
    """lr = 0: every step trains at the snapshot's weights, so each captured margin feature -row/c and its Q must
    equal the capture projector's post-hoc margin features at the snapshot; with every_n_steps=3 the rows of the
    uncaptured batches are featurized post hoc (same values, none left at zero); with gradient accumulation the
    ratio read from the output gradient carries the 1 / accumulate_grad_batches the backward saw."""
    cap = GradientCapture(projector=projector, proj_dim=256, query_dataset=None, every_n_steps=every)
    attrib = AttributionCallback(out_dir=tmp_path / "attrib", log_images=False, train_features="capture")
    model = _Net(lr=0.0)
    trainer, train = _fit(tmp_path, model, [cap, CheckpointCapture(dirpath=tmp_path / "snaps"), attrib],
                          accumulate_grad_batches=accumulate)
    res = load_results(tmp_path / "attrib")
    info = res.manifest["train_features"]
    assert info["source"] == "GradientCapture snapshot windows" and info["projector"] == projector
    snaps = list(info["captured_rows"])
    assert len(snaps) == 3
    if every == 1:
        assert all(v == len(train) for v in info["captured_rows"].values())
    else:   # one epoch window of 6 batches, every 3rd step captured: about a third of the rows captured
        assert all(0 < v < len(train) for v in info["captured_rows"].values())
        assert all(v > 0 for v in info["post_hoc_rows"].values())
    output = resolve_output(None, default="margin", module=model, dataset=train)
    lay = cap.projector.layout
    assert len(set(info["seeds"].values())) == 3   # one projection per snapshot window, as TRAK per checkpoint
    model.eval()
    x, y = train.tensors
    q_expected = output.loss_weight(model, (x, y)).double().numpy()
    store = FeatureStore(tmp_path / "attrib" / "features" / "margin", res.manifest["features"], 512, create=False)
    for snap in snaps:
        proj = make_capture_projector(projector, model, output, cap.param_names, lay["requested_dim"],
                                      info["seeds"][snap], lay["allocation"], lay["kind"])
        expected = proj.features((x, y)).double().numpy()
        feats, q = store.load(snap, "train")
        assert np.abs(feats - expected).max() <= 1e-4 * np.abs(expected).max()
        np.testing.assert_allclose(q, q_expected, rtol=1e-4, atol=1e-6)


def test_zero_configuration_gives_standard_results_without_a_second_pass(tmp_path):
    """GradientCapture() next to the two callbacks, no arguments: TRAK's result files load, every training row of
    every snapshot came from the capture (no post-hoc training pass), and the model ends fit at its final weights."""
    final = {}

    class _Keep(L.Callback):
        def on_train_end(self, trainer, pl_module):
            final.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    model = _Net()
    cap = GradientCapture()
    _fit(tmp_path, model, [cap, CheckpointCapture(), AttributionCallback(out_dir=tmp_path / "attrib",
                                                                          log_images=False), _Keep()])
    res = load_results(tmp_path / "attrib")
    assert res.scores.shape == (240, 40) and np.isfinite(res.scores).all()
    # query_dataset="auto": no in-run TracIn pass over the queries at every step (TRAK would not use it)
    assert cap.default_queries_released and cap.result is None and not (tmp_path / "inrun_tracin").exists()
    # the rows went to the windows only: none kept in memory (keep_records=None), and `records` says so
    assert not cap._kept
    with pytest.raises(ValueError, match="keep_records=True"):
        cap.records
    assert set(res.manifest["train_features"]["post_hoc_rows"].values()) == {0}
    assert res.manifest["features"]["train_features"].startswith("captured:")
    # projector="auto": the tensor sketch for TRAK's windows (TRAK's post-hoc default; Kronecker loses LDS)
    assert res.manifest["train_features"]["projector"] == "tensorsketch" == cap.projector_kind
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k])


def test_a_loss_that_is_not_the_task_loss_falls_back_to_post_hoc(tmp_path):
    """Label smoothing: the captured loss gradient is not -(1 - p) times the margin gradient. 'auto' warns and
    computes the training features post hoc (the result says so); 'capture' is an error naming the cause."""
    cap = GradientCapture(query_dataset=None)
    with pytest.warns(RuntimeWarning, match="not the task's loss"):
        _fit(tmp_path, _Net(smoothing=0.1), [cap, CheckpointCapture(), AttributionCallback(
            out_dir=tmp_path / "attrib", log_images=False)], epochs=1)
    res = load_results(tmp_path / "attrib")
    assert res.manifest["train_features"].startswith("post-hoc")
    started = []

    class _Count(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            started.append(trainer.global_step)

    with pytest.raises(ValueError, match="not the task's loss"):   # at the first training step, not after fit
        _fit(tmp_path / "b", _Net(smoothing=0.1), [GradientCapture(query_dataset=None), CheckpointCapture(),
                                                   AttributionCallback(out_dir=tmp_path / "b" / "attrib",
                                                                       log_images=False, train_features="capture"),
                                                   _Count()],
             epochs=1)
    assert started == []


def test_capture_required_but_missing_is_refused_before_training(tmp_path):
    started = []

    class _Net2(_Net):
        def on_train_start(self):
            started.append(1)

    with pytest.raises(ValueError, match="no GradientCapture"):
        _fit(tmp_path, _Net2(), [CheckpointCapture(), AttributionCallback(out_dir=tmp_path / "a",
                                                                           train_features="capture")])
    with pytest.raises(ValueError, match="no CheckpointCapture"):
        _fit(tmp_path, _Net2(), [GradientCapture(query_dataset=None),
                                 AttributionCallback(out_dir=tmp_path / "a", train_features="capture")])
    assert not started


def test_loss_to_margin_ratio_is_exact_for_cross_entropy_and_flags_other_losses():
    """c = 1 - p_y for cross-entropy (the row is -c times the margin gradient); regression's residual; a smoothed
    loss is flagged."""
    torch.manual_seed(0)
    logits = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    g, = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), logits)
    ratio, q = LossToMargin(MultiClass())(logits.detach(), y, g)
    p = torch.softmax(logits.detach(), -1)[torch.arange(8), y]
    np.testing.assert_allclose(ratio, (1 - p).numpy(), rtol=1e-9)
    np.testing.assert_allclose(q, (1 - p).numpy(), rtol=1e-6)
    g2, = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum", label_smoothing=0.2), logits)
    check = LossToMargin(MultiClass())
    check(logits.detach(), y, g2)
    assert check.mismatch is not None
    pred = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 1, dtype=torch.float64)
    g3, = torch.autograd.grad(0.5 * ((pred - t) ** 2).sum(), pred)
    ratio, _ = LossToMargin(Regression())(pred.detach(), t, g3)
    np.testing.assert_allclose(ratio, (t - pred.detach()).abs().flatten().numpy(), rtol=1e-9)


DDP_SCRIPT = """
import sys, warnings
import lightning as L, torch
from torch.utils.data import DataLoader
sys.path.insert(0, {root!r})
from lightning_attrib import AttributionCallback, CheckpointCapture, GradientCapture
from tests.test_captured_trak import _Net, _data
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
train, query = _data()
torch.manual_seed(0)
model = _Net(lr=0.0)
torch.save(model.state_dict(), {out!r} + "/init.pt")
L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
          enable_progress_bar=False, enable_model_summary=False, default_root_dir={out!r},
          callbacks=[GradientCapture(proj_dim=128, query_dataset=None), CheckpointCapture(dirpath={out!r} + "/snaps"),
                     AttributionCallback(out_dir={out!r} + "/attrib", log_images=False, train_features="capture")]).fit(
    model, DataLoader(train, batch_size=30, shuffle=True), DataLoader(query, batch_size=40))
"""


def test_ddp_windows_of_both_ranks_make_the_train_side(tmp_path):
    """2 gloo ranks: each captures its half of every epoch; the merged windows hold every example (no post-hoc
    training rows) and equal the post-hoc features at the (unchanged, lr = 0) weights."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp_captured_trak.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(root), out=str(tmp_path))))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    res = load_results(tmp_path / "attrib")
    info = res.manifest["train_features"]
    assert res.manifest["world_size"] == 2 and set(info["post_hoc_rows"].values()) == {0}
    train, _ = _data()
    model = _Net()
    model.load_state_dict(torch.load(tmp_path / "init.pt"))
    model.eval()
    output = resolve_output(None, default="margin", module=model, dataset=train)
    cap = GradientCapture(proj_dim=128, projector=info["projector"])   # "auto" chose the tensor sketch
    cap._build_projector(model)
    lay = cap.projector.layout
    store = FeatureStore(tmp_path / "attrib" / "features" / "margin", res.manifest["features"], 512, create=False)
    for snap in info["captured_rows"]:
        proj = make_capture_projector(cap.projector_kind, model, output, cap.param_names, lay["requested_dim"],
                                      info["seeds"][snap], lay["allocation"], lay["kind"])
        expected = proj.features(train.tensors).double().numpy()
        feats, _ = store.load(snap, "train")
        assert np.abs(feats - expected).max() <= 1e-4 * np.abs(expected).max()


def test_resumed_fit_gives_the_uninterrupted_result(tmp_path):
    """Interrupted after epoch 3 of 6 and resumed from its checkpoint: the windows frozen before the checkpoint are
    kept, the later ones captured after the resume; the scores equal the uninterrupted fit's."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, query = _data()

    def fit(root, epochs, ckpt_path=None, checkpoint=False):
        torch.manual_seed(0)
        cbs = [GradientCapture(proj_dim=256, query_dataset=None), CheckpointCapture(dirpath=root / "snaps",
                                                                                   every_n_epochs=2),
               AttributionCallback(out_dir=root / "attrib", log_images=False, train_features="capture")]
        if checkpoint:
            cbs.append(ModelCheckpoint(dirpath=root / "ckpt", save_last=True))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=checkpoint, default_root_dir=root,
                            callbacks=cbs)
        trainer.fit(_Net(), DataLoader(train, batch_size=40), DataLoader(query, batch_size=40), ckpt_path=ckpt_path)
        return load_results(root / "attrib")

    whole = fit(tmp_path / "whole", 6)
    fit(tmp_path / "parts", 3, checkpoint=True)
    resumed = fit(tmp_path / "parts", 6, ckpt_path=tmp_path / "parts" / "ckpt" / "last.ckpt")
    assert list(resumed.manifest["train_features"]["captured_rows"].values()) == [240, 240, 240]
    np.testing.assert_allclose(resumed.scores, whole.scores, rtol=1e-4, atol=1e-6 * np.abs(whole.scores).max())


def test_dropout_keeps_auto_post_hoc_and_capture_forces_it(tmp_path):
    """Dropout: training steps see another function than the eval-mode model TRAK attributes, so 'auto' stays post
    hoc; train_features='capture' uses the capture anyway."""

    class _Drop(_Net):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 10))

    _fit(tmp_path / "a", _Drop(), [GradientCapture(query_dataset=None), CheckpointCapture(),
                                   AttributionCallback(out_dir=tmp_path / "a" / "attrib", log_images=False)], epochs=1)
    assert load_results(tmp_path / "a" / "attrib").manifest["train_features"].startswith("post-hoc")
    _fit(tmp_path / "b", _Drop(), [GradientCapture(query_dataset=None), CheckpointCapture(),
                                   AttributionCallback(out_dir=tmp_path / "b" / "attrib", log_images=False,
                                                       train_features="capture")], epochs=1)
    info = load_results(tmp_path / "b" / "attrib").manifest["train_features"]
    assert info["source"] == "GradientCapture snapshot windows"


def test_training_step_calling_a_child_module_is_captured(tmp_path):
    """HF style: the training step calls `self.model(x)` instead of `self(x)`; the child's output is the prediction.
    A step that calls two children (a body and a head) separately is ambiguous: post hoc, with the reason."""

    class _Child(_Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

    _fit(tmp_path / "a", _Child(), [GradientCapture(), CheckpointCapture(),
                                    AttributionCallback(out_dir=tmp_path / "a" / "attrib", log_images=False)], epochs=2)
    info = load_results(tmp_path / "a" / "attrib").manifest["train_features"]
    assert info["source"] == "GradientCapture snapshot windows" and set(info["post_hoc_rows"].values()) == {0}

    class _Parts(_Net):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Sequential(nn.Linear(64, 32), nn.Tanh()), nn.Linear(32, 10)
            del self.net

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.body(x)), y)

    with pytest.warns(RuntimeWarning, match="forward output"):
        _fit(tmp_path / "b", _Parts(), [GradientCapture(), CheckpointCapture(),
                                        AttributionCallback(out_dir=tmp_path / "b" / "attrib", log_images=False)],
             epochs=1)
    assert load_results(tmp_path / "b" / "attrib").manifest["train_features"].startswith("post-hoc")


def test_only_the_window_epochs_are_captured_when_nothing_else_uses_the_rows(tmp_path):
    """6 epochs, snapshots after epochs 2, 4 and 6: with only the TRAK windows using the rows, the capture runs in
    those 3 epochs only (half the steps here, 3 of 20 epochs at the usual recipe) and the result equals a capture of
    every step (keep_records=True)."""
    def fit(root, keep):
        cap = GradientCapture(proj_dim=256, keep_records=keep)
        torch.manual_seed(1)
        _fit(root, _Net(), [cap, CheckpointCapture(every_n_epochs=2),
                            AttributionCallback(out_dir=root / "attrib", log_images=False, train_features="capture")],
             epochs=6)
        return cap, load_results(root / "attrib")

    some, res = fit(tmp_path / "windows", None)
    every, ref = fit(tmp_path / "every", True)
    assert (some.captured_steps, every.captured_steps) == (1 + 18, 36)   # step 0: the loss-to-margin probe
    assert set(res.manifest["train_features"]["post_hoc_rows"].values()) == {0}
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-5, atol=1e-7 * np.abs(ref.scores).max())

"""GradientCapture: in-training features == post-hoc projector features (tensor sketch and Kronecker, every engine layer
kind); chunk files; in-run TracIn; DDP."""
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib.callbacks import CheckpointCapture
from lightning_attrib.callbacks.gradient_capture import GradientCapture
from lightning_attrib.core.capture import capture_projector, load_capture_settings, read_capture, tracin_from_capture
from lightning_attrib.core.sketch import make_projector
from lightning_attrib.core.outputs import resolve_output
from lightning_attrib.data import load_digits_tensors
from tests.test_factorized import _explicit_features

ROOT = Path(__file__).resolve().parents[1]


def _trainer(tmp_path, callbacks, **kw):
    kw = {"max_epochs": 1, **kw}
    return L.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **{"enable_checkpointing": False, **kw})


class _LitNet(L.LightningModule):
    """Every capture path: a strided, padded Conv2d; LayerNorm; an in-place ReLU right on a hooked
    Linear; a Linear over 3 positions without bias; a Linear called twice (summed); a Linear off the loss path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, stride=2)   # 8x8 digits -> 3 x 4 x 4
        self.ln = nn.LayerNorm(48)
        self.fc = nn.Linear(48, 6)
        self.act = nn.ReLU(inplace=True)
        self.seq = nn.Linear(6, 4, bias=False)
        self.twice = nn.Linear(12, 12)
        self.unused = nn.Linear(12, 2)
        self.head = nn.Linear(12, 10)
        self.before: dict[int, dict] = {}   # weights at the first batch of every optimizer step

    def forward(self, x):
        h = torch.relu(self.conv(x.view(-1, 1, 8, 8))).flatten(1)
        h = self.act(self.fc(self.ln(h)))
        h = torch.tanh(self.seq(torch.stack([h, 2 * h, -h + 0.3], dim=1))).flatten(1)
        h = self.twice(torch.tanh(self.twice(h)))
        self.unused(h)
        return self.head(h)

    def on_train_batch_start(self, batch, batch_idx):
        self.before.setdefault(self.trainer.global_step, {k: v.detach().clone() for k, v in self.state_dict().items()})

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _digits(n, start=0):
    x, y = load_digits_tensors()
    return x[start:start + n], y[start:start + n]


@pytest.mark.parametrize("proj_dim,store", [(60, "memory"), (150, "disk"), (10_000, "memory")])
def test_capture_equals_post_hoc_features_on_every_path(tmp_path, proj_dim, store):
    x, y = _digits(90)  # batches of 32, 32, 26: the last one changes the mean-loss scale
    torch.manual_seed(0)
    model = _LitNet()
    cap = GradientCapture(proj_dim=proj_dim, seed=4, out_dir=tmp_path / "cap" if store == "disk" else None,
                          chunk_size=40, ids_fn=lambda b: torch.arange(len(b[0])), projector="factorized")
    _trainer(tmp_path, [cap], accumulate_grad_batches=2).fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    assert cap.skipped_params == []   # the layer engine hooks LayerNorm too
    assert [la.plan.name for la in cap._layers] == ["conv", "ln", "fc", "seq", "twice", "unused", "head"]
    records = cap.records
    assert [(r["step"], r["batch_idx"]) for r in records] == [(0, 0), (0, 1), (1, 2)]
    assert all(r["lr"] == 0.5 for r in records)
    post = _LitNet()
    loss = resolve_output("loss")
    for rec in records:
        post.load_state_dict(model.before[rec["step"]])
        i = rec["batch_idx"] * 32
        fp = make_projector("factorized", post, loss, cap.param_names, proj_dim, 4)
        assert fp.layout_hash == cap.projector.layout_hash
        ref = fp.features((x[i:i + 32], y[i:i + 32]))
        assert rec["features"].shape == ref.shape == (len(ref), cap.projector.proj_dim)
        scale = ref.abs().max()
        torch.testing.assert_close(rec["features"], ref, rtol=1e-4, atol=1e-5 * scale)
        unused = next(la for la in cap._layers if la.plan.name == "unused")
        assert (rec["features"][:, unused.start:unused.start + unused.plan.dim] == 0).all()
    if proj_dim == 10_000:  # every block exact: both-identity layers and the identity convolution
        assert all(la.plan.in_identity and la.plan.out_identity for la in cap._layers)
    else:                   # random factors on both sides, and grids truncated mid-row
        assert any(la.rem for la in cap._layers) and any(not la.plan.in_identity for la in cap._layers)
    if store == "disk":
        chunks = list(read_capture(tmp_path / "cap"))
        assert [c["rank_dir"] for c in chunks] == ["rank-00000"] * 3 and [len(c["step"]) for c in chunks] == [32, 32, 26]
        assert load_capture_settings(tmp_path / "cap")["layout_hash"] == cap.projector.layout_hash


class _LitMLP(L.LightningModule):
    """Batches are (x, y, dataset index); SGD with a per-step decaying lr; records weights, lr and ids per step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
        self.log_steps: dict[int, dict] = {}

    def forward(self, x):
        return self.net(x)

    def on_train_batch_start(self, batch, batch_idx):
        self.log_steps[self.trainer.global_step] = {
            "weights": {k: v.detach().clone() for k, v in self.state_dict().items()},
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"], "ids": batch[2].clone()}

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
                                                   "interval": "step"}}


def test_in_run_tracin_from_chunk_files_equals_brute_force(tmp_path):
    x, y = _digits(64)
    xq, yq = _digits(5, start=1500)
    data = TensorDataset(x, y, torch.arange(64))
    torch.manual_seed(0)
    model = _LitMLP()
    out = tmp_path / "cap"
    # the documented recipe: snapshots every n steps next to a capture every n steps (the weights of step s are
    # saved as snapshot-step{s}; CheckpointCapture saves none for step 0)
    cap = GradientCapture(proj_dim=40, seed=1, every_n_steps=2, ids_fn=lambda b: b[2], out_dir=out, chunk_size=40,
                          projector="factorized")
    snaps = CheckpointCapture(dirpath=tmp_path / "snaps", every_n_steps=2)
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    _trainer(tmp_path, [cap, snaps], max_epochs=3).fit(model, loader)
    chunks = list(read_capture(out))
    assert len(chunks) == 3 and sum(len(c["ids"]) for c in chunks) == 6 * 16   # steps 0, 2, ..., 10; 2 batches a chunk

    proj = capture_projector(out, _LitMLP())

    def query_features(step):
        path = tmp_path / "snaps" / f"snapshot-step{step:08d}.pt"
        if not path.exists():
            return None  # step 0: skipped
        proj.module.load_state_dict(torch.load(path)["state_dict"])
        return proj.features((xq, yq))

    res = tracin_from_capture(out, query_features)
    assert res.steps == [2, 4, 6, 8, 10] and res.skipped_steps == [0]
    assert res.scores.shape == (64, 5) and (res.counts.sum(), res.counts.max()) == (96, 3)

    # brute force: explicit per-example loss gradients at each captured step's weights, times kron(P_out, P_in)
    ref_scores, ref_self = np.zeros((64, 5)), np.zeros(64)
    ref = _LitMLP()
    loss = resolve_output("loss")
    for step in range(0, 12, 2):
        log = model.log_steps[step]
        ref.load_state_dict(log["weights"])
        fp = make_projector("factorized", ref, loss, None, 40, 1)
        ids = log["ids"].numpy()
        phi = _explicit_features(fp, ref, loss, (x[ids], y[ids])).numpy()
        np.add.at(ref_self, ids, log["lr"] * (phi ** 2).sum(1))
        if step:
            psi = _explicit_features(fp, ref, loss, (xq, yq)).numpy()
            np.add.at(ref_scores, ids, log["lr"] * phi @ psi.T)
    assert len({round(model.log_steps[s]["lr"], 6) for s in range(0, 12, 2)}) == 6   # the lr did change per step
    np.testing.assert_allclose(res.scores, ref_scores, rtol=1e-4, atol=1e-5 * np.abs(ref_scores).max())
    np.testing.assert_allclose(res.self_influence, ref_self, rtol=1e-4)
    assert np.abs(ref_scores).max() > 0 and (res.counts > 0).sum() < 64  # some examples never captured


def test_resume_drops_chunks_written_after_the_checkpoint(tmp_path):
    x, y = _digits(64)
    data = TensorDataset(x, y, torch.arange(64))
    out = tmp_path / "cap"

    def fit(epochs, ckpt_path=None):
        torch.manual_seed(0)
        cap = GradientCapture(proj_dim=30, ids_fn=lambda b: b[2], out_dir=out, chunk_size=1000)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        _trainer(tmp_path, [cap, ckpt], max_epochs=epochs, enable_checkpointing=True).fit(
            _LitMLP(), DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
        return cap

    fit(3)  # 12 steps; "crashes" after epoch 2 as far as the resumed run knows
    with pytest.raises(ValueError, match="already holds captured chunks"):
        fit(3)  # a fresh run into a used out_dir is refused
    fit(3, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")   # resume at step 4: steps 4..11 captured again
    steps = np.concatenate([c["step"] for c in read_capture(out)])
    assert sorted(steps.tolist()) == sorted(np.repeat(np.arange(12), 16).tolist())   # each step once


def test_argument_validation():
    for bad in ({"every_n_steps": 0}, {"chunk_size": -1}, {"every_n_steps": True}, {"proj_dim": 0}, {"allocation": "x"}):
        with pytest.raises(ValueError):
            GradientCapture(**bad)
    with pytest.raises(ValueError, match="reduction"):
        GradientCapture(reduction="max")
    with pytest.raises(TypeError, match="ids_fn"):
        GradientCapture(ids_fn=3)


DDP_SCRIPT = """
import sys, warnings
import lightning as L, torch
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {root!r})
from lightning_attrib.callbacks.gradient_capture import GradientCapture
from tests.test_gradient_capture import _LitMLP, _digits
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
x, y = _digits(50)
torch.manual_seed(0)
model = _LitMLP()
torch.save(model.state_dict(), {out!r} + "/init.pt")
cap = GradientCapture(proj_dim=30, seed=2, ids_fn=lambda b: b[2], out_dir={out!r} + "/cap", chunk_size=20)
L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
          enable_progress_bar=False, enable_model_summary=False, callbacks=[cap]).fit(
    model, DataLoader(TensorDataset(x, y, torch.arange(50)), batch_size=8))
"""


def test_ddp_ranks_write_their_own_chunks(tmp_path):
    script = tmp_path / "ddp_capture.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path))))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    chunks = list(read_capture(tmp_path / "cap"))
    assert {c["rank_dir"] for c in chunks} == {"rank-00000", "rank-00001"}
    assert load_capture_settings(tmp_path / "cap")["world_size"] == 2
    # 50 examples over 2 ranks: 25 each, batches of 8: 4 steps per epoch, every example once per epoch
    ids = np.concatenate([c["ids"] for c in chunks])
    epochs = np.concatenate([c["epoch"] for c in chunks])
    assert sorted(ids[epochs == 0].tolist()) == list(range(50)) and len(ids) == 100
    # step 0 rows (initial weights on every rank): the post-hoc features of those examples
    x, y = _digits(50)
    model = _LitMLP()
    model.load_state_dict(torch.load(tmp_path / "init.pt"))
    proj = capture_projector(tmp_path / "cap", model)
    for c in chunks:
        rows = c["step"] == 0
        if rows.any():
            got = torch.from_numpy(np.asarray(c["features"])[rows])
            torch.testing.assert_close(got, proj.features((x[c["ids"][rows]], y[c["ids"][rows]])), rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_runs_and_stays_close(tmp_path):
    """A bf16-mixed fit captures float32 features; the bf16 forward moves them a little only."""
    x, y = _digits(64)
    torch.manual_seed(0)
    model = _LitMLP()
    cap = GradientCapture(proj_dim=40, seed=1, ids_fn=lambda b: b[2])
    _trainer(tmp_path, [cap], precision="bf16-mixed").fit(model, DataLoader(TensorDataset(x, y, torch.arange(64)), batch_size=32))
    proj = make_projector(cap.projector_kind, _LitMLP(), resolve_output("loss"), cap.param_names, 40, 1)
    for rec in cap.records:
        proj.module.load_state_dict(model.log_steps[rec["step"]]["weights"])
        ref = proj.features((x[rec["ids"]], y[rec["ids"]]))
        assert rec["features"].dtype == torch.float32 and torch.isfinite(rec["features"]).all()
        assert (rec["features"] - ref).norm() < 0.05 * ref.norm()


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_in_run_tracin_with_known_queries_equals_snapshot_based(tmp_path, store):
    """GradientCapture(query_dataset=...) scores during training; no ids_fn: the ids come from the recorded batch
    sampler. Equal to tracin_from_capture with the queries featurized afterwards at every captured step's weights."""
    from lightning_attrib import load_results

    x, y = _digits(64)
    xq, yq = _digits(5, start=1500)
    data = TensorDataset(x, y, torch.arange(64))
    torch.manual_seed(0)
    model = _LitMLP()
    out = tmp_path / "cap"
    cap = GradientCapture(proj_dim=40, seed=1, every_n_steps=2, out_dir=out if store == "disk" else None,
                          chunk_size=40, query_dataset=TensorDataset(xq, yq), result_dir=tmp_path / "inrun",
                          keep_records=True)
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    _trainer(tmp_path, [cap], max_epochs=3).fit(model, loader)
    for rec in cap.records:   # the recorded sampler indices are the batches' dataset ids
        torch.testing.assert_close(rec["ids"], model.log_steps[rec["step"]]["ids"])
    got = load_results(tmp_path / "inrun")
    assert got.manifest["method"] == "tracin" and got.manifest["captured_steps"] == 6

    if store == "memory":   # the reference reads chunk files: write the in-memory records as a capture
        return
    proj = capture_projector(out, _LitMLP())

    def query_features(step):   # the snapshot-based recipe, with the weights of every captured step
        proj.module.load_state_dict(model.log_steps[step]["weights"])
        return proj.features((xq, yq))

    ref = tracin_from_capture(out, query_features, n_train=64)
    assert ref.steps == [0, 2, 4, 6, 8, 10]
    scale = np.abs(ref.scores).max()
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-6 * scale)
    seen = ref.counts > 0
    np.testing.assert_allclose(got.self_influence[seen], ref.self_influence[seen], rtol=1e-5)
    assert np.isnan(got.self_influence[~seen]).all() and got.manifest["never_captured"] == int((~seen).sum()) > 0


def test_in_run_queries_default_to_the_validation_set(tmp_path):
    x, y = _digits(48)
    xv, yv = _digits(7, start=1500)
    torch.manual_seed(0)
    cap = GradientCapture(proj_dim=24, chunk_size=100)
    _trainer(tmp_path, [cap], max_epochs=1, limit_val_batches=0).fit(
        _LitNet(), DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(xv, yv)))
    res = cap.result
    assert res is not None and res.scores.shape == (48, 7) and res.out_dir == tmp_path / "inrun_tracin"
    assert not np.isnan(res.self_influence).any() and np.abs(np.asarray(res.scores)).max() > 0
    cap2 = GradientCapture(proj_dim=24, chunk_size=100, result_dir=tmp_path / "none")
    _trainer(tmp_path, [cap2], max_epochs=1).fit(_LitNet(), DataLoader(TensorDataset(x, y), batch_size=16))
    assert cap2.result is None and not (tmp_path / "none").exists()   # no validation set: no queries


class _LitMLPxy(_LitMLP):
    """(x, y) batches: no dataset ids anywhere in the user's code."""

    def on_train_batch_start(self, batch, batch_idx):
        pass

    def validation_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])


@pytest.mark.parametrize("every", [1, 3])
def test_attribution_callback_tracin_takes_the_capture(tmp_path, every):
    """AttributionCallback(method="tracin") next to GradientCapture(): the in-run scores of the capture, as the
    callback's standard result; uncaptured examples (every_n_steps=3) featurized post hoc, never 0; training
    itself (weights, sampler order) is unchanged by the capture."""
    from lightning_attrib import AttributionCallback, load_results

    x, y = _digits(48)
    xv, yv = _digits(6, start=1500)
    train, val = TensorDataset(x, y), TensorDataset(xv, yv)

    def fit(callbacks):
        torch.manual_seed(0)
        model = _LitMLPxy()
        loader = DataLoader(train, batch_size=16, shuffle=True)   # shuffled by the global RNG, as most user code is
        _trainer(tmp_path, callbacks, max_epochs=2).fit(model, loader, DataLoader(val))
        return model

    plain = fit([])
    cap = GradientCapture(proj_dim=32, every_n_steps=every)
    cb = AttributionCallback(method="tracin", out_dir=tmp_path / "attrib", log_images=False)
    model = fit([cap, cb])
    for k, v in plain.state_dict().items():     # the model ends fit with its final weights, same trajectory
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    res = load_results(tmp_path / "attrib")
    assert res.manifest["train_features"].startswith("GradientCapture") and "features" not in {
        p.name for p in (tmp_path / "attrib").iterdir()}                       # no post-hoc feature store
    captured = cap.captured_counts.numpy() > 0
    np.testing.assert_allclose(np.asarray(res.scores)[captured], np.asarray(cap.result.scores)[captured], rtol=1e-6)
    if every == 1:
        assert captured.all() and res.manifest["post_hoc_examples"] == 0
        return
    missing = ~captured
    assert missing.any() and res.manifest["post_hoc_examples"] == int(missing.sum())
    fp = make_projector(cap.projector_kind, model, resolve_output("loss"), cap.param_names, 32, 0)
    phi, psi = fp.features((x[missing], y[missing])).double(), fp.features((xv, yv)).double()
    weight = cap.seen.numpy()[missing] * cap.last_lr
    assert (cap.seen.numpy() == 2).all()                                      # 2 epochs: each example twice
    np.testing.assert_allclose(np.asarray(res.scores)[missing], weight[:, None] * (phi @ psi.T).numpy(), rtol=1e-5,
                               atol=1e-7)
    assert (np.abs(np.asarray(res.scores)[missing]).max(1) > 0).all() and (res.self_influence[missing] > 0).all()


DDP_QUERY_SCRIPT = """
import sys, warnings
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {root!r})
from lightning_attrib.callbacks.gradient_capture import GradientCapture
from tests.test_gradient_capture import _LitMLP, _digits
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
x, y = _digits(50)
xq, yq = _digits(4, start=1500)
torch.manual_seed(0)
model = _LitMLP()
cap = GradientCapture(proj_dim=30, seed=2, out_dir={out!r} + "/cap", chunk_size=20, query_dataset=TensorDataset(xq, yq),
                      result_dir={out!r} + "/inrun")
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[cap])
trainer.fit(model, DataLoader(TensorDataset(x, y, torch.arange(50)), batch_size=8, shuffle=True))
if trainer.is_global_zero:
    torch.save({{s: v["weights"] for s, v in model.log_steps.items()}}, {out!r} + "/weights.pt")
"""


def test_ddp_in_run_queries_with_recorded_ids(tmp_path):
    """Two DDP ranks, no ids_fn: ids recorded through Lightning's DistributedSampler cover every example once per
    epoch, and the summed in-run result equals tracin_from_capture over both ranks' chunks."""
    from lightning_attrib import load_results

    script = tmp_path / "ddp_queries.py"
    script.write_text(textwrap.dedent(DDP_QUERY_SCRIPT.format(root=str(ROOT), out=str(tmp_path))))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    chunks = list(read_capture(tmp_path / "cap"))
    ids, epochs = np.concatenate([c["ids"] for c in chunks]), np.concatenate([c["epoch"] for c in chunks])
    assert sorted(ids[epochs == 0].tolist()) == list(range(50)) == sorted(ids[epochs == 1].tolist())
    weights = torch.load(tmp_path / "weights.pt")
    xq, yq = _digits(4, start=1500)
    proj = capture_projector(tmp_path / "cap", _LitMLP())

    def query_features(step):
        proj.module.load_state_dict(weights[step])
        return proj.features((xq, yq))

    ref = tracin_from_capture(tmp_path / "cap", query_features, n_train=50)
    got = load_results(tmp_path / "inrun")
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-6 * np.abs(ref.scores).max())
    np.testing.assert_allclose(got.self_influence, ref.self_influence, rtol=1e-5)


def test_in_run_scores_survive_a_resumed_fit(tmp_path):
    """Checkpoint after epoch 1 of 3, resume from it: the in-run result equals the uninterrupted run's."""
    x, y = _digits(48)
    xq, yq = _digits(5, start=1500)
    data, queries = TensorDataset(x, y, torch.arange(48)), TensorDataset(xq, yq)

    def fit(name, ckpt_path=None, epochs=3):
        torch.manual_seed(0)
        cap = GradientCapture(proj_dim=24, chunk_size=1000, query_dataset=queries, result_dir=tmp_path / name)
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ckpt-{name}", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        _trainer(tmp_path, [cap, ckpt], max_epochs=epochs, enable_checkpointing=True).fit(
            _LitMLP(), DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
        return cap.result

    full = fit("full")
    resumed = fit("resumed", ckpt_path=tmp_path / "ckpt-full" / "epoch=0.ckpt")
    assert resumed.manifest["captured_steps"] == full.manifest["captured_steps"] == 9
    np.testing.assert_allclose(resumed.scores, full.scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(resumed.self_influence, full.self_influence, rtol=1e-5)


class _LitTokens(L.LightningModule):
    """A small text transformer without dropout: Embedding (padding_idx 0) + a stock TransformerEncoder with a key
    padding mask (MultiheadAttention, two LayerNorms, two Linears) + mean pool + Linear head."""

    def __init__(self, vocab=20, width=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        layer = nn.TransformerEncoderLayer(width, 2, 24, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(width, 3)
        self.before: dict[int, dict] = {}

    def forward(self, tokens):
        pad = tokens == 0
        h = self.enc(self.emb(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))

    def on_train_batch_start(self, batch, batch_idx):
        self.before.setdefault(self.trainer.global_step, {k: v.detach().clone() for k, v in self.state_dict().items()})

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class _LitPlainMLP(_LitTokens):
    def __init__(self):
        L.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))
        self.before = {}

    def forward(self, x):
        return self.net(x)


def _token_data(n=40, length=7):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 20, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    tokens[torch.arange(length)[None, :] >= lengths[:, None]] = 0     # right padding
    return tokens, tokens[:, 0] % 3


@pytest.mark.parametrize("model_name", ["transformer", "mlp"])
@pytest.mark.parametrize("projector", ["tensorsketch", "factorized"])
def test_capture_equals_make_projector_features(tmp_path, projector, model_name):
    """Captured rows == make_projector(kind, ...) post-hoc features at the weights each step trained at, for a model
    without dropout/BatchNorm: every engine kind of a text transformer (Embedding, LayerNorm, MHA, Linear; chunk files)
    and an MLP (rank-one sides formed at the chunk hand-off; in memory), tensor sketch and Kronecker."""
    torch.manual_seed(0)
    if model_name == "transformer":
        (x, y), model, post = _token_data(), _LitTokens(), _LitTokens()
    else:
        (x, y), model, post = _digits(40), _LitPlainMLP(), _LitPlainMLP()
    # the transformer streams chunk files (a chunk of 30 rows holds one batch: buffers are reused, rows must start at
    # zero), the MLP keeps its rows in memory
    out_dir = tmp_path / "cap" if model_name == "transformer" else None
    cap = GradientCapture(projector=projector, proj_dim=48, seed=3, chunk_size=30, query_dataset=None, out_dir=out_dir)
    _trainer(tmp_path, [cap], max_epochs=2).fit(model, DataLoader(TensorDataset(x, y, torch.arange(len(x))),
                                                                   batch_size=16))
    assert cap.skipped_params == [] and cap.projector_kind == projector
    kinds = {la.plan.kind for la in cap._layers}
    assert kinds == ({"embedding", "mha", "linear", "norm"} if model_name == "transformer" else {"linear"})
    if model_name == "mlp":
        assert all(la.deferrable for la in cap._layers)
    records = cap.records
    assert [r["step"] for r in records] == list(range(6))
    loss = resolve_output("loss")
    for rec in records:
        post.load_state_dict(model.before[rec["step"]])
        ref_proj = make_projector(projector, post, loss, cap.param_names, 48, 3)
        assert ref_proj.layout_hash == cap.projector.layout_hash and not ref_proj.fallback.param_names
        i = rec["batch_idx"] * 16
        ref = ref_proj.features((x[i:i + 16], y[i:i + 16]))
        assert rec["features"].shape == ref.shape and ref.abs().max() > 0
        torch.testing.assert_close(rec["features"], ref, rtol=1e-4, atol=1e-5 * ref.abs().max())


def test_batchnorm_is_skipped_and_an_explicit_selection_of_it_refused(tmp_path):
    """BatchNorm normalizes with batch statistics in train mode: its parameters are listed as skipped; asking for them
    explicitly is refused before the first step."""

    class _BN(_LitPlainMLP):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 10))

    x, y = _digits(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    cap = GradientCapture(proj_dim=32, query_dataset=None)
    _trainer(tmp_path, [cap]).fit(_BN(), loader)
    assert cap.skipped_params == ["net.1.weight", "net.1.bias"] and len(cap.records) == 2
    with pytest.raises(ValueError, match="BatchNorm"):
        _trainer(tmp_path, [GradientCapture(proj_dim=32, params=["net.0", "net.1"], query_dataset=None)]).fit(
            _BN(), loader)

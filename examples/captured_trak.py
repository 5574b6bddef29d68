"""TRAK from the training steps themselves: add GradientCapture() next to the two callbacks.

    python examples/captured_trak.py       # ~30 s on 2 CPU cores: the same fit post hoc and captured, side by side

The capture keeps each training example's projected gradient from the last epoch before every snapshot (only those
epochs are captured), and the AttributionCallback builds TRAK's training features from them: after fit, only the
queries are featurized. The result says where its features came from (`manifest["train_features"]`).
"""
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback, CheckpointCapture, GradientCapture, load_results
from lightning_attrib.data import flip_labels, load_digits_tensors


class MyClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class _Clock(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.t1 = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        self.t2 = time.perf_counter()


def fit(name, capture, train, val, flipped):
    L.seed_everything(0)
    clock = _Clock()
    callbacks = [CheckpointCapture(dirpath=f"example_out/{name}/snapshots"),
                 AttributionCallback(out_dir=f"example_out/{name}/attrib", mislabeled=flipped, log_images=False),
                 clock]
    if capture:
        callbacks.insert(0, GradientCapture())
    trainer = L.Trainer(max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=f"example_out/{name}")
    trainer.fit(MyClassifier(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))
    res = load_results(f"example_out/{name}/attrib")
    source = res.manifest["train_features"]
    source = source["source"] if isinstance(source, dict) else source
    auroc = callbacks[-2].metrics["attrib/mislabel/self_influence/auroc"]
    print(f"{name:>9}: training {clock.t1 - clock.t0:5.2f} s, after fit {clock.t2 - clock.t1:5.2f} s, "
          f"self-influence AUROC {auroc:.3f}; training features: {source}")
    return res


def main():
    x, y = load_digits_tensors()
    noisy, flipped = flip_labels(y[:1200].numpy(), 0.1, 10, seed=0)   # 10% wrong labels, truth kept
    train = TensorDataset(x[:1200], torch.as_tensor(noisy))
    val = TensorDataset(x[1200:1400], y[1200:1400])
    post_hoc = fit("post-hoc", False, train, val, flipped)
    captured = fit("captured", True, train, val, flipped)
    corr = float(np.corrcoef(np.asarray(post_hoc.scores).ravel(), np.asarray(captured.scores).ravel())[0, 1])
    print(f"Pearson correlation of the two score matrices: {corr:.3f} (different projections, and the captured rows "
          "are taken at the step each example last trained at, within one epoch of the snapshot)")


if __name__ == "__main__":
    main()

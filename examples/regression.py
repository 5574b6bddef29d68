"""A regression model (MSE, one output), attributed with zero configuration.

Float targets of the same shape as the prediction select the regression task: the attributed output is the
prediction moved toward its target, with loss weight Q = |residual| (so TRAK's scores are the effect on each query's
prediction, exact leave-one-out for ridge regression up to leverage; see tests/test_tasks.py). 10% of the training
targets are corrupted; the script prints self-influence AUROC next to the loss (squared error) baseline.

    python examples/regression.py        # about 20 s on 2 CPU cores
"""
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback, CheckpointCapture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_transformer import report  # noqa: E402


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] + 0.1 * torch.randn(n, generator=g)
    return x, y


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/mse", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(out_dir: str = "example_out/regression", epochs: int = 40) -> dict:
    L.seed_everything(0)
    x, y = make_data(1000, seed=0)
    rng = np.random.default_rng(0)
    corrupted = np.zeros(len(y), dtype=bool)
    corrupted[rng.choice(len(y), 100, replace=False)] = True
    y_noisy = y.clone()
    y_noisy[corrupted] += torch.from_numpy(rng.choice([-1.0, 1.0], 100) * rng.uniform(1.5, 3.0, 100)).float()
    train, val = TensorDataset(x, y_noisy), TensorDataset(*make_data(200, seed=1))
    attrib = AttributionCallback(proj_dim=1024, out_dir=out_dir, mislabeled=corrupted)  # zero configuration
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CheckpointCapture(dirpath=f"{out_dir}/snapshots", every_n_epochs=epochs // 5), attrib])
    t0 = time.perf_counter()
    trainer.fit(Regressor(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=200))
    return report("regression (MSE, one output)", attrib, time.perf_counter() - t0)


if __name__ == "__main__":
    main()

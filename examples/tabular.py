"""A tabular classifier with categorical and numeric columns, attributed with zero configuration.

Batches are `(x_cat, x_num, y)` tuples and `forward(x_cat, x_num)` takes two inputs: the last element of a batch is
the target, `forward`'s signature says how many come before it. 10% of the training labels are flipped; the script
prints self-influence AUROC next to the loss baseline.

    python examples/tabular.py        # about 20 s on 2 CPU cores
"""
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback, CheckpointCapture
from lightning_attrib.data import flip_labels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_transformer import report  # noqa: E402

CARDINALITIES = (5, 7, 3)


def make_table(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three categorical columns and six numeric ones; the class (3 of them) follows a noisy rule on both."""
    g = torch.Generator().manual_seed(seed)
    x_cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDINALITIES], dim=1)
    x_num = torch.randn(n, 6, generator=g)
    score = torch.stack([x_num[:, 0] + (x_cat[:, 0] == 1).float() * 1.5,
                         x_num[:, 1] - x_num[:, 2] + (x_cat[:, 1] > 3).float(),
                         0.8 * x_num[:, 3] + (x_cat[:, 2] == 2).float() * 1.2], dim=1)
    return x_cat, x_num, score.argmax(1)


class TabularNet(L.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.lr = lr
        self.embeds = nn.ModuleList(nn.Embedding(c, 4) for c in CARDINALITIES)
        self.mlp = nn.Sequential(nn.Linear(4 * len(CARDINALITIES) + 6, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x_cat, x_num):
        cats = [emb(x_cat[:, j]) for j, emb in enumerate(self.embeds)]
        return self.mlp(torch.cat([*cats, x_num], dim=1))

    def training_step(self, batch, batch_idx):
        x_cat, x_num, y = batch
        return F.cross_entropy(self(x_cat, x_num), y)

    def validation_step(self, batch, batch_idx):
        x_cat, x_num, y = batch
        self.log("val/acc", (self(x_cat, x_num).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(out_dir: str = "example_out/tabular", epochs: int = 30) -> dict:
    L.seed_everything(0)
    x_cat, x_num, y = make_table(1000, seed=0)
    noisy, flipped = flip_labels(y.numpy(), 0.1, 3, seed=0)
    train = TensorDataset(x_cat, x_num, torch.as_tensor(noisy))
    val = TensorDataset(*make_table(200, seed=1))
    attrib = AttributionCallback(proj_dim=1024, out_dir=out_dir, mislabeled=flipped)  # zero configuration
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CheckpointCapture(dirpath=f"{out_dir}/snapshots", every_n_epochs=epochs // 5), attrib])
    t0 = time.perf_counter()
    trainer.fit(TabularNet(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=200))
    return report("tabular (x_cat, x_num, y), forward(x_cat, x_num)", attrib, time.perf_counter() - t0)


if __name__ == "__main__":
    main()

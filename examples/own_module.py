"""Attribution on your own LightningModule: two callbacks, nothing else changes.

    python examples/own_module.py          # ~30 s on 2 CPU cores, CSV logger (swap in WandbLogger if you like)
"""
import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback, CheckpointCapture, load_results
from lightning_attrib.data import flip_labels, load_digits_tensors


class MyClassifier(L.LightningModule):
    """Any module whose forward returns logits and whose batches are (x, y) works without configuration."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main():
    L.seed_everything(0)
    x, y = load_digits_tensors()
    noisy, flipped = flip_labels(y[:1000].numpy(), 0.1, 10, seed=0)  # 10% wrong labels, truth kept
    train = TensorDataset(x[:1000], torch.as_tensor(noisy))
    val = TensorDataset(x[1000:1200], y[1000:1200])
    trainer = L.Trainer(max_epochs=12, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger("example_logs"),
                        enable_checkpointing=False,
                        callbacks=[CheckpointCapture(dirpath="example_out/snapshots", every_n_epochs=4),
                                   AttributionCallback(method="trak", proj_dim=1024, out_dir="example_out/attrib",
                                                       mislabeled=flipped)])
    trainer.fit(MyClassifier(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))
    res = load_results("example_out/attrib")
    ids, scores = res.suspects(20)
    print(f"flipped labels among the 20 most self-influential examples: {int(flipped[ids].sum())}/20 "
          f"(base rate {flipped.mean():.0%})")
    print("query 0's top proponents (train id, score):", list(zip(*[a.tolist() for a in res.top_proponents(0, 5)])))


if __name__ == "__main__":
    main()

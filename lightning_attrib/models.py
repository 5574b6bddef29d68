"""A small LightningModule classifier (logistic regression, MLP, small CNN) for the bundled experiments."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from .core.batches import unpack_batch


def build_net(arch: str, in_features: int, num_classes: int, hidden: int = 64, depth: int = 1,
              image_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """`logreg`, `mlp` (depth hidden layers of width `hidden`) or `cnn` (two conv layers; needs image_shape)."""
    if arch == "logreg":
        return nn.Linear(in_features, num_classes)
    if arch == "mlp":
        layers, width = [], in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        return nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, num_classes))
    if arch == "cnn":
        if image_shape is None:
            raise ValueError("arch='cnn' needs image_shape=(C, H, W)")
        c, h, w = image_shape
        return nn.Sequential(
            nn.Unflatten(1, (c, h, w)),
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * h * w, num_classes),
        )
    raise ValueError(f"unknown arch {arch!r}: use 'logreg', 'mlp' or 'cnn'")


class LitClassifier(L.LightningModule):
    """Cross-entropy classifier; `forward` returns logits (what attribution's zero-config path expects)."""

    def __init__(self, arch: str = "mlp", in_features: int = 64, num_classes: int = 10, hidden: int = 64,
                 depth: int = 1, image_shape: tuple[int, int, int] | None = None, lr: float = 0.1,
                 weight_decay: float = 0.0, momentum: float = 0.9, optimizer: str = "sgd"):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(arch, in_features, num_classes, hidden, depth, tuple(image_shape) if image_shape else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = unpack_batch(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage} loss is {loss.item()} at step {self.global_step}: lower the learning rate or check the inputs"
            )
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", on_epoch=True, on_step=False)
        self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {hp.optimizer!r}")

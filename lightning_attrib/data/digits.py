"""scikit-learn's 8x8 digits (ships with the package: no download) as tensors and a LightningDataModule."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .noise import flip_labels


def load_digits_tensors(classes: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): x float32 (n, 64) scaled to [0, 1], y int64; optionally keep only `classes` (relabelled 0..c-1)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
    if classes is not None:
        keep = np.isin(y, classes)
        x, y = x[keep], np.searchsorted(np.array(sorted(classes)), y[keep])
    return torch.from_numpy(x), torch.from_numpy(y)


class DigitsDataModule(L.LightningDataModule):
    """Digits split into train/val(query) with a fixed seed; optional seeded label noise on the training split.

    `train_flipped` is the truth mask of the flipped labels (None without noise): the mislabel metrics read it.
    """

    def __init__(self, n_train: int = 1200, n_val: int = 300, noise: float = 0.0, batch_size: int = 64,
                 seed: int = 0, image_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.save_hyperparameters()
        x, y = load_digits_tensors()
        if n_train + n_val > len(x):
            raise ValueError(f"n_train + n_val = {n_train + n_val} exceeds the {len(x)} digits images")
        perm = np.random.default_rng(seed).permutation(len(x))
        tr, va = perm[:n_train], perm[n_train:n_train + n_val]
        if image_shape is not None:
            x = x.reshape(len(x), *image_shape)
        y_train = y[tr].numpy()
        self.train_flipped = None
        if noise > 0:
            y_train, self.train_flipped = flip_labels(y_train, noise, 10, seed)
        self.train_clean_labels = y[tr]
        self.train_set = TensorDataset(x[tr], torch.from_numpy(y_train))
        self.val_set = TensorDataset(x[va], y[va])
        self.num_classes = 10
        self.image_size = (8, 8)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

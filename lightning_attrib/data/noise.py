"""Seeded label noise: flip a fraction of labels to a different class and keep the truth mask."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (noisy labels, flipped mask): exactly round(fraction*n) labels moved to a uniformly drawn other class."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"noise fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng(seed)
    n_flip = int(round(fraction * len(labels)))
    idx = rng.choice(len(labels), size=n_flip, replace=False)
    noisy = labels.copy()
    noisy[idx] = (labels[idx] + rng.integers(1, num_classes, size=n_flip)) % num_classes
    mask = np.zeros(len(labels), dtype=bool)
    mask[idx] = True
    return noisy, mask


class NoisyLabels(Dataset):
    """A `(x, y)` dataset with a fraction of labels flipped; `flipped` is the truth mask, `clean_labels` the originals."""

    def __init__(self, base: Dataset, fraction: float, num_classes: int, seed: int = 0):
        self.base = base
        self.clean_labels = np.array([int(base[i][1]) for i in range(len(base))])
        noisy, self.flipped = flip_labels(self.clean_labels, fraction, num_classes, seed)
        self.labels = torch.as_tensor(noisy)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x = self.base[i][0]
        return x, self.labels[i]

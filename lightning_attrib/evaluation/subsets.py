"""Seeded random training subsets for LDS / datamodels: masks (M, n_train) bool, saved with their seed."""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.io import atomic_write_bytes, derive_seed


def random_subset_masks(n_train: int, num_subsets: int, alpha: float = 0.5, seed: int = 0,
                        start: int = 0) -> np.ndarray:
    """(num_subsets, n_train) bool: each row keeps exactly round(alpha * n_train) examples, drawn uniformly.

    Row j (global index start + j) depends only on (seed, j) (its generator is seeded by `derive_seed(seed,
    "subset", j)`): asking for more subsets later extends, never changes, the first ones, and ranks can generate
    disjoint blocks with `start`.
    """
    if not isinstance(n_train, (int, np.integer)) or n_train <= 0:
        raise ValueError(f"n_train must be a positive integer, got {n_train!r}")
    if not isinstance(num_subsets, (int, np.integer)) or num_subsets < 0:
        raise ValueError(f"num_subsets must be a non-negative integer, got {num_subsets!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (the kept fraction) must be in (0, 1), got {alpha}")
    size = int(round(alpha * n_train))
    if not 0 < size < n_train:
        raise ValueError(f"alpha={alpha} keeps {size} of {n_train} examples: pick alpha so that 0 < alpha*n < n")
    masks = np.zeros((num_subsets, n_train), dtype=bool)
    for j in range(num_subsets):
        rng = np.random.default_rng(derive_seed(seed, "subset", start + j))
        masks[j, rng.choice(n_train, size=size, replace=False)] = True
    return masks


@dataclass(frozen=True)
class SubsetMasks:
    """Random training subsets and how they were drawn. `masks[j, i]` = training example i is kept in subset j."""

    masks: np.ndarray
    seed: int
    alpha: float
    start: int = 0

    def __post_init__(self):
        m = np.asarray(self.masks)
        if m.ndim != 2 or m.dtype != bool:
            raise ValueError(f"masks must be a 2-d bool array (num_subsets, n_train), got {m.dtype} {m.shape}")

    @classmethod
    def random(cls, n_train: int, num_subsets: int, alpha: float = 0.5, seed: int = 0, start: int = 0) -> "SubsetMasks":
        return cls(random_subset_masks(n_train, num_subsets, alpha, seed, start), int(seed), float(alpha), int(start))

    def __len__(self) -> int:
        return self.masks.shape[0]

    @property
    def n_train(self) -> int:
        return self.masks.shape[1]

    def split(self, num_heldout: int) -> tuple["SubsetMasks", "SubsetMasks"]:
        """(first M - num_heldout subsets, last num_heldout): e.g. fit datamodels on one, score LDS on the other."""
        if not 0 < num_heldout < len(self):
            raise ValueError(f"num_heldout must be in (0, {len(self)}), got {num_heldout}")
        cut = len(self) - num_heldout
        return (SubsetMasks(self.masks[:cut], self.seed, self.alpha, self.start),
                SubsetMasks(self.masks[cut:], self.seed, self.alpha, self.start + cut))

    def shard(self, rank: int, world_size: int) -> tuple[np.ndarray, "SubsetMasks"]:
        """(global subset indices, masks) of this rank's contiguous block, for retraining split across ranks."""
        bounds = np.linspace(0, len(self), world_size + 1).round().astype(int)
        lo, hi = int(bounds[rank]), int(bounds[rank + 1])
        return np.arange(lo, hi), SubsetMasks(self.masks[lo:hi], self.seed, self.alpha, self.start + lo)

    def verify(self) -> bool:
        """True if the masks are exactly those `seed`/`alpha`/`start` generate (e.g. after loading)."""
        return bool(np.array_equal(self.masks, random_subset_masks(self.n_train, len(self), self.alpha, self.seed,
                                                                   self.start)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (masks, seed, alpha, start) atomically; returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, masks=self.masks, seed=np.int64(self.seed), alpha=np.float64(self.alpha),
                            start=np.int64(self.start))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SubsetMasks":
        with np.load(path) as f:
            missing = {"masks", "seed", "alpha"} - set(f.files)
            if missing:
                raise ValueError(f"{path} is not a SubsetMasks file (missing {sorted(missing)})")
            start = int(f["start"]) if "start" in f.files else 0
            return cls(f["masks"].astype(bool), int(f["seed"]), float(f["alpha"]), start)


def retrain_outputs(masks: np.ndarray | SubsetMasks, retrain_fn: Callable[[np.ndarray], Sequence[float]],
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(M, n_query) float64: row j = `retrain_fn(masks[j])`, the query outputs of a model trained on subset j."""
    m = masks.masks if isinstance(masks, SubsetMasks) else np.asarray(masks, dtype=bool)
    rows = []
    for j in range(m.shape[0]):
        out = retrain_fn(m[j].copy())
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        rows.append(np.asarray(out, dtype=np.float64).reshape(-1))
        if progress:
            progress(j + 1, m.shape[0])
    if not rows:
        return np.zeros((0, 0))
    if len({r.shape for r in rows}) != 1:
        raise ValueError("retrain_fn returned outputs of different lengths for different subsets")
    return np.stack(rows)


__all__ = ["SubsetMasks", "random_subset_masks", "retrain_outputs"]

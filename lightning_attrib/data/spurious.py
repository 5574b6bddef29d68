"""Planted spurious features: stamp a fixed pixel patch on part of one class (ModelDiff's planted truth)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# The top-left 2x2 pixels of an 8x8 digit (flattened): (almost) always blank in scikit-learn's digits.
DIGITS_CORNER_PATCH = (0, 1, 8, 9)


def stamp_patch(x: torch.Tensor, y: torch.Tensor, target_class: int, fraction: float, rng: np.random.Generator,
                patch: Sequence[int] = DIGITS_CORNER_PATCH, value: float = 1.0) -> tuple[torch.Tensor, np.ndarray]:
    """(a copy of x with `patch` set to `value` on a random `fraction` of class `target_class`, the stamped mask)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    in_class = np.flatnonzero(np.asarray(y) == target_class)
    chosen = rng.choice(in_class, int(fraction * len(in_class)), replace=False)
    stamped = x.clone()
    stamped[np.ix_(chosen, list(patch))] = value
    mask = np.zeros(len(x), dtype=bool)
    mask[chosen] = True
    return stamped, mask

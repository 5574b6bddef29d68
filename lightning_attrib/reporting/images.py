"""Turning dataset inputs into displayable images (HxW or HxWxC, float in [0, 1])."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ..core.batches import unpack_batch

MIN_DISPLAY_SIDE = 64


def default_to_image(x: Any) -> np.ndarray | None:
    """CHW / HW tensors as they are; flat vectors of square length reshaped; anything else: None (no image)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    x = x.detach().float().cpu()
    if x.ndim == 1:
        side = int(math.isqrt(x.numel()))
        if side * side != x.numel():
            return None
        x = x.view(side, side)
    elif x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else (x.permute(1, 2, 0) if x.shape[0] in (3, 4) else None)
        if x is None:
            return None
    elif x.ndim != 2:
        return None
    arr = x.numpy()
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    scale = max(1, MIN_DISPLAY_SIDE // max(arr.shape[:2]))  # tiny images (8x8 digits) are unreadable in W&B
    return arr.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else arr


def example_image(dataset, index: int, to_image: Callable | None = None) -> np.ndarray | None:
    try:
        x, _ = unpack_batch(dataset[int(index)])
    except TypeError:
        return None
    return (to_image or default_to_image)(x)

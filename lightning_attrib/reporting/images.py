"""How an example is shown in a report table: an image (HxW or HxWxC, float in [0, 1]) when its input is
image-shaped, else text (values, token ids) or whatever the user's `to_display` returns."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

from ..core.batches import INPUT_KEYS, TARGET_KEYS

MIN_DISPLAY_SIDE = 64
MIN_FLAT_IMAGE_SIDE = 8  # a flat vector is shown as an image only from 8x8 up (tabular rows stay text)


def default_to_image(x: Any) -> np.ndarray | None:
    """CHW / HW tensors as they are; flat float vectors of square length >= 8x8 reshaped; anything else: None."""
    if isinstance(x, (Mapping, str, bytes)) or (isinstance(x, (tuple, list)) and len(x) and
                                                isinstance(x[0], (torch.Tensor, np.ndarray))):
        return None
    try:
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError):
        return None
    if not x.is_floating_point():  # token ids, categorical codes: not pixels
        return None
    x = x.detach().float().cpu()
    if x.ndim == 1:
        side = int(math.isqrt(x.numel()))
        if side * side != x.numel() or side < MIN_FLAT_IMAGE_SIDE:
            return None
        x = x.view(side, side)
    elif x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else (x.permute(1, 2, 0) if x.shape[0] in (3, 4) else None)
        if x is None:
            return None
    elif x.ndim != 2 or min(x.shape) < 2:
        return None
    arr = x.numpy()
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    scale = max(1, MIN_DISPLAY_SIDE // max(arr.shape[:2]))  # tiny images (8x8 digits) are unreadable in W&B
    return arr.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else arr


def example_input(item: Any) -> Any:
    """The input part of one dataset item: `x` of `(x, y)`, `(x1, ..., xn)` of `(x1, ..., xn, y)`, a dict's input
    key (or the dict without its label)."""
    if isinstance(item, Mapping):
        key = next((k for k in INPUT_KEYS + ("input_ids",) if k in item), None)
        return item[key] if key is not None else {k: v for k, v in item.items() if k not in TARGET_KEYS}
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) >= 2:
        return item[0] if len(item) == 2 else tuple(item[:-1])
    return item


def default_to_display(x: Any, max_values: int = 24) -> str:
    """Text for a non-image input: rounded values, token ids, or one part per input of a tuple/dict."""
    if isinstance(x, Mapping):
        return "; ".join(f"{k}: {default_to_display(v, max_values)}" for k, v in x.items())
    if isinstance(x, (tuple, list)) and any(isinstance(v, (torch.Tensor, np.ndarray)) for v in x):
        return " | ".join(default_to_display(v, max_values) for v in x)
    if isinstance(x, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x.detach().cpu()
        vals = t.flatten().tolist()
        shown = [round(v, 3) if isinstance(v, float) else v for v in vals[:max_values]]
        return str(shown)[:-1] + (f", ... ({len(vals)} values)]" if len(vals) > max_values else "]")
    return str(x)


def example_image(dataset, index: int, to_image: Callable | None = None) -> np.ndarray | None:
    """The example's input as an image, or None when it is not image-shaped."""
    return (to_image or default_to_image)(example_input(dataset[int(index)]))


def example_display(dataset, index: int, to_image: Callable | None = None,
                    to_display: Callable | None = None) -> np.ndarray | str:
    """An image (array) when the example's input is image-shaped, else text (`to_display(input)` when given)."""
    x = example_input(dataset[int(index)])
    if to_display is not None:
        return to_display(x)
    img = (to_image or default_to_image)(x)
    return img if img is not None else default_to_display(x)

"""Batch helpers: tensor leaves, batch size, moving to a device, and `unpack_batch` (one input and a target, for the
curvature code and the bundled models). The general reader (multi-input tuples, keyword batches, the module's
`attribution_step` hook) is `core.tasks.read_batch`."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

INPUT_KEYS = ("image", "input", "inputs", "x", "pixel_values", "features")
TARGET_KEYS = ("label", "labels", "target", "targets", "y")


class BatchFormatError(TypeError):
    """A batch whose inputs and targets cannot be found without help from the user."""


def unpack_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """Return `(inputs, targets)` from a tuple/list `(x, y, ...)` or a dict with obvious keys."""
    if isinstance(batch, Mapping):
        x_key = next((k for k in INPUT_KEYS if k in batch), None)
        y_key = next((k for k in TARGET_KEYS if k in batch), None)
        if x_key is None or y_key is None:
            raise BatchFormatError(
                f"cannot find inputs and targets in a dict batch with keys {sorted(batch)}: expected one of "
                f"{INPUT_KEYS} and one of {TARGET_KEYS}. Define `attribution_step(self, batch) -> "
                "(prediction, target)` on your LightningModule, or pass `output_fn=` (see core/tasks.py)."
            )
        return batch[x_key], batch[y_key]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise BatchFormatError(
        f"cannot read a batch of type {type(batch).__name__}: expected a tuple/list (x, y, ...) or a dict with keys "
        f"like 'image'/'input'/'x' and 'label'/'target'/'y'. Define `attribution_step(self, batch) -> "
        "(prediction, target)` on your LightningModule, or pass `output_fn=` (see core/tasks.py)."
    )


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch (first dimension of its first tensor)."""
    leaves = [t for t in tensor_leaves(batch)]
    if not leaves:
        raise BatchFormatError("the batch holds no tensors; pass `output_fn=` and tensors in the batch")
    return int(leaves[0].shape[0])


def tensor_leaves(obj: Any):
    """Every tensor in a (nested) batch or dataset item, numpy arrays as tensors, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, np.ndarray):
        yield torch.from_numpy(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensor_leaves(v)
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        for v in obj:
            yield from tensor_leaves(v)


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()}) if not hasattr(batch, "_fields") else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch

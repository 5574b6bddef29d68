"""Finding the dataloaders of a fit from a Trainer (before or after Lightning has loaded them)."""
from __future__ import annotations

from typing import Any


def loader_of(loop: Any):
    """The dataloader a fit/validation loop would load (before Lightning has loaded it), or None."""
    source = getattr(loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    try:
        return first_loader(source.dataloader())
    except Exception:
        return None


def first_loader(loaders: Any):
    """The first of a Trainer's dataloaders (a loader, a list/tuple or a dict of them), or None."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders

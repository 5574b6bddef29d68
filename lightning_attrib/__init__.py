"""lightning-attrib: training-data attribution inside PyTorch Lightning runs.

Attributes are imported lazily, so `lightning_attrib.core` / `.metrics` / `.analysis` do not pay for importing
Lightning (seconds per process, and per spawned DDP worker).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "AttributionCallback": "lightning_attrib.callbacks",
    "CheckpointCapture": "lightning_attrib.callbacks",
    "GradientCapture": "lightning_attrib.callbacks",
    "tracin_from_capture": "lightning_attrib.callbacks",
    "attribute": "lightning_attrib.standalone",
    "snapshots_from": "lightning_attrib.standalone",
    "AttributionResult": "lightning_attrib.core.results",
    "load_results": "lightning_attrib.core.results",
    "ensemble": "lightning_attrib.core.ensemble",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_attrib' has no attribute {name!r}")

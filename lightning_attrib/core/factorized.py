"""Compatibility names for the hook-based projectors, now in `core/sketch.py` on the layer engine (`core/layers.py`).

`FactorizedProjector(..., sketch="kronecker" | "tensor")` builds a `KroneckerProjector` / `TensorSketchProjector`
restricted to the layers the pre-engine hooks knew (nn.Linear and nn.Conv2d with zeros padding): everything else stays
in the dense fallback, as before the engine. Kept for old tests and benchmarks; new code: `sketch.make_projector`
(`GradientCapture` uses `core.capture.make_capture_projector`, every engine layer but BatchNorm).
"""
from __future__ import annotations

from torch import nn

from .io import derive_seed as derived_seed
from .layers import Layer
from .sketch import (ALLOCATIONS, FACTOR_KINDS, KroneckerProjector, LayerPlan, TensorSketchProjector, plan_layer,
                     water_fill)

SKETCHES = ("kronecker", "tensor")

__all__ = ["ALLOCATIONS", "FACTOR_KINDS", "SKETCHES", "FactorizedProjector", "LayerPlan", "derived_seed", "plan_layer",
           "water_fill", "capture_layers"]


def capture_layers(layer: Layer) -> bool:
    """The layers the pre-engine hooks handled: exactly nn.Linear, and nn.Conv2d (groups=1) with zeros padding
    given as numbers or "valid"."""
    m = layer.module
    if layer.kind == "linear":
        return type(m) is nn.Linear
    if layer.kind == "conv2d":
        return m.padding_mode == "zeros" and (not isinstance(m.padding, str) or m.padding == "valid")
    return False


def FactorizedProjector(module, output_fn, param_names=None, proj_dim: int = 2048, seed: int = 0,
                        allocation: str = "equal", kind: str = "rademacher", device=None, sketch: str = "kronecker"):
    """The pre-engine projector: Kronecker (`sketch="kronecker"`) or tensor sketch (`"tensor"`) over Linear/Conv2d."""
    if sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
    if sketch == "tensor":
        return TensorSketchProjector(module, output_fn, param_names, proj_dim, seed, device, capture_layers, kind)
    return KroneckerProjector(module, output_fn, param_names, proj_dim, seed, allocation, kind, device, capture_layers)

"""Gradient similarity at the final weights: dot product and cosine of per-example loss gradients.

score(i, q) = g_i . g_q (`GradientDot`) or g_i . g_q / (||g_i|| ||g_q||) (`GradientCosine`), with g the (projected)
loss gradient at the last snapshot. Positive = a gradient step on z_i also lowers z_q's loss (helps it).
Cosine self-influence is 1 for every example by construction (`constant_self_influence`): it cannot rank
training examples on its own.
"""
from __future__ import annotations

import torch

from .base import FeatureMethod, TrainStatistics


class GradientDot(FeatureMethod):
    """score(i, q) = grad L(z_i) . grad L(z_q) at the final weights (self-influence ||grad L(z_i)||^2)."""

    name = "grad-dot"
    output = "loss"
    snapshot_policy = "last"

    def fit(self, stats: TrainStatistics) -> None:
        pass

    def transform(self, snapshot_index: int, features: torch.Tensor) -> torch.Tensor:
        return features.double()


class GradientCosine(GradientDot):
    """score(i, q) = cos(grad L(z_i), grad L(z_q)): the pipeline normalizes the features to unit norm."""

    name = "grad-cos"
    normalize_features = True
    constant_self_influence = True

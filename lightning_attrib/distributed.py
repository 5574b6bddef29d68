"""Adapts a Lightning strategy (Trainer's or Fabric's: single device, DDP, DDP-spawn, multi-node) to `core.Dist`."""
from __future__ import annotations

import torch


class LightningDist:
    """The pipeline's collectives, taken from the strategy the user's run already set up."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.rank = int(strategy.global_rank)
        self.world_size = int(strategy.world_size)
        self.device = torch.device(strategy.root_device)

    def barrier(self) -> None:
        self.strategy.barrier("lightning_attrib")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        reduce = getattr(self.strategy, "all_reduce", None) or self.strategy.reduce  # Fabric vs Trainer strategies
        return reduce(tensor.clone(), reduce_op="sum")

"""The few collectives the pipeline needs, so the math runs the same in one process and under DDP.

`LocalDist` is the single-process case; `lightning_attrib.strategy_dist.StrategyDist` adapts a Lightning
strategy (any DDP flavour, one or many nodes) to the same protocol.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Dist(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def barrier(self) -> None: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


class LocalDist:
    """One process: every reduction is the identity."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.rank, self.world_size, self.device = 0, 1, torch.device(device)

    def barrier(self) -> None:
        pass

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchDist:
    """Plain `torch.distributed` (an initialized process group): used by tests and custom launchers."""

    def __init__(self, device: str | torch.device = "cpu"):
        import torch.distributed as tdist

        self._d = tdist
        self.rank, self.world_size, self.device = tdist.get_rank(), tdist.get_world_size(), torch.device(device)

    def barrier(self) -> None:
        self._d.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        self._d.all_reduce(tensor)
        return tensor

"""Model output functions f(z; theta): the per-example scalar whose gradient is attributed.

An output function is a callable `(module, batch) -> Tensor[B]`. Built-ins read the batch with
`unpack_batch` and call `module(inputs)` for logits. `loss_weight` gives TRAK's Q term
(d loss / d output, up to sign) for the training examples.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .batches import unpack_batch


class OutputFunction:
    """Base class: `__call__(module, batch) -> (B,)`; `loss_weight(module, batch) -> (B,)` defaults to ones."""

    name = "custom"

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def loss_weight(self, module: nn.Module, batch: Any) -> torch.Tensor:
        out = self(module, batch)
        return torch.ones_like(out)


class ClassificationMargin(OutputFunction):
    """log p_y - log(1 - p_y), computed stably from logits (TRAK's output for classifiers)."""

    name = "margin"

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = unpack_batch(batch)
        logits = module(inputs)
        return margin_from_logits(logits, targets)

    @torch.no_grad()
    def loss_weight(self, module: nn.Module, batch: Any) -> torch.Tensor:
        """Q = 1 - p_y: how much the cross-entropy loss still moves with the margin."""
        inputs, targets = unpack_batch(batch)
        probs = torch.softmax(module(inputs).double(), dim=-1)
        return (1.0 - probs.gather(-1, targets.long().view(-1, 1)).squeeze(-1)).float()


class CrossEntropyLoss(OutputFunction):
    """Per-example cross-entropy loss (influence functions, TracIn, gradient similarity)."""

    name = "loss"

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = unpack_batch(batch)
        return F.cross_entropy(module(inputs), targets.long(), reduction="none")


class CustomOutput(OutputFunction):
    """Wraps a user callable `(module, batch) -> Tensor[B]`."""

    def __init__(self, fn: Callable[[nn.Module, Any], torch.Tensor], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"output_fn must be callable (module, batch) -> per-example scalar, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        return self.fn(module, batch)


def margin_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p_y - log(1 - p_y) = logit_y - logsumexp(other logits), stable for any logit scale."""
    targets = targets.long().view(-1, 1)
    correct = logits.gather(-1, targets).squeeze(-1)
    others = logits.scatter(-1, targets, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


BUILTIN_OUTPUTS = {"margin": ClassificationMargin, "loss": CrossEntropyLoss}


def resolve_output(output: str | OutputFunction | Callable | None, default: str = "margin") -> OutputFunction:
    """Turn a name, an `OutputFunction` or a plain callable into an `OutputFunction`."""
    if output is None:
        output = default
    if isinstance(output, OutputFunction):
        return output
    if isinstance(output, str):
        if output not in BUILTIN_OUTPUTS:
            raise ValueError(f"unknown output function {output!r}: use one of {sorted(BUILTIN_OUTPUTS)} or a callable")
        return BUILTIN_OUTPUTS[output]()
    return CustomOutput(output)

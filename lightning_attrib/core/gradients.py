"""Per-example gradients of an output function with `torch.func` (vmap over grad), for any nn.Module."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .outputs import OutputFunction

ParamSelector = None | Sequence[str] | Callable[[str, nn.Parameter], bool]


def select_parameters(module: nn.Module, params: ParamSelector = None) -> list[str]:
    """Names of the parameters to attribute through.

    `None` takes every parameter that requires grad; a sequence takes names or name prefixes
    (e.g. `["classifier."]`); a callable `(name, param) -> bool` filters.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if params is None:
        chosen = [n for n, _ in named]
    elif callable(params):
        chosen = [n for n, p in named if params(n, p)]
    else:
        if isinstance(params, str):
            params = [params]
        chosen = [n for n, _ in named if any(n == s or n.startswith(s if s.endswith(".") else s + ".") for s in params)]
        unknown = [s for s in params if not any(n == s or n.startswith(s.rstrip(".") + ".") for n, _ in named)]
        if unknown:
            raise ValueError(f"params={unknown} match no trainable parameter; available: {[n for n, _ in named][:20]}")
    if not chosen:
        raise ValueError("params selects no trainable parameter: pass names or prefixes of module.named_parameters()")
    return chosen


class _BoundOutput(nn.Module):
    """Lets `functional_call` swap the weights of `module` while a user output function calls it."""

    def __init__(self, module: nn.Module, output_fn: OutputFunction):
        super().__init__()
        self.module = module
        self.output_fn = output_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.output_fn(self.module, batch)


class PerExampleGradients:
    """Computes `d f(z_i; theta) / d theta` for each example of a batch, flattened to (B, p).

    The module is evaluated in eval mode (dropout off, BatchNorm on running stats, which are
    passed through as buffers). Only the parameters in `param_names` are differentiated.
    """

    def __init__(self, module: nn.Module, output_fn: OutputFunction, param_names: Iterable[str] | None = None):
        self.module = module
        self.output_fn = output_fn
        self.param_names = list(param_names) if param_names is not None else select_parameters(module)
        self._bound = _BoundOutput(module, output_fn)
        params = dict(module.named_parameters())
        self.shapes = [tuple(params[n].shape) for n in self.param_names]
        self.num_params = int(sum(params[n].numel() for n in self.param_names))

        def per_example(p: dict, b: dict, example: Any) -> torch.Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
            return functional_call(self._bound, (p, b), (one,)).squeeze(0)

        self._grad_fn = vmap(grad(per_example), in_dims=(None, None, 0))

    def __call__(self, batch: Any) -> torch.Tensor:
        """(B, p) float32 gradients for the examples in `batch` (already on the module's device)."""
        was_training = self.module.training
        self.module.eval()
        try:
            params = {f"module.{n}": p.detach() for n, p in self.module.named_parameters() if n in set(self.param_names)}
            buffers = {f"module.{n}": b for n, b in self.module.named_buffers()}
            with torch.no_grad():  # torch.func.grad differentiates inside; no outer graph through unselected params
                grads = self._grad_fn(params, buffers, batch)
        finally:
            self.module.train(was_training)
        flat = [grads[f"module.{n}"].reshape(grads[f"module.{n}"].shape[0], -1) for n in self.param_names]
        return torch.cat(flat, dim=1).float()

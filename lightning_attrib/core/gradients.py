"""Per-example gradients with `torch.func` (vmap over grad): the one place they are computed.

`per_example_gradients(fn, params, batch)` is the primitive (used by `PerExampleGradients`, the projectors' fallback
for layers the layer engine does not hook, and `methods/curvature.ModelFunction`). It runs with the
`nn.MultiheadAttention` / `TransformerEncoder` fast path off (its nested-tensor kernels have no batching rule), and
turns vmap's "Batching rule not implemented" into an error that names the fix.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .layers import SUPPORTED, explicit_attention
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


@contextmanager
def no_attention_fast_path():
    """The MHA / TransformerEncoder fast path off (its nested-tensor ops cannot be vmapped), restored on exit."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def per_example_gradients(fn: Callable[[Any, Any], torch.Tensor], params: Any, batch: Any,
                          what: Callable[[], str] | None = None) -> Any:
    """Gradients of `fn(params, one_example_batch) -> scalar` w.r.t. `params` (any pytree), for every example of
    `batch` at once (vmap over the batch dim; each example is passed as a batch of one). `what()` names the
    parameters for the error message when vmap cannot run the model."""
    def one(p: Any, example: Any) -> torch.Tensor:
        ex = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
        return fn(p, ex).squeeze(0)

    try:
        with no_attention_fast_path():
            return vmap(grad(one), in_dims=(None, 0))(params, batch)
    except (RuntimeError, NotImplementedError) as err:
        text = str(err)
        if "atching rule" not in text and "vmap" not in text and "functorch" not in text:
            raise
        op = text.split("for ")[-1].split(".")[0].strip() if "not implemented for" in text else text.splitlines()[0]
        who = what() if what is not None else "the model's parameters"
        raise ValueError(
            f"per-example gradients of {who} need torch.func.vmap, which cannot run an op of this model ({op}). "
            f"Exclude those parameters with params=, or use layers the layer engine hooks without vmap: "
            f"{', '.join(SUPPORTED)}.") from err


def _owners(module: nn.Module, names: list[str], limit: int = 5) -> str:
    """'params [...] of modules [...]' for an error message."""
    mods = sorted({n.rsplit(".", 1)[0] if "." in n else "<root>" for n in names})
    types = dict(module.named_modules())
    shown = [f"{m} ({type(types.get(m, module)).__name__})" for m in mods[:limit]]
    return f"parameters {names[:limit]} of modules {shown}"


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

    def __call__(self, batch: Any) -> torch.Tensor:
        """(B, p) float32 gradients for the examples in `batch` (already on the module's device)."""
        was_training = self.module.training
        self.module.eval()
        try:
            params = {f"module.{n}": p.detach() for n, p in self.module.named_parameters() if n in set(self.param_names)}
            buffers = {f"module.{n}": b for n, b in self.module.named_buffers()}
            # torch.func.grad differentiates inside (no outer graph through unselected params); attention written out
            with torch.no_grad(), explicit_attention(self.module):
                grads = per_example_gradients(lambda p, ex: functional_call(self._bound, (p, buffers), (ex,)), params,
                                              batch, lambda: _owners(self.module, self.param_names))
        finally:
            self.module.train(was_training)
        flat = [grads[f"module.{n}"].reshape(grads[f"module.{n}"].shape[0], -1) for n in self.param_names]
        return torch.cat(flat, dim=1).float()

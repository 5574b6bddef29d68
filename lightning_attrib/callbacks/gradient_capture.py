"""`GradientCapture`: Kronecker-projected per-example loss gradients captured inside real training steps.

The training step already runs a batched forward and backward of the loss. Hooks on the factorizable
layers (nn.Linear, nn.Conv2d; see `core.factorized`) project each layer's input in the forward and its
output gradient in the backward, so the projected per-example gradient of every training example in the
batch comes at the cost of a few small matmuls, at the weights of that step (before the optimizer moves
them): exactly what TracIn sums over checkpoints.

With a loss that is the mean of per-example losses, the output gradient the backward sees for example i
is (1/B) d loss_i / d output_i (divided again by `accumulate_grad_batches`, which Lightning applies), so
the captured features are rescaled by B * accumulate_grad_batches (and by 1 / the AMP grad scale when a
GradScaler is active). They then equal `FactorizedProjector(module, "loss" output, ...).features(batch)`
at the same weights for a model without train/eval differences (no dropout, no BatchNorm); with those
layers the captured gradients are of the train-mode loss the optimizer actually used.

Limitations: parameters outside Linear/Conv2d layers (norms, embeddings) cannot be captured this way;
with `params=None` they are left out (listed in `skipped_params`), an explicit `params` selection that
includes them is refused. The training step must compute the loss from one forward of the hooked
layers per batch (a second forward of the same layer in the step would be summed in).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..core.factorized import FactorizedProjector
from ..core.gradients import select_parameters


class GradientCapture(Callback):
    """Records `(step, batch_idx, lr, ids, features)` for training batches, features (B, proj_dim) float32 on CPU.

    Args:
        proj_dim, seed, allocation: the factorized projection (same meaning, and the same matrices, as
            `FactorizedProjector` / `Attributor(projector="factorized")` with the same parameter selection).
        params: parameter names/prefixes/predicate to capture (default: every trainable Linear/Conv2d
            weight and bias of the LightningModule).
        every_n_steps: capture the batches of every n-th optimizer step (1: every batch).
        ids_fn: optional `batch -> Tensor[B]` of dataset indices, stored with each record.
        reduction: "mean" (default) or "sum": how the training loss reduces per-example losses.
    """

    def __init__(self, proj_dim: int = 2048, seed: int = 0, allocation: str = "equal",
                 params: None | Sequence[str] | Callable = None, every_n_steps: int = 1,
                 ids_fn: Callable[[Any], torch.Tensor] | None = None, reduction: str = "mean"):
        super().__init__()
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.proj_dim, self.seed, self.allocation = proj_dim, seed, allocation
        self.params, self.every_n_steps, self.ids_fn, self.reduction = params, every_n_steps, ids_fn, reduction
        self.projector: FactorizedProjector | None = None
        self.param_names: list[str] = []
        self.skipped_params: list[str] = []
        self.records: list[dict[str, Any]] = []
        self._live: list[list] = []
        self._handles: list = []
        self._current: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.projector is not None:
            return
        chosen = select_parameters(pl_module, self.params)
        probe = FactorizedProjector(pl_module, None, chosen, self.proj_dim, self.seed, self.allocation)
        if probe.fallback.param_names:
            if self.params is not None:
                raise ValueError(
                    f"GradientCapture can only capture Linear/Conv2d weights and biases; params selects "
                    f"{probe.fallback.param_names[:5]} as well. Select only those layers' parameters."
                )
            self.skipped_params = list(probe.fallback.param_names)
            chosen = [n for la in probe.layers for n in la.param_names]
            if not chosen:
                raise ValueError("GradientCapture found no trainable nn.Linear/nn.Conv2d layer to capture")
            probe = FactorizedProjector(pl_module, None, chosen, self.proj_dim, self.seed, self.allocation)
        self.param_names, self.projector = chosen, probe

    # -- hooks ---------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._remove()
        if trainer.global_step % self.every_n_steps:
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        self._current = {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                         "batch_idx": int(batch_idx), "lr": float(lr) if lr is not None else None,
                         "ids": self.ids_fn(batch).detach().cpu() if self.ids_fn is not None else None}
        self._live = []
        self._handles = self.projector.add_hooks(self._live, grad_hooks=True)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._current is None:
            return
        records, current = self._live, self._current
        self._remove()
        if not records:
            return
        n = int(records[0][1].shape[0])
        scale = float(trainer.accumulate_grad_batches) * (n if self.reduction == "mean" else 1)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale /= float(scaler.get_scale())
        with torch.no_grad():
            feats = self.projector.combine(records, n, records[0][1].device) * scale
        self.records.append({**current, "features": feats.detach().float().cpu()})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._remove()  # a step without backward (skipped, manual optimization) leaves no hooks behind

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._live, self._current = [], [], None

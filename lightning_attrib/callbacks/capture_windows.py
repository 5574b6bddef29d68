"""`GradientCapture`'s snapshot windows for captured TRAK (the Lightning side of `core/windows.py`).

Asked for by `AttributionCallback` before training (`request_windows`): the capture records each captured batch's
prediction and its gradient (forward hooks on the LightningModule and its direct children), reads the
loss-to-margin ratio per row (`core.windows.LossToMargin`), keeps each example's latest row (`SnapshotWindows`),
freezes it at every `CheckpointCapture` snapshot and then switches to the next window's projection seed. With only
the windows using the rows, steps outside every planned window are not captured. `train_source()` is what the
Attributor reads at fit end.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..core.capture import PER_WINDOW, make_capture_projector, projector_kind
from ..core.io import atomic_write_json, derive_seed
from ..core.tasks import HOOK_NAME, TaskConfigError, detect_task, prediction_tensor
from ..core.windows import CapturedTrainSource, LossToMargin, SnapshotWindows


def train_mode_layers(module: torch.nn.Module) -> str:
    """Names of the layer kinds that behave differently in training (dropout with p > 0, batch norm), or ''."""
    kinds = {type(m).__name__ for m in module.modules()
             if (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)
             or isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             or (isinstance(m, torch.nn.MultiheadAttention) and m.dropout > 0)}
    return ", ".join(sorted(kinds))


class SnapshotWindowsMixin:
    """The window half of `GradientCapture` (mixed into it; uses its projector, chunk hand-off and query pass)."""

    def _next_window_projection(self, pl_module: L.LightningModule) -> None:
        """Snapshot windows: the rows of the next window get their own projection seed, as TRAK draws an independent
        projection per checkpoint (one shared projection for every snapshot cost 0.045 LDS on MNIST-5k,
        benchmarks/RESULTS.md). Called once the window before has been frozen (its rows all written)."""
        self.windows.next_window()
        seed = derive_seed(self.seed, "window", self.windows.window_index)
        self._install_projector(make_capture_projector(self.projector_kind, pl_module, None, self.param_names,
                                                       self.proj_dim, seed, self.allocation))
        if self._queries is not None:   # in-run TracIn: the queries are projected like the rows they meet
            self._queries = self._queries.with_projector(self.projector)

    def request_windows(self, required: bool = False) -> None:
        """Keep each example's latest row per `CheckpointCapture` snapshot (TRAK's train features from the capture,
        `core/windows.py`). Called by `AttributionCallback` before training; `windows_unused` says when it cannot.
        `required` (train_features="capture"): a training loss that is not the task's is an error at the first
        training step (always captured, as a probe), not a fallback."""
        self.windows_requested = True
        self.windows_required = bool(required)

    def _setup_windows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_windows()
        self.windows_unused = None
        if not self.windows_requested:
            return
        if self._n_train is None or (self.ids_fn is None and self._recorder is None):
            self.windows_unused = "the training DataLoader has no batch sampler to record dataset ids from (pass ids_fn=)"
        elif callable(getattr(pl_module, HOOK_NAME, None)):
            self.windows_unused = (f"the module defines {HOOK_NAME}, whose prediction the training step's output need "
                                   "not be")
        if self.windows_unused:
            return
        base = self.out_dir if self.out_dir is not None else Path(trainer.default_root_dir) / "gradient_capture"
        root = base / "windows"
        rank = trainer.global_rank
        kept, self._resume_windows = self._resume_windows or {}, None
        for old in root.glob(f"*/rank-{rank:05d}.*"):   # this rank's windows of an earlier fit go; a resumed fit
            if old.parent.name not in kept:              # keeps those frozen before its checkpoint
                old.unlink()
        self.windows = SnapshotWindows(root, self._n_train, self.projector.proj_dim, rank)
        self.windows.frozen.update(kept)
        self.window_seeds = {name: seed for name, seed in (self._resume_seeds or {}).items() if name in kept}
        self._resume_seeds = None
        if kept:   # a resumed fit: the projection of the window after the last frozen one
            self.windows.window_index = len(kept) - 1
            self._next_window_projection(pl_module)
        if self.out_dir is not None and trainer.is_global_zero:   # chunk readers must know the projection changes
            atomic_write_json(self.out_dir / "capture.json", {**self.settings(trainer.world_size),
                                                              "projection": PER_WINDOW})
        self.window_steps = max(1, int(trainer.num_training_batches) // max(1, int(trainer.accumulate_grad_batches)))
        # the module's own forward, and its direct children's (a training step calling self.model(**batch))
        self._forward_hook = [pl_module.register_forward_hook(partial(self._on_output, True))] + [
            child.register_forward_hook(partial(self._on_output, False)) for child in pl_module.children()]

    def _on_output(self, outermost: bool, module: Any, args: Any, output: Any) -> None:
        """A forward of the LightningModule (outermost) or of a direct child in a captured step: its prediction and
        (in the backward) its gradient, once per tensor."""
        if not self._active or self.windows is None:
            return
        try:
            pred = prediction_tensor(output)
        except TaskConfigError:
            return
        if not pred.requires_grad:
            return
        for box in self._output or []:
            if box[2] is pred:   # the module returned its child's output: one candidate, the outermost
                box[3] = box[3] or outermost
                return
        box = [pred.detach(), None, pred, outermost]
        pred.register_hook(lambda g: box.__setitem__(1, g.detach()))
        self._output = [*(self._output or []), box]

    def _margin_ratios(self, n: int) -> tuple[Any, Any]:
        """(c, Q) of the captured batch's rows (NaN when they cannot be read: `core.windows.LossToMargin`)."""
        outs, self._output = self._output or [], None
        # the forward outputs of this step with one row per example that the loss used (a DDP wrapper's call
        # through forward returns the scalar loss: not a candidate); the LightningModule's own output first, else
        # a single child's; two candidates: which one is the prediction is unknown
        outs = [b for b in outs if b[1] is not None and b[0].dim() >= 1 and b[0].shape[0] == n]
        outs = [b for b in outs if b[3]] or outs
        if len(outs) != 1 or self._target is None:
            return float("nan"), float("nan")
        pred, grad = outs[0][0], outs[0][1]
        if self._to_margin is None:
            try:
                self._to_margin = LossToMargin(detect_task(pred, self._target, self._inputs))
            except (TaskConfigError, ValueError) as err:
                self.windows_unused = f"the task could not be read from the training batch ({err})"
                self._close_windows()
                return float("nan"), float("nan")
        ratio, q = self._to_margin(pred, self._target, grad * self._scale)
        if self._to_margin.mismatch:
            self.windows_unused = self._to_margin.mismatch
            self._close_windows()
            if self.windows_required:
                raise ValueError(f"AttributionCallback(train_features='capture'): {self.windows_unused}. Train with the "
                                 "task's loss, or pass train_features='auto' (TRAK post hoc)")
        return ratio, q

    def _windows_only(self) -> bool:
        """Only the snapshot windows use the rows (no in-run scores, no chunk files, no kept records): steps outside
        every window need not be captured."""
        return (self.windows is not None and self._inrun is None and self.out_dir is None
                and not self._keeps_records(True))

    def _in_a_window(self, trainer: L.Trainer) -> bool:
        """Whether this step's rows can enter a planned snapshot's window (the window_steps steps before it)."""
        from .checkpoint_capture import CheckpointCapture

        epoch, step, width = trainer.current_epoch, trainer.global_step, self.window_steps
        if step == 0:   # a probe: the loss-to-margin check runs at the first step, not only in the first window
            return True
        for c in trainer.callbacks:
            if not isinstance(c, CheckpointCapture):
                continue
            if (epoch + 1) in c.planned_epochs or (c.every_n_epochs and (epoch + 1) % c.every_n_epochs == 0):
                return True
            if any(s - width <= step < s for s in c.planned_steps):
                return True
            if c.every_n_steps and (step // c.every_n_steps + 1) * c.every_n_steps - step <= width:
                return True
        return False

    def freeze_windows(self, trainer: L.Trainer, next_projection: bool = False) -> None:
        """Freeze the window of every `CheckpointCapture` snapshot taken so far (all rows before it written out);
        with `next_projection` (training goes on) the next window's rows get a new projection."""
        if self.windows is None:
            return
        from .checkpoint_capture import CheckpointCapture

        due = [(r["name"], r["step"]) for c in trainer.callbacks if isinstance(c, CheckpointCapture)
               for r in c.records if r["name"] not in self.windows.frozen and r["step"] <= trainer.global_step]
        if not due:
            return
        self._emit()
        self._wait()
        for name, step in due:
            self.windows.freeze(name, step)
            self.window_seeds[name] = int(self.projector.layout["seed"])
        if next_projection:
            self._next_window_projection(trainer.lightning_module)

    def train_source(self) -> "CapturedTrainSource | None":
        """TRAK's train side from this capture's snapshot windows, or None (`windows_unused` says why)."""
        if self.windows is None:
            return None
        if self._to_margin is None:
            self.windows_unused = ("no captured step showed one prediction: neither the LightningModule's forward output "
                                   "nor exactly one direct child's (the training step calls several submodules?)")
            return None
        return CapturedTrainSource(self.windows.root, self.window_steps, projector_kind(self.projector),
                                   dict(self.projector.layout), self.projector.layout_hash, list(self.param_names),
                                   self._to_margin.task.name, dict(self.window_seeds))

    def _close_windows(self) -> None:
        for handle in self._forward_hook or []:
            handle.remove()
        self._forward_hook = None
        if self.windows is not None:
            windows, self.windows = self.windows, None
            self._wait()
            windows.close()

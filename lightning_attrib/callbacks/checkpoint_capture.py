"""`CheckpointCapture`: keeps weight snapshots (with the learning rate) during fit, for TRAK's snapshot average
and TracIn. By default a few (3) spread evenly over the planned training, the last one being the final weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from ..core.pipeline import Snapshot
from ..core.snapshots import INDEX_NAME, save_snapshot, write_snapshot_index


def spread(total: int, count: int) -> list[int]:
    """`count` points spread evenly over 1..total, the last one at `total` (fewer when total < count)."""
    return sorted({int(round(v)) for v in np.linspace(total / count, total, count)} - {0})


class CheckpointCapture(Callback):
    """Saves the LightningModule's weights during fit: `num_snapshots` spread over training (default 3), or
    periodically every `every_n_epochs` epochs / `every_n_steps` optimizer steps.

    Args:
        dirpath: where snapshot files go (default: `<trainer.default_root_dir>/attrib_snapshots`).
        every_n_epochs: snapshot at the end of every n-th training epoch (ignored when `every_n_steps` is set).
        every_n_steps: snapshot after every n-th optimizer step.
        keep: keep only the last `keep` snapshots (None keeps all); older files are deleted.
        num_snapshots: without `every_n_*`: this many snapshots evenly spaced over the planned training (at the
            end of epochs round(E/n), ..., E for `max_epochs` = E, or over the steps when `max_steps` bounds the
            fit), plus the final weights if training stops earlier. A fit with neither bound is refused at its
            start. A few snapshots spread over training give TRAK most of its snapshot-averaging gain; one
            every epoch multiplies the fit-end featurization cost for little more.

    Each snapshot records the learning rate of the first optimizer's first param group at that point
    (TracIn weights by it). The list of snapshots is part of the Trainer checkpoint (`state_dict`), so a
    fit resumed from a `.ckpt` keeps the snapshots taken before it. Only global rank 0 writes files; it also keeps
    `snapshots.json`, the index of the files (with sizes and checksums), from which `snapshots_from(dirpath)`
    reads exactly these snapshots and refuses a missing or altered one.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, every_n_epochs: int | None = None,
                 every_n_steps: int | None = None, keep: int | None = None, num_snapshots: int | None = 3):
        super().__init__()
        for name, val in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps), ("keep", keep),
                          ("num_snapshots", num_snapshots)):
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {val!r}")
        if every_n_epochs is None and every_n_steps is None and num_snapshots is None:
            raise ValueError("set every_n_epochs or every_n_steps (or num_snapshots): otherwise no snapshot is ever taken")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_epochs = None if every_n_steps is not None else every_n_epochs
        self.every_n_steps = every_n_steps
        self.num_snapshots = None if (every_n_epochs is not None or every_n_steps is not None) else num_snapshots
        self.keep = keep
        self.records: list[dict[str, Any]] = []
        self.planned_epochs: list[int] = []   # spread mode: 1-based epoch counts to snapshot after
        self.planned_steps: list[int] = []    # spread mode over steps: global steps to snapshot after

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps,
                                        **({"num_snapshots": self.num_snapshots} if self.num_snapshots else {}))

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "attrib_snapshots"
        if trainer.is_global_zero:
            from ..core.store import ensure_writable_dir

            ensure_writable_dir(self.dirpath, "CheckpointCapture(dirpath)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num_snapshots is None:
            return
        max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        if max_epochs is None and max_steps is None:
            raise ValueError(f"CheckpointCapture(num_snapshots={self.num_snapshots}) spreads snapshots over the planned "
                             "training, but this fit sets neither max_epochs nor max_steps: pass every_n_epochs= or "
                             "every_n_steps= instead")
        total = trainer.estimated_stepping_batches
        by_steps = max_steps is not None and (max_epochs is None or not np.isfinite(total) or max_steps <= total)
        if by_steps:
            self.planned_epochs, self.planned_steps = [], spread(int(min(max_steps, total)), self.num_snapshots)
        else:
            self.planned_epochs, self.planned_steps = spread(int(max_epochs), self.num_snapshots), []

    def _due_step(self, step: int) -> bool:
        if self.every_n_steps:
            return step % self.every_n_steps == 0
        return step in self.planned_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and self._due_step(step) and (not self.records or self.records[-1]["step"] != step):
            self._capture(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epochs = trainer.current_epoch + 1
        if (self.every_n_epochs and epochs % self.every_n_epochs == 0) or epochs in self.planned_epochs:
            if not self.records or self.records[-1]["step"] != trainer.global_step:
                self._capture(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Spread mode: a fit that stopped before its plan (early stopping, a time limit) still ends with its
        final weights captured."""
        if self.num_snapshots and trainer.global_step > 0 and (not self.records or
                                                              self.records[-1]["step"] != trainer.global_step):
            self._capture(trainer, pl_module)

    def _capture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        name = f"step{trainer.global_step:08d}"
        path = self.dirpath / f"snapshot-{name}.pt"
        record = {"name": name, "path": str(path), "lr": float(lr) if lr is not None else None,
                  "step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
        if trainer.is_global_zero:
            state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            record.update(save_snapshot(path, {"state_dict": state, **{k: v for k, v in record.items() if k != "path"}}))
        self.records.append(record)
        if self.keep is not None and len(self.records) > self.keep:
            old = self.records.pop(0)
            if trainer.is_global_zero and Path(old["path"]).exists():
                Path(old["path"]).unlink()
        if trainer.is_global_zero:
            write_snapshot_index(self.dirpath, self.records)
        trainer.strategy.barrier("CheckpointCapture")

    # -- results and resumption -------------------------------------------------------------------
    @property
    def snapshots(self) -> list[Snapshot]:
        """The captured snapshots, oldest first, as the attribution pipeline takes them; a file that has gone
        since it was written is refused with its path (never silently scored with fewer snapshots)."""
        missing = [r["path"] for r in self.records if not Path(r["path"]).exists()]
        if missing:
            raise FileNotFoundError(f"CheckpointCapture: snapshot files are gone: {missing[:3]} (listed in "
                                    f"{self.dirpath / INDEX_NAME}). Restore them, or re-run the fit.")
        return [Snapshot(r["name"], path=r["path"], lr=r["lr"], step=r["step"], epoch=r["epoch"]) for r in self.records]

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "dirpath": str(self.dirpath) if self.dirpath else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state_dict.get("records", [])]
        if self.dirpath is None and state_dict.get("dirpath"):
            self.dirpath = Path(state_dict["dirpath"])
        missing = [r["path"] for r in self.records if not Path(r["path"]).exists()]
        if missing:
            raise FileNotFoundError(
                f"CheckpointCapture: the checkpoint being resumed lists snapshots that are gone: {missing[:3]}. "
                "Restore those files (or resume with a fresh CheckpointCapture to start a new list)."
            )

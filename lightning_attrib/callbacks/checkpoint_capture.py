"""`CheckpointCapture`: keeps weight snapshots (with the learning rate) during fit, for ensembles and TracIn."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..core.pipeline import Snapshot


class CheckpointCapture(Callback):
    """Saves the LightningModule's weights every `every_n_epochs` epochs or `every_n_steps` optimizer steps.

    Args:
        dirpath: where snapshot files go (default: `<trainer.default_root_dir>/attrib_snapshots`).
        every_n_epochs: snapshot at the end of every n-th training epoch (ignored when `every_n_steps` is set).
        every_n_steps: snapshot after every n-th optimizer step.
        keep: keep only the last `keep` snapshots (None keeps all); older files are deleted.

    Each snapshot records the learning rate of the first optimizer's first param group at that point
    (TracIn weights by it). The list of snapshots is part of the Trainer checkpoint (`state_dict`), so a
    fit resumed from a `.ckpt` keeps the snapshots taken before it. Only global rank 0 writes files.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, every_n_epochs: int | None = 1,
                 every_n_steps: int | None = None, keep: int | None = None):
        super().__init__()
        for name, val in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps), ("keep", keep)):
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {val!r}")
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("set every_n_epochs or every_n_steps: otherwise no snapshot is ever taken")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_epochs = None if every_n_steps is not None else every_n_epochs
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.records: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps)

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "attrib_snapshots"
        if trainer.is_global_zero:
            from ..core.store import ensure_writable_dir

            ensure_writable_dir(self.dirpath, "CheckpointCapture(dirpath)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            if not self.records or self.records[-1]["step"] != trainer.global_step:
                self._capture(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._capture(trainer, pl_module)

    def _capture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        name = f"step{trainer.global_step:08d}"
        path = self.dirpath / f"snapshot-{name}.pt"
        record = {"name": name, "path": str(path), "lr": float(lr) if lr is not None else None,
                  "step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
        if trainer.is_global_zero:
            state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            tmp = path.with_suffix(".tmp")
            torch.save({"state_dict": state, **{k: v for k, v in record.items() if k != "path"}}, tmp)
            os.replace(tmp, path)
        self.records.append(record)
        if self.keep is not None and len(self.records) > self.keep:
            old = self.records.pop(0)
            if trainer.is_global_zero and Path(old["path"]).exists():
                Path(old["path"]).unlink()
        trainer.strategy.barrier("CheckpointCapture")

    # -- results and resumption -------------------------------------------------------------------
    @property
    def snapshots(self) -> list[Snapshot]:
        """The captured snapshots, oldest first, as the attribution pipeline takes them."""
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

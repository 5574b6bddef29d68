"""Attribution without training: score from saved snapshots on any number of devices, through Lightning Fabric.

`attribute(...)` is the Python entry point behind `lightning-attrib attribute`. Fabric's own launcher starts the
ranks (`strategy="ddp"` re-runs the calling script, `"ddp_spawn"` spawns); results travel through `out_dir`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .core.methods import FeatureMethod, make_method
from .core.pipeline import Attributor, Snapshot
from .core.results import AttributionResult, load_results
from .core.snapshots import read_snapshot_index


def snapshots_from(source: str | os.PathLike | Sequence[str | os.PathLike | Snapshot]) -> list[Snapshot]:
    """Snapshots from a `CheckpointCapture` directory, or a list of snapshot `.pt` / Lightning `.ckpt` files.

    Files are ordered by the training step they record (then by name); the lr recorded with each is kept.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and (indexed := read_snapshot_index(path)) is not None:  # CheckpointCapture's own index
            return indexed
        if path.is_dir():
            files = sorted(list(path.glob("*.pt")) + list(path.glob("*.ckpt")))
            if not files:
                raise FileNotFoundError(f"no snapshot files (*.pt, *.ckpt) in {path}: point at CheckpointCapture's dirpath")
        elif path.exists():
            files = [path]
        else:
            raise FileNotFoundError(f"snapshot source {path} does not exist")
        source = files
    snaps: list[Snapshot] = []
    for item in source:
        if isinstance(item, Snapshot):
            snaps.append(item)
            continue
        p = Path(item)
        meta = torch.load(p, map_location="cpu", weights_only=False)
        if not isinstance(meta, dict) or "state_dict" not in meta:
            raise ValueError(f"{p} is not a snapshot: expected a CheckpointCapture .pt or a Lightning .ckpt with 'state_dict'")
        lr = meta.get("lr")
        if lr is None and meta.get("optimizer_states"):
            lr = meta["optimizer_states"][0]["param_groups"][0].get("lr")
        step = meta.get("step", meta.get("global_step"))
        # the name CheckpointCapture recorded (it seeds the snapshot's projection), else the file name
        snaps.append(Snapshot(str(meta.get("name") or p.stem), path=str(p), lr=lr, step=step, epoch=meta.get("epoch")))
        del meta
    return sorted(snaps, key=lambda s: (s.step if s.step is not None else -1, s.name))


def _check_attributor_kwargs(kwargs: dict) -> None:
    """Unknown `Attributor` arguments and invalid feature settings are refused in the calling process, before any
    rank starts or any file is written (the ranks' `Attributor` checks the rest before writing too)."""
    import inspect

    from .core.settings import FeatureSettings

    valid = [p for p in inspect.signature(Attributor.__init__).parameters
             if p not in ("self", "module", "method", "train_dataset", "query_dataset", "out_dir", "dist")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"attribute() got unknown argument(s) {unknown}: it passes these on to Attributor, which "
                        f"takes {valid}")
    FeatureSettings(projector=kwargs.get("projector", "tensorsketch"), proj_dim=kwargs.get("proj_dim", 2048),
                    seed=kwargs.get("seed", 0), output="", normalize=False, params="", num_params=0,
                    non_finite=kwargs.get("non_finite", "raise"))


def _run(fabric, module, method, train_dataset, query_dataset, out_dir, snapshots, kwargs):
    from .distributed import LightningDist

    dist = LightningDist(fabric.strategy)
    return Attributor(module, method, train_dataset, query_dataset, out_dir, dist=dist, **kwargs).run(snapshots)


def attribute(module: nn.Module, train_dataset: Dataset, query_dataset: Dataset, out_dir: str | os.PathLike,
              snapshots: Any = None, method: str | FeatureMethod = "trak", method_kwargs: dict | None = None,
              accelerator: str = "cpu", devices: int | str = 1, strategy: str = "auto", num_nodes: int = 1,
              **attributor_kwargs: Any) -> AttributionResult:
    """Featurize + score `module` at `snapshots` (default: its current weights) on `devices` ranks.

    `attributor_kwargs` go to `core.Attributor` (proj_dim, projector, seed, params, output_fn, batch_size, ...).
    Returns the result (read back from `out_dir`, so it is the same on every rank and in the parent process).
    """
    import lightning as L

    _check_attributor_kwargs(attributor_kwargs)  # before Fabric starts ranks or anything is written
    method_obj = method if isinstance(method, FeatureMethod) else make_method(method, **(method_kwargs or {}))
    snaps = snapshots_from(snapshots) if snapshots is not None else None
    fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes)
    fabric.launch(_run, module, method_obj, train_dataset, query_dataset, out_dir, snaps, attributor_kwargs)
    return load_results(out_dir)

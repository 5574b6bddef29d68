"""In-run TracIn for `AttributionCallback` from a `GradientCapture` on the same Trainer (no second pass, no
snapshots): the capture's own train x query sums, with post-hoc features for examples no captured step saw."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.capture import QueryFeatures
from .gradient_capture import GradientCapture


def captured_tracin(trainer: L.Trainer, pl_module: L.LightningModule, method: Any, train_dataset: Dataset,
                    query_dataset: Dataset, out_dir: str | os.PathLike, train_collate: Callable | None = None,
                    query_collate: Callable | None = None, batch_size: int = 64):
    """TracIn for `AttributionCallback` from a `GradientCapture` on the same Trainer: the in-run scores it
    accumulated during training (the training features come from the capture: no second pass, no snapshots),
    written as the callback's standard result in `out_dir`. None when they do not apply (another method, a TracIn
    with its own `lr`, no capture with queries, or other queries / training set): then the caller scores post hoc.

    An example trained on but never in a captured batch (`every_n_steps` > 1) is featurized post hoc at the final
    weights and scored as (times trained on) x last lr x phi(z_i) . psi(z_q), never left at 0; an example never
    trained on scores 0 (it had no influence on this run)."""
    if getattr(method, "name", None) != "tracin" or getattr(method, "lr", None) is not None:
        return None
    cap = next((c for c in trainer.callbacks if isinstance(c, GradientCapture) and c.result is not None), None)
    if cap is None or cap.query_source is not query_dataset or cap.result.manifest["n_train"] != len(train_dataset):
        return None
    from ..core.results import load_results, write_result

    out_dir = Path(out_dir)
    if trainer.is_global_zero:
        res = cap.result
        scores = np.array(res.scores, dtype=np.float64)
        self_inf = np.nan_to_num(np.array(res.self_influence, dtype=np.float64), nan=0.0)
        seen, captured = cap.seen.numpy(), cap.captured_counts.numpy()
        missing = np.flatnonzero((captured == 0) & (seen > 0))
        if len(missing):
            if cap.last_lr is None:
                raise ValueError("GradientCapture recorded no learning rate: cannot score uncaptured examples")
            device = pl_module.device
            query = QueryFeatures(cap.projector, pl_module, query_dataset, query_collate, batch_size, device)
            train = QueryFeatures(cap.projector, pl_module, torch.utils.data.Subset(train_dataset, missing.tolist()),
                               train_collate, batch_size, device)
            phi, psi = train.features().double().cpu(), query.features().double().cpu()
            weight = torch.from_numpy(seen[missing] * cap.last_lr).double()
            scores[missing] = (weight[:, None] * (phi @ psi.T)).numpy()
            self_inf[missing] = (weight * phi.pow(2).sum(1)).numpy()
        manifest = {**res.manifest, "excluded": {"train": [], "query": []},   # every example scored below
                    "train_features": "GradientCapture: captured during training (in-run TracIn)",
                    "post_hoc_examples": int(len(missing)), "never_trained_on": int((seen == 0).sum()),
                    "variant": "in-run TracIn from GradientCapture; examples never in a captured batch featurized post "
                               "hoc at the final weights, scaled by how often they were trained on x the last lr"}
        write_result(out_dir, manifest=manifest, scores=scores, self_influence=self_inf,
                     train_ids=res.train_ids, query_ids=res.query_ids)
    trainer.strategy.barrier("captured_tracin")
    return load_results(out_dir)

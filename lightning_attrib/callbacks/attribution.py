"""`AttributionCallback`: on fit end, featurize the training set and queries for every captured snapshot,
compute attribution scores under the trainer's own strategy, write the result files, compute and report metrics."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from ..core.batches import BatchFormatError, unpack_batch
from ..core.methods import FeatureMethod, make_method
from ..core.outputs import OutputFunction
from ..core.pipeline import Attributor
from ..core.projection import PROJECTOR_KINDS
from ..core.results import AttributionResult
from ..distributed import LightningDist
from .checkpoint_capture import CheckpointCapture
from .gradient_capture import captured_tracin


class AttributionCallback(Callback):
    """Computes training-data attribution at the end of `Trainer.fit`.

    Args:
        method: "trak" (default), "influence", "tracin", "grad-dot", "grad-cos", or a `FeatureMethod` instance.
        method_kwargs: arguments for the method (e.g. `{"damping_ratio": 0.5}`, `{"solver": "cg"}`).
        proj_dim: random projection dimension k.
        out_dir: directory for the feature store and the result files (`load_results(out_dir)` reads them).
        train_dataset: defaults to the dataset `fit` trained on, re-read in index order without shuffling.
        query_dataset: defaults to the (first) validation dataset.
        output_fn: `(module, batch) -> per-example scalar`; needed when batches are not `(x, y)` / obvious dicts.
        params: parameter names/prefixes to attribute through (default: all trainable).
        projector, seed: projection kind and its seed: "tensorsketch" (default: count sketches from layer hooks,
            no per-example gradients; as accurate as a dense projection, see benchmarks/RESULTS.md),
            "rademacher" / "gaussian" (dense), "factorized" (Kronecker), "identity" (full gradients).
        batch_size, shard_size: featurization batch and resumption unit.
        mislabeled: truth mask of flipped training labels (default: `datamodule.train_flipped` or
            `train_dataset.flipped` when present); enables mislabel-detection metrics.
        num_suspects, num_gallery_queries, gallery_k: sizes of the reported tables.
        to_image: `x -> HxW(xC) array` for W&B images (default: square-reshape of flat inputs, or CHW/HW tensors).
        log_images: build W&B tables with images.
        leakage: also rank suspected train-test duplicate pairs (`analysis.detect_leakage`): `leakage.json` in
            `out_dir`, the flag count as a scalar and, on W&B, a table with both images side by side.
        top_k: keep only each query's k strongest proponents and opponents (`topk_*.npy`) instead of the full
            n_train x n_query score matrix, which is then never built (large training sets); not with `leakage`,
            which needs the full matrix.

    Only global rank 0 writes result files and logs; every rank takes part in featurization and scoring.
    """

    def __init__(self, method: str | FeatureMethod = "trak", method_kwargs: dict | None = None, proj_dim: int = 2048,
                 out_dir: str | os.PathLike = "attrib", train_dataset: Dataset | None = None,
                 query_dataset: Dataset | None = None, output_fn: str | OutputFunction | Callable | None = None,
                 params: Sequence[str] | Callable | None = None, projector: str = "tensorsketch", seed: int = 0,
                 batch_size: int = 64, shard_size: int = 512, mislabeled: Sequence[bool] | np.ndarray | None = None,
                 num_suspects: int = 50, num_gallery_queries: int = 8, gallery_k: int = 5,
                 to_image: Callable[[Any], np.ndarray] | None = None, log_images: bool = True, leakage: bool = False,
                 top_k: int | None = None):
        super().__init__()
        if isinstance(method, str):
            make_method(method, **(method_kwargs or {}))  # validates name and arguments now, not after training
        elif not isinstance(method, FeatureMethod):
            raise TypeError(f"method must be a method name or a FeatureMethod instance, got {type(method).__name__}")
        if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive integer (e.g. 2048), got {proj_dim!r}")
        if projector not in PROJECTOR_KINDS:
            raise ValueError(f"projector must be one of {PROJECTOR_KINDS}, got {projector!r}")
        for name, ds in (("train_dataset", train_dataset), ("query_dataset", query_dataset)):
            if ds is not None and not hasattr(ds, "__len__"):
                raise TypeError(f"{name} must be a map-style dataset with __len__, got {type(ds).__name__}")
        if output_fn is not None and not (callable(output_fn) or isinstance(output_fn, str)):
            raise TypeError("output_fn must be 'margin', 'loss' or a callable (module, batch) -> per-example scalar")
        for name, val in (("batch_size", batch_size), ("shard_size", shard_size), ("num_suspects", num_suspects)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
            raise ValueError(f"top_k must be a positive integer or None (full score matrix), got {top_k!r}")
        if top_k is not None and leakage:
            raise ValueError("leakage=True needs the full score matrix: pass top_k=None, or run "
                             "`lightning-attrib leakage` on a full result later")
        self.top_k = top_k
        self.method, self.method_kwargs = method, dict(method_kwargs or {})
        self.proj_dim, self.out_dir = proj_dim, Path(out_dir)
        self.train_dataset, self.query_dataset = train_dataset, query_dataset
        self.output_fn, self.params, self.projector, self.seed = output_fn, params, projector, seed
        self.batch_size, self.shard_size = batch_size, shard_size
        self.mislabeled = None if mislabeled is None else np.asarray(mislabeled, dtype=bool)
        self.num_suspects, self.num_gallery_queries, self.gallery_k = num_suspects, num_gallery_queries, gallery_k
        self.to_image, self.log_images, self.leakage = to_image, log_images, leakage
        self.leakage_report = None
        self.result: AttributionResult | None = None
        self.metrics: dict[str, float] = {}

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # fail before training, not after it
            from ..core.store import ensure_writable_dir

            ensure_writable_dir(self.out_dir, "AttributionCallback(out_dir)")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.status == "interrupted" or getattr(trainer, "interrupted", False):
            return
        train_ds, collate = self._train_data(trainer)
        query_ds, query_collate = self._query_data(trainer)
        if self.output_fn is None:
            self._check_batch_format(train_ds, collate)
        method = self.method if isinstance(self.method, FeatureMethod) else make_method(self.method, **self.method_kwargs)
        capture = next((c for c in trainer.callbacks if isinstance(c, CheckpointCapture)), None)
        snapshots = capture.snapshots if capture is not None and capture.records else None
        dist = LightningDist(trainer.strategy)
        pl_module.to(dist.device)  # the strategy's teardown moved it to the CPU
        progress = _ProgressBars(enabled=trainer.is_global_zero and trainer.progress_bar_callback is not None)
        attributor = Attributor(
            pl_module, method, train_ds, query_ds, self.out_dir, proj_dim=self.proj_dim, projector=self.projector,
            seed=self.seed, params=self.params, output_fn=self.output_fn, batch_size=self.batch_size,
            shard_size=self.shard_size, collate_fn=collate, dist=dist, progress=progress, top_k=self.top_k,
        )
        try:
            self.result = (captured_tracin(trainer, pl_module, method, train_ds, query_ds, self.out_dir, collate,
                                           query_collate) or attributor.run(snapshots))  # with GradientCapture: in-run
        except Exception as err:
            raise type(err)(
                f"{err}\n[lightning-attrib] training finished and its weights/snapshots are kept; features computed so "
                f"far are in {self.out_dir / 'features'}. Fix the cause and re-run attribution from the saved snapshots "
                "(`lightning-attrib attribute ...` or `lightning_attrib.attribute(...)`): finished shards are reused."
            ) from err
        finally:
            progress.close()
        if trainer.is_global_zero:
            self._evaluate_and_report(trainer, pl_module, train_ds, query_ds, collate, query_collate, dist.device)
        trainer.strategy.barrier("AttributionCallback")

    # -- data ----------------------------------------------------------------------------------------
    def _train_data(self, trainer: L.Trainer) -> tuple[Dataset, Callable | None]:
        if self.train_dataset is not None:
            return self.train_dataset, None
        loader = _first_loader(trainer.train_dataloader)
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        if loader is None or not hasattr(loader, "dataset") or not hasattr(loader.dataset, "__len__"):
            raise ValueError("AttributionCallback cannot find the training dataset of this fit: pass train_dataset=")
        return loader.dataset, loader.collate_fn

    def _query_data(self, trainer: L.Trainer) -> tuple[Dataset, Callable | None]:
        if self.query_dataset is not None:
            return self.query_dataset, None
        loader = _first_loader(trainer.val_dataloaders)
        if loader is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            try:
                loader = _first_loader(trainer.datamodule.val_dataloader())
            except NotImplementedError:
                loader = None
        if loader is None or not hasattr(loader, "dataset"):
            raise ValueError("AttributionCallback found no validation set to use as queries: pass query_dataset=")
        return loader.dataset, loader.collate_fn

    def _check_batch_format(self, dataset: Dataset, collate: Callable | None) -> None:
        from torch.utils.data import DataLoader

        batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate)))
        try:
            unpack_batch(batch)
        except BatchFormatError as err:
            raise BatchFormatError(f"AttributionCallback: {err}") from None

    def _truth_mask(self, trainer: L.Trainer, train_ds: Dataset) -> np.ndarray | None:
        for mask in (self.mislabeled, getattr(trainer.datamodule, "train_flipped", None), getattr(train_ds, "flipped", None)):
            if mask is not None:
                mask = np.asarray(mask, dtype=bool)
                if mask.shape != (len(train_ds),):
                    raise ValueError(f"mislabeled mask has shape {mask.shape}, expected ({len(train_ds)},): one flag per training example")
                return mask
        return None

    # -- metrics and reporting (rank 0) ------------------------------------------------------------
    def _evaluate_and_report(self, trainer, pl_module, train_ds, query_ds, collate, query_collate, device) -> None:
        from ..reporting import make_reporter
        from ..reporting.predictions import predict

        res = self.result
        metrics: dict[str, float] = {f"attrib/time/{k}": v for k, v in res.manifest.get("timings", {}).items()}
        train_pred = query_pred = None
        if self.output_fn is None:
            train_pred = predict(pl_module, train_ds, collate, device, self.batch_size)
            query_pred = predict(pl_module, query_ds, query_collate, device, self.batch_size)
        truth = self._truth_mask(trainer, train_ds)
        if truth is not None:
            from ..metrics import MislabelDetection

            rankings = {}
            if not res.manifest.get("constant_self_influence"):
                rankings["self_influence"] = torch.as_tensor(res.self_influence, dtype=torch.float64)
            if train_pred is not None:
                rankings["loss_baseline"] = torch.as_tensor(train_pred.loss, dtype=torch.float64)
            for name, ranking in rankings.items():
                metric = MislabelDetection()
                metric.update(ranking, torch.as_tensor(truth))
                for key, val in metric.compute().items():
                    metrics[f"attrib/mislabel/{name}/{key}"] = float(val)
        if self.leakage:
            from ..analysis import detect_leakage, load_store_features

            self.leakage_report = detect_leakage(res, train_ds, query_ds, *load_store_features(res))
            self.leakage_report.save(self.out_dir / "leakage.json")
            metrics["attrib/leakage/flags"] = float(self.leakage_report.flags)
        self.metrics = metrics
        make_reporter(trainer).report(
            res, metrics, train_ds=train_ds, query_ds=query_ds, train_pred=train_pred, query_pred=query_pred,
            truth=truth, to_image=self.to_image, log_images=self.log_images, num_suspects=self.num_suspects,
            num_gallery_queries=self.num_gallery_queries, gallery_k=self.gallery_k, leakage=self.leakage_report)
        rank_zero_info(f"[lightning-attrib] {res.manifest['method']} scores for {res.manifest['n_train']} training x "
                       f"{res.manifest['n_query']} query examples written to {self.out_dir}")

    def state_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "method": str(getattr(self.method, "name", self.method)),
                "proj_dim": self.proj_dim, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("out_dir") and Path(state_dict["out_dir"]) != self.out_dir:
            rank_zero_info(f"[lightning-attrib] resumed run wrote attribution to {state_dict['out_dir']}; "
                           f"this one writes to {self.out_dir}")


def _first_loader(loaders: Any):
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


class _ProgressBars:
    """Lightning-style tqdm bars, one stage at a time (rank 0 only)."""

    def __init__(self, enabled: bool):
        self.enabled, self.stage, self.bar = enabled, None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"Attribution: {stage}", unit="shard", dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.stage, self.bar = None, None

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

from ..core.methods import FeatureMethod, make_method
from ..core.preflight import PreflightReport, preflight, warn_if_augmented
from ..core.tasks import OutputFunction, Task, TaskOutput, resolve_output
from ..core.pipeline import Attributor
from ..core.projection import PROJECTOR_KINDS
from ..core.results import AttributionResult
from ..distributed import LightningDist
from .checkpoint_capture import CheckpointCapture
from .loaders import first_loader, loader_of
from .capture_windows import train_mode_layers
from .gradient_capture import GradientCapture
from .in_run import captured_tracin


TRAIN_FEATURES = ("auto", "capture", "post-hoc")


class AttributionCallback(Callback):
    """Computes training-data attribution at the end of `Trainer.fit`.

    Args:
        method: "trak" (default), "influence", "tracin", "grad-dot", "grad-cos", or a `FeatureMethod` instance.
        method_kwargs: arguments for the method (e.g. `{"damping_ratio": 0.5}`, `{"solver": "cg"}`).
        proj_dim: random projection dimension k.
        out_dir: directory for the feature store and the result files (`load_results(out_dir)` reads them).
        train_dataset: defaults to `datamodule.attribution_dataset("train")` when the DataModule defines it, else
            the dataset `fit` trained on, re-read in index order without shuffling. Pass (or return from the hook)
            an un-augmented view of the same examples when `__getitem__` applies random augmentation.
        query_dataset: defaults to `datamodule.attribution_dataset("query")`, else the (first) validation dataset.
        collate_fn: collate function for `train_dataset` / `query_dataset`; default: the fit loaders' own.
        output_fn: what is attributed. Default: chosen from the batches, the module's output and the targets
            (multi-class, binary/multi-label, regression, causal/masked LM; see `core/tasks.py`), or from the
            module's own `attribution_step(self, batch) -> (prediction, target)` when it defines one. Also: a task
            name ("regression", "logistic", "multiclass", "causal-lm", "masked-lm"), a `core.tasks.Task`, an
            `OutputFunction`, or `CustomOutput(fn, loss_weight=...)` (a plain callable must say its Q for TRAK).
        params: parameter names/prefixes to attribute through (default: all trainable).
        projector, seed: projection kind and its seed: "tensorsketch" (default: count sketches from layer hooks,
            no per-example gradients; as accurate as a dense projection, see benchmarks/RESULTS.md),
            "rademacher" / "gaussian" (dense), "factorized" (Kronecker), "identity" (full gradients).
        batch_size, shard_size: featurization batch and resumption unit.
        mislabeled: truth mask of flipped training labels (default: `datamodule.train_flipped` or
            `train_dataset.flipped` when present); enables mislabel-detection metrics.
        num_suspects, num_gallery_queries, gallery_k: sizes of the reported tables.
        to_image: `x -> HxW(xC) array` for W&B images (default: square-reshape of flat inputs, or CHW/HW tensors).
        to_display: `example -> str | number` for table cells of examples that are not images (default: the
            example's values as text; token ids as a list).
        keep_features: False removes `out_dir/features` (the feature store) after a successful run; the result
            files stay. A later run into the same out_dir then recomputes the features.
        check_before_fit: run the whole attribution path on two training and two query examples at the initial
            weights before the first training step (`core/preflight.py`), so that configuration errors surface
            before training; writes nothing to `out_dir`.
        non_finite: "raise" (default): a NaN/inf output, gradient, kernel or score stops attribution naming the
            example and snapshot; "exclude": such examples get NaN scores and are listed in `manifest["excluded"]`.
        log_images: build W&B tables with images.
        leakage: also rank suspected train-test duplicate pairs (`analysis.detect_leakage`): `leakage.json` in
            `out_dir`, the flag count as a scalar and, on W&B, a table with both images side by side.
        top_k: keep only each query's k strongest proponents and opponents (`topk_*.npy`) instead of the full
            n_train x n_query score matrix, which is then never built (large training sets); not with `leakage`,
            which needs the full matrix.
        train_features: where the training examples' features come from. "auto" (default): from a `GradientCapture`
            on the same Trainer when it applies, with no second pass over the training set: in-run TracIn for
            `method="tracin"`; for TRAK each example's latest captured row before each `CheckpointCapture` snapshot
            (its margin feature and Q read exactly from the step's loss gradient and output, `core/windows.py`;
            examples a window lacks are featurized post hoc), else post hoc with a warning saying why; a module
            with dropout or batch norm (training steps differ from the eval-mode model) stays post hoc. "capture":
            the same, but an error (before training where it can be known) when the capture cannot be used.
            "post-hoc": always re-featurize the training set at every snapshot after training.

    Only global rank 0 writes result files and logs; every rank takes part in featurization and scoring.
    """

    def __init__(self, method: str | FeatureMethod = "trak", method_kwargs: dict | None = None, proj_dim: int = 2048,
                 out_dir: str | os.PathLike = "attrib", train_dataset: Dataset | None = None,
                 query_dataset: Dataset | None = None, output_fn: str | OutputFunction | Callable | None = None,
                 params: Sequence[str] | Callable | None = None, projector: str = "tensorsketch", seed: int = 0,
                 batch_size: int = 64, shard_size: int = 512, mislabeled: Sequence[bool] | np.ndarray | None = None,
                 num_suspects: int = 50, num_gallery_queries: int = 8, gallery_k: int = 5,
                 to_image: Callable[[Any], np.ndarray] | None = None, log_images: bool = True, leakage: bool = False,
                 top_k: int | None = None, collate_fn: Callable | None = None,
                 to_display: Callable[[Any], Any] | None = None, keep_features: bool = True,
                 check_before_fit: bool = True, non_finite: str = "raise", train_features: str = "auto"):
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
        if output_fn is not None and not (callable(output_fn) or isinstance(output_fn, (str, Task))):
            raise TypeError("output_fn must be 'margin', 'loss', a task name, a Task or a callable (module, batch) -> "
                            "per-example scalar")
        if isinstance(method, str) and output_fn is not None:
            resolve_output(output_fn, method=make_method(method, **(method_kwargs or {})))  # Q known? names valid?
        for name, fn in (("collate_fn", collate_fn), ("to_display", to_display), ("to_image", to_image)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        for name, val in (("batch_size", batch_size), ("shard_size", shard_size), ("num_suspects", num_suspects)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
            raise ValueError(f"top_k must be a positive integer or None (full score matrix), got {top_k!r}")
        if top_k is not None and leakage:
            raise ValueError("leakage=True needs the full score matrix: pass top_k=None, or run "
                             "`lightning-attrib leakage` on a full result later")
        from ..core.settings import NON_FINITE_POLICIES as NON_FINITE

        if non_finite not in NON_FINITE:
            raise ValueError(f"non_finite must be one of {NON_FINITE}, got {non_finite!r}")
        if train_features not in TRAIN_FEATURES:
            raise ValueError(f"train_features must be one of {TRAIN_FEATURES} ('auto': from a GradientCapture on the "
                             f"Trainer when it applies, else post hoc), got {train_features!r}")
        self.train_features = train_features
        self.top_k, self.non_finite = top_k, non_finite
        self.method, self.method_kwargs = method, dict(method_kwargs or {})
        self.proj_dim, self.out_dir = proj_dim, Path(out_dir)
        self.train_dataset, self.query_dataset = train_dataset, query_dataset
        self.output_fn, self.params, self.projector, self.seed = output_fn, params, projector, seed
        self.batch_size, self.shard_size = batch_size, shard_size
        self.mislabeled = None if mislabeled is None else np.asarray(mislabeled, dtype=bool)
        self.num_suspects, self.num_gallery_queries, self.gallery_k = num_suspects, num_gallery_queries, gallery_k
        self.to_image, self.log_images, self.leakage = to_image, log_images, leakage
        self.collate_fn, self.to_display = collate_fn, to_display
        self.keep_features, self.check_before_fit = bool(keep_features), bool(check_before_fit)
        self.preflight_report: PreflightReport | None = None
        self.leakage_report = None
        self.result: AttributionResult | None = None
        self.metrics: dict[str, float] = {}

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # fail before training, not after it
            from ..core.store import ensure_writable_dir

            ensure_writable_dir(self.out_dir, "AttributionCallback(out_dir)")
        if stage == "fit":
            self._request_capture_windows(trainer, pl_module)

    def _request_capture_windows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """TRAK-like methods take their train features from a GradientCapture's snapshot windows (see train_features):
        ask the capture to keep them; with train_features="capture", say now what is missing."""
        method = self._method()
        cap = next((c for c in trainer.callbacks if isinstance(c, GradientCapture)), None)
        in_run = getattr(method, "name", None) == "tracin" and getattr(method, "lr", None) is None
        if cap is not None and not (in_run and self.train_features != "post-hoc"):
            cap.release_default_queries()   # its in-run TracIn scores would not be used
        if self.train_features == "post-hoc":
            return
        if in_run:
            if cap is None and self.train_features == "capture":
                raise ValueError("AttributionCallback(train_features='capture', method='tracin') needs a "
                                 "GradientCapture() on the Trainer: add one, or pass train_features='auto'")
            return   # in-run TracIn from the capture's query pass (callbacks/in_run.py)
        problem = None
        if getattr(method, "output", None) != "margin" or callable(getattr(method, "prepare", None)):
            problem = f"method {getattr(method, 'name', method)!r} does not use margin features only (TRAK does)"
        elif self.output_fn is not None:
            problem = "output_fn is set: captured features are the detected task's margin"
        elif cap is None:
            problem = "there is no GradientCapture on the Trainer"
        elif not any(isinstance(c, CheckpointCapture) for c in trainer.callbacks):
            problem = "there is no CheckpointCapture on the Trainer (the windows end at its snapshots)"
        elif self.train_features == "auto" and train_mode_layers(pl_module):
            # the training steps' gradients are of another function than the eval-mode model TRAK attributes
            rank_zero_info(f"[lightning-attrib] TRAK's training features are computed post hoc: the module has "
                           f"{train_mode_layers(pl_module)} layers, which act differently in training steps; "
                           "train_features='capture' takes them from the capture anyway")
            return
        if problem is None:
            cap.request_windows(required=self.train_features == "capture")
        elif self.train_features == "capture":
            raise ValueError(f"AttributionCallback(train_features='capture'): {problem}. Fix that, or pass "
                             "train_features='auto' (post hoc when the capture does not apply)")

    def _captured_train_source(self, trainer: L.Trainer):
        """The GradientCapture's TRAK train source after training, or None (post hoc; warned unless not asked for)."""
        cap = next((c for c in trainer.callbacks if isinstance(c, GradientCapture) and c.windows_requested), None)
        if cap is None:
            return None
        cap.freeze_windows(trainer)   # a final snapshot CheckpointCapture took after the capture's on_train_end
        source = cap.train_source()
        if source is None:
            message = (f"[lightning-attrib] TRAK's training features are computed post hoc, not taken from the "
                       f"GradientCapture: {cap.windows_unused}")
            if self.train_features == "capture":
                raise ValueError(message + ". Training finished and its snapshots are kept: re-run attribution from "
                                 "them, or pass train_features='auto'")
            import warnings

            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return source

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before the first training step: run the attribution path on a few examples (every rank, locally), then
        log the attribution settings as hyperparameters to the trainer's loggers (rank 0)."""
        if self.check_before_fit:
            train_ds, collate = self._train_data(trainer)
            query_ds, _ = self._query_data(trainer)
            method = self._method()
            for what, ds in (("train_dataset", train_ds), ("query_dataset", query_ds)):
                warn_if_augmented(ds, what)
            if train_ds is not None and hasattr(train_ds, "__len__"):
                self._truth_mask(trainer, train_ds)  # a mislabeled mask of the wrong length: now, not after training
                self._check_display(train_ds)
            # snapshots from CheckpointCapture (or GradientCapture's steps) record the learning rate, which TracIn needs
            records_lr = any(isinstance(c, CheckpointCapture) or (isinstance(c, GradientCapture) and c.scores_queries)
                             for c in trainer.callbacks)
            self.preflight_report = preflight(
                pl_module, method, train_ds, query_ds, self.out_dir, output_fn=self.output_fn, collate_fn=collate,
                device=pl_module.device, snapshot_lr=1.0 if records_lr else None,
                check_lock=trainer.is_global_zero, **self._attributor_kwargs())
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams({"attribution": self.settings()})

    def _method(self) -> FeatureMethod:
        """A fresh method object (a name is instantiated with method_kwargs), or the user's instance."""
        return self.method if isinstance(self.method, FeatureMethod) else make_method(self.method, **self.method_kwargs)

    def settings(self) -> dict[str, Any]:
        """The attribution settings (what the W&B config and the other loggers' hyperparameters record)."""
        method = self.method if isinstance(self.method, str) else getattr(self.method, "name", type(self.method).__name__)
        out = self.output_fn if isinstance(self.output_fn, (str, type(None))) else getattr(
            self.output_fn, "name", getattr(self.output_fn, "__name__", type(self.output_fn).__name__))
        s = {"method": method, "method_kwargs": dict(self.method_kwargs), "proj_dim": self.proj_dim,
             "projector": self.projector, "seed": self.seed, "out_dir": str(self.out_dir), "output_fn": out or "auto",
             "params": self.params if isinstance(self.params, (list, tuple, str, type(None))) else "callable",
             "batch_size": self.batch_size, "shard_size": self.shard_size, "top_k": self.top_k,
             "keep_features": self.keep_features, "non_finite": self.non_finite,
             "train_features": self.train_features}
        if self.preflight_report is not None:
            s["output"] = self.preflight_report.output
            s["task"] = {k: v for k, v in self.preflight_report.output_details.items() if v is not None}
            s["feature_dim"] = self.preflight_report.feature_dim
        return s

    def _attributor_kwargs(self) -> dict[str, Any]:
        return dict(proj_dim=self.proj_dim, projector=self.projector, seed=self.seed, params=self.params,
                    batch_size=self.batch_size, shard_size=self.shard_size, top_k=self.top_k, non_finite=self.non_finite)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.status == "interrupted" or getattr(trainer, "interrupted", False):
            return
        train_ds, collate = self._train_data(trainer)
        query_ds, query_collate = self._query_data(trainer)
        method = self._method()
        capture = next((c for c in trainer.callbacks if isinstance(c, CheckpointCapture)), None)
        snapshots = capture.snapshots if capture is not None and capture.records else None
        dist = LightningDist(trainer.strategy)
        pl_module.to(dist.device)  # the strategy's teardown moved it to the CPU
        progress = _ProgressBars(enabled=trainer.is_global_zero and trainer.progress_bar_callback is not None)
        attributor = None
        try:
            # with GradientCapture on the Trainer: in-run scores from the capture (None when it does not apply)
            if self.train_features != "post-hoc":
                self.result = captured_tracin(trainer, pl_module, method, train_ds, query_ds, self.out_dir, collate,
                                              query_collate)
            if self.result is None:
                def make(source):
                    return Attributor(pl_module, method, train_ds, query_ds, self.out_dir, output_fn=self.output_fn,
                                      collate_fn=collate, dist=dist, progress=progress, train_source=source,
                                      **self._attributor_kwargs())
                source = self._captured_train_source(trainer)
                try:
                    attributor = make(source)
                except ValueError as err:   # the capture's task is not the one attributed here: post hoc ("auto")
                    if source is None or self.train_features == "capture":
                        raise
                    import warnings

                    warnings.warn(f"[lightning-attrib] TRAK's training features are computed post hoc: {err}",
                                  RuntimeWarning, stacklevel=2)
                    attributor = make(None)
                self.result = attributor.run(snapshots)
        except Exception as err:
            raise type(err)(
                f"{err}\n[lightning-attrib] training finished and its weights/snapshots are kept; features computed so "
                f"far are in {self.out_dir / 'features'}. Fix the cause and re-run attribution from the saved snapshots "
                "(`lightning-attrib attribute ...` or `lightning_attrib.attribute(...)`): finished shards are reused."
            ) from err
        finally:
            progress.close()
        if trainer.is_global_zero:
            output = attributor.output if attributor is not None else resolve_output(
                self.output_fn, default=method.output, module=pl_module, method=method, dataset=train_ds,
                collate_fn=collate)   # in-run scores from a GradientCapture: no Attributor ran
            self._evaluate_and_report(trainer, pl_module, train_ds, query_ds, collate, query_collate, dist.device,
                                      output)
        trainer.strategy.barrier("AttributionCallback")
        if not self.keep_features and trainer.is_global_zero:
            import shutil

            shutil.rmtree(self.out_dir / "features", ignore_errors=True)
        trainer.strategy.barrier("AttributionCallback.cleanup")

    # -- data ----------------------------------------------------------------------------------------
    def _datamodule_view(self, trainer: L.Trainer, split: str) -> Dataset | None:
        hook = getattr(trainer.datamodule, "attribution_dataset", None)
        return hook(split) if callable(hook) else None

    def _train_data(self, trainer: L.Trainer) -> tuple[Dataset, Callable | None]:
        loader = first_loader(trainer.train_dataloader)
        if loader is None:
            loader = loader_of(trainer.fit_loop)
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        fit_collate = getattr(loader, "collate_fn", None)
        view = self.train_dataset if self.train_dataset is not None else self._datamodule_view(trainer, "train")
        if view is not None:
            return view, self.collate_fn or fit_collate
        if loader is None or not hasattr(loader, "dataset") or not hasattr(loader.dataset, "__len__"):
            raise ValueError("AttributionCallback cannot find the training dataset of this fit: pass train_dataset=")
        return loader.dataset, self.collate_fn or fit_collate

    def _query_data(self, trainer: L.Trainer) -> tuple[Dataset, Callable | None]:
        loader = first_loader(trainer.val_dataloaders)
        if loader is None:
            loader = first_loader(loader_of(getattr(trainer.fit_loop.epoch_loop, "val_loop", None)))
        if loader is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            try:
                loader = first_loader(trainer.datamodule.val_dataloader())
            except NotImplementedError:
                loader = None
        collate = getattr(loader, "collate_fn", None)
        if loader is None:  # no validation loader: queries collate like the training data
            collate = getattr(first_loader(trainer.train_dataloader) or loader_of(trainer.fit_loop), "collate_fn", None)
        view = self.query_dataset if self.query_dataset is not None else self._datamodule_view(trainer, "query")
        if view is not None:
            return view, self.collate_fn or collate
        if loader is None or not hasattr(loader, "dataset"):
            raise ValueError("AttributionCallback found no validation set to use as queries: pass query_dataset=")
        return loader.dataset, self.collate_fn or collate

    def _check_display(self, dataset: Dataset) -> None:
        """`to_image` / `to_display` run on the first example now (the report tables use them after training)."""
        if len(dataset) == 0 or (self.to_image is None and self.to_display is None):
            return
        from ..reporting.images import example_display

        try:
            example_display(dataset, 0, self.to_image, self.to_display)
        except Exception as err:
            raise type(err)(f"[lightning-attrib] checked before training: AttributionCallback's to_image/to_display "
                            f"failed on train example 0: {err}. They receive the example's input (x of (x, y), the "
                            "inputs tuple of (x1, ..., xn, y), or a dict batch's input); fix or drop them") from err

    def _truth_mask(self, trainer: L.Trainer, train_ds: Dataset) -> np.ndarray | None:
        for mask in (self.mislabeled, getattr(trainer.datamodule, "train_flipped", None), getattr(train_ds, "flipped", None)):
            if mask is not None:
                mask = np.asarray(mask, dtype=bool)
                if mask.shape != (len(train_ds),):
                    raise ValueError(f"mislabeled mask has shape {mask.shape}, expected ({len(train_ds)},): one flag per training example")
                return mask
        return None

    # -- metrics and reporting (rank 0) ------------------------------------------------------------
    def _evaluate_and_report(self, trainer, pl_module, train_ds, query_ds, collate, query_collate, device,
                             output: OutputFunction) -> None:
        from ..reporting import make_reporter
        from ..reporting.predictions import predict

        res = self.result
        metrics: dict[str, float] = {f"attrib/time/{k}": v for k, v in res.manifest.get("timings", {}).items()}
        train_pred = query_pred = None
        if isinstance(output, TaskOutput):  # a built-in task: given label, prediction and loss for tables and baseline
            train_pred = predict(pl_module, train_ds, collate, device, self.batch_size, output)
            query_pred = predict(pl_module, query_ds, query_collate, device, self.batch_size, output)
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
            truth=truth, to_image=self.to_image, to_display=self.to_display, log_images=self.log_images,
            num_suspects=self.num_suspects,
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

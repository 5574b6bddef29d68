"""Preflight: the whole attribution path on a couple of training and query examples at the current weights, before
any training, so that every configuration error surfaces in seconds instead of after the run.

`preflight(...)` checks the datasets (present, non-empty, deterministic reads), reads a batch of each split, resolves
the task (reader, output, Q; target dtypes and ranges), then runs a real `Attributor` (featurize with the configured
projector and parameters, method fit/prepare: solver, projector and parameter-limit compatibility, layer support,
damping; score; self-influence) on those examples into a temporary directory that is deleted afterwards, and checks
that no other live run holds `out_dir` (a feature store of other settings is fine: the real run recomputes it).
Nothing is left in `out_dir`; the global random state is left as it was. Plain torch.
"""
from __future__ import annotations

import copy
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .batches import tensor_leaves
from .methods.base import FeatureMethod
from .tasks import TaskOutput, resolve_output, sample_batch

PREFIX = "[lightning-attrib] checked before training, on the first examples at the initial weights"


class ConfigurationError(ValueError):
    """Attribution would fail after training with these settings; the message says what to change."""


class NondeterministicDatasetWarning(UserWarning):
    """A dataset returns different tensors on two reads of the same index (random augmentation)."""


@dataclass
class PreflightReport:
    """What the preflight resolved: the output actually attributed (its name goes into the manifest) and timings."""

    output: str
    output_details: dict
    feature_dim: int
    seconds: float


def _raise(err: BaseException, where: str) -> None:
    msg = f"{PREFIX} ({where}): {err}"
    try:
        new = type(err)(msg)
    except Exception:  # an exception type with another constructor
        new = ConfigurationError(msg)
    raise new from err


def reads_differ(dataset: Dataset, index: int = 0) -> bool:
    """True when `dataset[index]` gives different tensors on two reads (e.g. random augmentation in __getitem__)."""
    a, b = list(tensor_leaves(dataset[index])), list(tensor_leaves(dataset[index]))
    if len(a) != len(b):
        return True
    return any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b))


def check_dataset(dataset: Any, what: str, fix: str) -> int:
    """Length of a map-style dataset; refuses a missing, iterable-only or empty one (`fix` says what to pass)."""
    if dataset is None:
        raise ConfigurationError(f"{PREFIX}: no {what} found: {fix}")
    try:
        n = len(dataset)
    except TypeError as err:
        raise ConfigurationError(f"{PREFIX}: {what} must be a map-style dataset with __len__ (got "
                                 f"{type(dataset).__name__}): {fix}") from err
    if n == 0:
        raise ConfigurationError(f"{PREFIX}: {what} is empty: {fix}")
    return n


def warn_if_augmented(dataset: Dataset, what: str) -> bool:
    """Warn (naming the fix) when reads of the same example differ; returns whether they did."""
    try:
        if len(dataset) == 0:
            return False
    except TypeError:
        return False
    with _kept_random_state():
        differ = reads_differ(dataset, 0)
    if differ:
        warnings.warn(
            f"{what}[0] returned different tensors on two reads (random augmentation in __getitem__?): attribution "
            f"would featurize random views. Attribute an un-augmented view: pass AttributionCallback({what}=<the same "
            "examples, same order, without augmentation>) (the fit loaders' collate_fn is kept), or define "
            f"`attribution_dataset(self, split)` on your LightningDataModule returning it for split 'train'/'query'.",
            NondeterministicDatasetWarning, stacklevel=3)
    return differ


class _kept_random_state:
    """Restores the python, numpy and torch (CPU and CUDA) random states on exit."""

    def __enter__(self):
        self.py, self.np = random.getstate(), np.random.get_state()
        self.fork = torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized()
                                          else [])
        self.fork.__enter__()
        return self

    def __exit__(self, *exc):
        self.fork.__exit__(*exc)
        random.setstate(self.py)
        np.random.set_state(self.np)
        return False


QUICK_ITERATIONS = 20  # iterative solvers' caps in the preflight (two examples need no more; keeps it seconds)


def quick_copy(method: FeatureMethod, damped: bool = False) -> FeatureMethod:
    """A copy of `method` for the preflight: iteration caps lowered to QUICK_ITERATIONS; with `damped`, the damping
    raised a million-fold, which makes any curvature well-posed."""
    m = copy.deepcopy(method)
    for attr in ("cg_max_iter", "lissa_depth"):
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, min(getattr(m, attr), QUICK_ITERATIONS))
    if damped:
        if getattr(m, "damping", None) is not None:
            m.damping = max(float(m.damping) * 1e6, 1.0)
        if isinstance(getattr(m, "damping_ratio", None), (int, float)):
            m.damping_ratio = max(float(m.damping_ratio) * 1e6, 1e6)
    return m


def preflight(module: nn.Module, method: FeatureMethod, train_dataset: Dataset, query_dataset: Dataset,
              out_dir: str | os.PathLike, *, output_fn: Any = None, collate_fn: Callable | None = None,
              device: torch.device | str | None = None, num_examples: int = 2, snapshot_lr: float | None = None,
              check_lock: bool = True, **attributor_kwargs) -> PreflightReport:
    """Run the attribution path on `num_examples` training and query examples; raise what would fail after training.

    `attributor_kwargs` are the `Attributor` settings of the real run (proj_dim, projector, seed, params, batch_size,
    shard_size, top_k, ...). The module keeps its weights and mode; `method` is not touched (a copy is fitted).
    `snapshot_lr`: the learning rate the real run's snapshots will record (None when they record none, e.g. no
    `CheckpointCapture`): methods that need it (TracIn) fail here exactly as they would after training.
    `check_lock`: check that no other live run writes `out_dir` (one process per run does: DDP's global rank 0).
    """
    from .dist import LocalDist
    from .lock import OutDirLock
    from .pipeline import Attributor, Snapshot
    from .store import ensure_writable_dir

    t0 = time.perf_counter()
    n_train = check_dataset(train_dataset, "train_dataset", "pass train_dataset= or fit with a training dataloader")
    n_query = check_dataset(query_dataset, "query_dataset", "pass query_dataset= or fit with a validation dataloader")
    ensure_writable_dir(out_dir, "AttributionCallback(out_dir)")
    device = torch.device(device) if device is not None else next(
        (p.device for p in module.parameters()), torch.device("cpu"))
    with _kept_random_state():
        # 1. reading, output and Q on a batch of each split
        try:
            output = resolve_output(output_fn, default=method.output, module=module, method=method,
                                    dataset=train_dataset, collate_fn=collate_fn)
        except Exception as err:
            _raise(err, "reading a training batch and choosing the task")
        if isinstance(output, TaskOutput):
            was_training = module.training
            module.eval()
            try:
                for split, ds in (("training", train_dataset), ("query", query_dataset)):
                    batch = sample_batch(ds, collate_fn, device, num_examples)
                    try:
                        output.check(module, batch)
                    except Exception as err:
                        _raise(err, f"reading {split} examples, running the module on them and checking their targets")
            finally:
                module.train(was_training)
        # 2. the real pipeline on a few examples, into a directory that is deleted afterwards
        sub_train = Subset(train_dataset, range(min(num_examples, n_train)))
        sub_query = Subset(query_dataset, range(min(num_examples, n_query)))
        kwargs = {k: v for k, v in attributor_kwargs.items() if k not in ("dist", "progress")}
        with tempfile.TemporaryDirectory(prefix="lightning-attrib-preflight-") as tmp:

            def mini_run(m: FeatureMethod, where: str):
                mini = Attributor(module, m, sub_train, sub_query, Path(tmp) / where, output_fn=output,
                                  collate_fn=collate_fn, dist=LocalDist(device), **kwargs)
                with warnings.catch_warnings():  # conditioning warnings on two examples say nothing about the run
                    warnings.simplefilter("ignore")
                    snaps = None if snapshot_lr is None else [
                        Snapshot("preflight", state_dict={k: v.detach().clone() for k, v in module.state_dict().items()},
                                 lr=float(snapshot_lr))]
                    return mini, mini.run(snaps)

            try:
                mini, result = mini_run(quick_copy(method), "run")
            except Exception as err:
                # Curvature on two examples can be singular or indefinite where the full training set is not: if
                # the same path succeeds with strong damping, the failure was numerical, not a configuration error.
                try:
                    mini, result = mini_run(quick_copy(method, damped=True), "damped")
                except Exception:
                    _raise(err, "featurizing, fitting and scoring")
                warnings.warn(f"{PREFIX}: the method's numerics failed on two examples ({err}) but the same "
                              "configuration works with more damping; if attribution fails after training, raise the "
                              "damping.", RuntimeWarning, stacklevel=2)
            arrays = [("scores", np.load(Path(result.out_dir) / f)) for f in result.files
                      if f.endswith(".npy") and "ids" not in f]
            if result.manifest.get("self_influence_computed", True):
                arrays.append(("self-influence", np.asarray(result.self_influence)))
            bad = [name for name, arr in arrays
                   if arr.dtype.kind == "f" and not np.all(np.isfinite(arr.astype(np.float64)))]
            if bad:
                raise ConfigurationError(f"{PREFIX}: {' and '.join(bad)} are not finite at the initial weights: check "
                                         "the model's numerics (loss/output NaN or inf) and the method's damping")
            name, dim = mini.output.name, int(result.manifest["proj_dim"])
        # 3. out_dir must not be in use by another live run (a store of other settings is fine: it is recomputed)
        if check_lock:
            with OutDirLock(out_dir, "AttributionCallback(out_dir)"):
                pass
    details = output.describe() if hasattr(output, "describe") else {"output": name}
    return PreflightReport(name, details, dim, time.perf_counter() - t0)

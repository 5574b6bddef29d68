"""The on-disk format of `GradientCapture(out_dir=...)`, its reader, and in-run TracIn from it (plain torch/numpy).

    capture.json                          rank 0: projector layout (+ hash), parameter names, settings
    rank-RRRRR/chunk-IIIIII.npy           (m, proj_dim) float32 features, rows in capture order
    rank-RRRRR/chunk-IIIIII.meta.npz      per row: step, epoch, batch_idx (int64), lr (float64, NaN if
                                          unknown), ids (int64, -1 without `ids_fn`); written last, so its
                                          presence means the chunk is complete

The writer (`write_chunk`) and the readers live here together so the format has one place; the callback
(`callbacks/gradient_capture.py`) only fills chunks during training. `make_capture_projector` is the one rule for
which projector (and which layers: `capture_accept`) a capture uses, shared by the callback, its query pass and
`capture_projector`, so their layout hashes agree.
"""
from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .batches import move_to
from .io import atomic_save_npy, atomic_write_bytes
from .layers import Layer
from .outputs import OutputFunction, resolve_output
from .sketch import HookedProjector, KroneckerProjector, TensorSketchProjector

FORMAT_VERSION = 2   # 2: every engine layer captured, `projector` recorded (1: Linear/Conv2d, Kronecker only)
CAPTURE_PROJECTORS = ("tensorsketch", "factorized")   # GradientCapture(projector=...); "factorized" = Kronecker
_SKETCH_TO_KIND = {"tensor": "tensorsketch", "kronecker": "factorized"}
# capture.json "projection" of a capture that kept snapshot windows for TRAK: every window's rows have their own seed
PER_WINDOW = "one seed per snapshot window"


def capture_accept(layer: Layer) -> bool:
    """Layers whose per-example gradient can be read inside a training step: every engine kind except BatchNorm,
    which normalizes with batch statistics in train mode (its parameters are listed as skipped)."""
    return not (layer.kind == "norm" and isinstance(layer.module, nn.modules.batchnorm._BatchNorm))


def make_capture_projector(projector: str, module: nn.Module, output_fn: Callable | None, param_names: list[str] | None,
                           proj_dim: int, seed: int, allocation: str = "equal", kind: str = "rademacher"
                           ) -> HookedProjector:
    """The projector of a capture: `TensorSketchProjector` ("tensorsketch") or `KroneckerProjector` ("factorized"),
    over the engine's layers that `capture_accept` keeps."""
    if projector == "tensorsketch":
        return TensorSketchProjector(module, output_fn, param_names, proj_dim, seed, None, capture_accept, kind)
    if projector in ("factorized", "kronecker"):
        return KroneckerProjector(module, output_fn, param_names, proj_dim, seed, allocation, kind, None,
                                  capture_accept)
    raise ValueError(f"projector must be one of {CAPTURE_PROJECTORS}, got {projector!r}")


def projector_kind(proj: HookedProjector) -> str:
    """"tensorsketch" | "factorized": the `projector=` name of a capture projector (from its layout)."""
    return _SKETCH_TO_KIND[proj.layout["sketch"]]
# per row; "ratio" and "q" (NaN unless the capture keeps snapshot windows for TRAK, `core/windows.py`): the
# loss-to-margin ratio c of the row's output gradient and the task's Q at that step's output
META_FIELDS = (("step", np.int64), ("epoch", np.int64), ("batch_idx", np.int64), ("lr", np.float64), ("ids", np.int64),
               ("ratio", np.float64), ("q", np.float64))


def chunk_features_path(meta_path: Path) -> Path:
    return meta_path.with_name(meta_path.name[:-len(".meta.npz")] + ".npy")


def write_chunk(rank_dir: Path, index: int, features: torch.Tensor, meta: dict, event: Any) -> None:
    """Writer thread: features first, then the metadata (whose presence marks the chunk complete)."""
    if event is not None:
        event.synchronize()
    name = f"chunk-{index:06d}"
    atomic_save_npy(rank_dir / f"{name}.npy", features.numpy())
    buf = io.BytesIO()
    np.savez(buf, **meta)
    atomic_write_bytes(rank_dir / f"{name}.meta.npz", buf.getvalue())


def runs(*keys: np.ndarray) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of consecutive rows where every key is constant."""
    n = len(keys[0])
    if not n:
        return
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    yield from zip(starts.tolist(), [*starts[1:].tolist(), n])


def load_capture_settings(capture_dir: str | os.PathLike) -> dict:
    """The `capture.json` of a `GradientCapture(out_dir=capture_dir)` run."""
    path = Path(capture_dir) / "capture.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the out_dir of a GradientCapture(out_dir=...) run")
    return json.loads(path.read_text())


def _one_projection(settings: dict, capture_dir) -> dict:
    """The settings of a capture whose rows all share one projection; a per-window capture is refused."""
    if settings.get("projection") == PER_WINDOW:
        raise ValueError(f"the capture in {capture_dir} kept snapshot windows for TRAK, so its rows change projection "
                         "at every snapshot: capture_projector / tracin_from_capture cannot score it. Capture TracIn "
                         "rows without an AttributionCallback computing TRAK on the Trainer (or with "
                         "train_features='post-hoc')")
    return settings


def _chunk_metas(capture_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete chunks' per-row metadata, rank by rank in capture order, with the features' `path`."""
    root = Path(capture_dir)
    load_capture_settings(root)
    out = []
    for rank_dir in sorted(p for p in root.glob("rank-*") if p.is_dir()):
        for meta_path in sorted(rank_dir.glob("chunk-*.meta.npz")):
            with np.load(meta_path) as m:
                item = {k: m[k] for k in m.files}
            item.update(path=chunk_features_path(meta_path), rank_dir=rank_dir.name, index=int(meta_path.name[6:12]))
            out.append(item)
    return out


def read_capture(capture_dir: str | os.PathLike, mmap: bool = True) -> Iterator[dict[str, Any]]:
    """Iterate the complete chunks of a capture, rank by rank, in capture order.

    Each item: rank_dir, index, path, features ((m, proj_dim) float32, memory-mapped by default), and the
    per-row step, epoch, batch_idx, lr, ids arrays.
    """
    for item in _chunk_metas(capture_dir):
        item["features"] = np.load(item["path"], mmap_mode="r" if mmap else None)
        yield item


def capture_projector(capture_dir: str | os.PathLike, module: nn.Module,
                      output: str | OutputFunction | Callable = "loss") -> HookedProjector:
    """The capture's projector (tensor sketch or Kronecker) on `module`, for query features at any weights.

    `module` must be the LightningModule class that was trained (the layer names seed the matrices); the
    layout is checked against the capture's.
    """
    s = _one_projection(load_capture_settings(capture_dir), capture_dir)
    lay = s["layout"]
    proj = make_capture_projector(_SKETCH_TO_KIND[lay.get("sketch", "kronecker")], module, resolve_output(output),
                                  s["param_names"], lay["requested_dim"], lay["seed"], lay["allocation"], lay["kind"])
    if proj.layout_hash != s["layout_hash"]:
        raise ValueError(f"capture_projector: this module's projector layout differs from the capture's in {capture_dir} "
                         "(another model class or layer sizes?)")
    return proj


@dataclass
class CapturedTracIn:
    """In-run TracIn from a capture: `scores[i, q]`, `self_influence[i]` over the captured steps of example i.

    `counts[i]` is how many captured rows example i had (0: never captured); `steps` the steps scored,
    `skipped_steps` those whose query features were None.
    """

    scores: np.ndarray
    self_influence: np.ndarray
    counts: np.ndarray
    steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)


def tracin_from_capture(capture_dir: str | os.PathLike, query_features_fn: Callable[[int], torch.Tensor | None],
                        n_train: int | None = None) -> CapturedTracIn:
    """In-run TracIn: score[i, q] = sum over captured steps t with i in the batch of lr_t * phi_t(z_i) . psi_t(z_q).

    phi_t(z_i) is the captured projected loss gradient of training example i at step t's weights, psi_t(z_q)
    = `query_features_fn(t)`: the (Q, proj_dim) projected loss gradients of the queries at the weights step t
    trained at (e.g. `capture_projector(...).features(query_batch)` after loading those weights), or None to
    skip the step. It is called once per captured step, in increasing step order; features are read step by
    step from memory-mapped chunks (never the whole capture at once). Rows need dataset ids (`ids_fn`).
    Self-influence sums lr_t ||phi_t(z_i)||^2 over every captured step (it needs no query). As TracIn-CP in
    `core.methods.TracIn`, the 1/B of a mean-reduced loss is left out (a constant factor for a fixed batch size).
    """
    settings = _one_projection(load_capture_settings(capture_dir), capture_dir)
    k = int(settings["proj_dim"])
    chunks = _chunk_metas(capture_dir)
    if any((c["ids"] < 0).any() for c in chunks):
        raise ValueError("tracin_from_capture needs dataset ids for every row: capture with "
                         "GradientCapture(ids_fn=lambda batch: <Tensor[B] of dataset indices>)")
    if n_train is None:
        n_train = 1 + max((int(c["ids"].max()) for c in chunks if len(c["ids"])), default=-1)
    segments = sorted(((int(c["step"][lo]), ci, lo, hi) for ci, c in enumerate(chunks)
                       for lo, hi in runs(c["step"])), key=lambda s: (s[0], s[1]))
    self_inf = torch.zeros(n_train, dtype=torch.float64)
    counts = torch.zeros(n_train, dtype=torch.int64)
    scores: torch.Tensor | None = None
    steps, skipped = [], []
    for step, group in itertools.groupby(segments, key=lambda s: s[0]):
        q = query_features_fn(step)
        if q is not None:
            q = torch.as_tensor(q).detach().to("cpu", torch.float64)
            if q.dim() != 2 or q.shape[1] != k:
                raise ValueError(f"query_features_fn({step}) must return (Q, {k}) features, got {tuple(q.shape)}")
            if scores is None:
                scores = torch.zeros(n_train, q.shape[0], dtype=torch.float64)
            steps.append(step)
        else:
            skipped.append(step)
        for _, ci, lo, hi in group:
            c = chunks[ci]
            lr = torch.from_numpy(c["lr"][lo:hi].astype(np.float64))
            if torch.isnan(lr).any():
                raise ValueError(f"tracin_from_capture: step {step} has no learning rate recorded (no optimizer?)")
            ids = torch.from_numpy(c["ids"][lo:hi].astype(np.int64))
            if int(ids.max()) >= n_train:
                raise ValueError(f"tracin_from_capture: id {int(ids.max())} >= n_train={n_train}")
            if "features" not in c:
                c["features"] = np.load(c["path"], mmap_mode="r")
            phi = torch.from_numpy(np.asarray(c["features"][lo:hi], dtype=np.float64))
            self_inf.index_add_(0, ids, lr * (phi * phi).sum(1))
            counts.index_add_(0, ids, torch.ones_like(ids))
            if q is not None:
                scores.index_add_(0, ids, (phi @ q.T) * lr[:, None])
        for c in chunks:  # chunks that end at or before this step are not read again: let their maps go
            if "features" in c and int(c["step"].max()) <= step:
                del c["features"]
    if scores is None:
        scores = torch.zeros(n_train, 0, dtype=torch.float64)
    return CapturedTracIn(scores.numpy(), self_inf.numpy(), counts.numpy(), steps, skipped)


class InRunScores:
    """In-run TracIn accumulated during training, chunk by chunk (queries known before training):
    scores[i, q] += lr_t * phi_t(z_i) . psi_t(z_q) and self_influence[i] += lr_t ||phi_t(z_i)||^2 for every captured
    row (example i at step t), psi_t the queries' projected loss gradients at step t's weights. The products are
    float32 GEMMs added into float64 totals; the same sums as `tracin_from_capture` without snapshots or a re-read."""

    def __init__(self, n_train: int, n_query: int, device: torch.device | str = "cpu"):
        self.n_train, self.n_query = n_train, n_query
        self.scores = torch.zeros(n_train, n_query, dtype=torch.float64, device=device)
        self.self_influence = torch.zeros(n_train, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n_train, dtype=torch.int64, device=device)   # captured rows per example
        self.seen = torch.zeros(n_train, dtype=torch.int64, device=device)     # training batches per example
        self.steps: list[int] = []

    def saw(self, ids: torch.Tensor) -> None:
        """Count one training batch's examples (captured or not): what an uncaptured example's estimate scales by."""
        ids = torch.as_tensor(ids).reshape(-1).to(self.seen.device, torch.int64)
        self.seen.index_add_(0, ids, torch.ones_like(ids))

    def add(self, features: torch.Tensor, meta: dict[str, np.ndarray], queries: dict[int, torch.Tensor]) -> None:
        """Rows of one chunk: `features` (m, k), `meta` its per-row step / lr / ids, `queries` step -> (Q, k)."""
        device = self.scores.device
        ids_all = torch.from_numpy(np.asarray(meta["ids"], dtype=np.int64)).to(device)
        if len(ids_all) and (int(ids_all.min()) < 0 or int(ids_all.max()) >= self.n_train):
            bad = int(ids_all.min()) if int(ids_all.min()) < 0 else int(ids_all.max())
            raise ValueError(f"GradientCapture: a captured row has dataset id {bad}, outside [0, {self.n_train}): "
                             "ids must index the training dataset")
        for lo, hi in runs(meta["step"]):
            step, lr = int(meta["step"][lo]), float(meta["lr"][lo])
            if np.isnan(lr):
                raise ValueError(f"GradientCapture: step {step} has no learning rate recorded (no optimizer?)")
            phi = features[lo:hi].to(device, torch.float32)
            ids = ids_all[lo:hi]
            self.self_influence.index_add_(0, ids, lr * phi.double().pow(2).sum(1))
            self.counts.index_add_(0, ids, torch.ones_like(ids))
            psi = queries[step].to(device, torch.float32)
            self.scores.index_add_(0, ids, (phi @ psi.T).double().mul_(lr))
            if not self.steps or self.steps[-1] != step:
                self.steps.append(step)


class BatchIndexRecorder:
    """Records the dataset indices of every batch a `DataLoader`'s batch sampler yields, in order, so a callback
    learns which examples each training batch holds without changing the user's dataset or `training_step`.

    Installed by swapping the batch sampler's class for a recording subclass that holds the recorder (a DataLoader
    forbids replacing its sampler after construction; a framework that re-instantiates the batch sampler's class,
    as Lightning does to insert a DistributedSampler, keeps recording). Indices are produced in the main process,
    in the order the batches arrive, also with worker processes. `pop()` gives the next batch's indices; a new pass
    over the loader starts a new queue. Must be installed before the loader's iterator is created.
    """

    def __init__(self):
        self.queue: list[list[int]] = []

    @staticmethod
    def installed(loader) -> "BatchIndexRecorder | None":
        """The recorder on `loader`'s batch sampler, if any."""
        return getattr(type(getattr(loader, "batch_sampler", None)), "_attrib_recorder", None)

    def install(self, loader) -> bool:
        """Start recording `loader`'s batches; False when it has no batch sampler (iterable dataset, batch_size=None)."""
        bs = getattr(loader, "batch_sampler", None)
        if bs is None:
            return False
        if getattr(type(bs), "_attrib_recorder", None) is not None:
            type(bs)._attrib_recorder = self
            return True
        base = type(bs)

        def __iter__(sampler):
            rec = type(sampler)._attrib_recorder
            rec.queue.clear()               # a new pass (epoch): leftovers of an interrupted one are stale
            for indices in base.__iter__(sampler):
                rec.queue.append([int(i) for i in indices])
                yield indices

        bs.__class__ = type(base.__name__, (base,), {"__iter__": __iter__, "_attrib_recorder": self,
                                                     "__module__": base.__module__})
        return True

    def pop(self) -> list[int] | None:
        return self.queue.pop(0) if self.queue else None


class QueryFeatures:
    """The queries' projected loss gradients at the module's current weights (eval mode), with the capture's own
    projection (the same matrices, so phi_t(z_i) . psi_t(z_q) is the projected TracIn term)."""

    def __init__(self, capture_proj: HookedProjector, module: nn.Module, dataset: Dataset,
                 collate_fn: Callable | None, batch_size: int, device: torch.device):
        lay = capture_proj.layout
        self.projector = make_capture_projector(projector_kind(capture_proj), module, resolve_output("loss"),
                                                capture_proj.param_names, lay["requested_dim"], lay["seed"],
                                                lay["allocation"], lay["kind"])
        if self.projector.layout_hash != capture_proj.layout_hash:
            raise RuntimeError("GradientCapture: the query projector's layout differs from the capture's")
        # its own generator: iterating a DataLoader draws a base seed from the generator it is given, and the global
        # one would shift the training loader's shuffling (the fit would not be the fit without the capture)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                            generator=torch.Generator())
        self.batches = [move_to(b, device) for b in loader]   # queries are few: collated and moved once
        self.n = len(dataset)
        self.bytes_per_step = self.n * capture_proj.proj_dim * 4

    def with_projector(self, capture_proj: HookedProjector) -> "QueryFeatures":
        """The same queries projected like `capture_proj` (a capture that changed its projection)."""
        new = object.__new__(QueryFeatures)
        new.__dict__.update(self.__dict__)
        lay = capture_proj.layout
        new.projector = make_capture_projector(projector_kind(capture_proj), self.projector.module,
                                               resolve_output("loss"), capture_proj.param_names, lay["requested_dim"],
                                               lay["seed"], lay["allocation"], lay["kind"])
        return new

    def features(self) -> torch.Tensor:
        feats = torch.cat([self.projector.features(b) for b in self.batches])
        if feats.shape[0] != self.n:
            raise ValueError(f"GradientCapture: the query loader gave {feats.shape[0]} examples for a query_dataset "
                             f"of {self.n}: its __len__ and its items disagree")
        return feats

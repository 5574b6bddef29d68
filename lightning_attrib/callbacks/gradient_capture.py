"""`GradientCapture`: Kronecker-projected per-example loss gradients captured inside real training steps.

The training step already runs a batched forward and backward of the loss. Hooks on the factorizable
layers (nn.Linear, nn.Conv2d; see `core.factorized`) project each layer's input in the forward and its
output gradient in the backward, so the projected per-example gradient of every training example in the
batch comes at the cost of a few small matmuls, at the weights of that step (before the optimizer moves
them): exactly what in-run TracIn sums over steps.

With a loss that is the mean of per-example losses, the output gradient the backward sees for example i
is (1/B) d loss_i / d output_i (divided again by `accumulate_grad_batches`, which Lightning applies), so
the captured features are rescaled by B * accumulate_grad_batches (and by 1 / the AMP grad scale when a
GradScaler is active). They then equal `FactorizedProjector(module, "loss" output, ...).features(batch)`
at the same weights for a model without train/eval differences (no dropout, no BatchNorm); with those
layers the captured gradients are of the train-mode loss the optimizer actually used.

Hot path (what a captured step costs). Every scale (layer.scale, B * accumulate_grad_batches, 1 / AMP scale)
is folded into cached factor matrices, so per layer the forward hook does one matmul (P_in^T a) and the
gradient hook one matmul (P_out^T delta), both written with `out=` into preallocated chunk buffers. For a
Linear layer with one position per example the block is the rank-one outer product of those two small
vectors; it is not formed in the step: the whole chunk's outer products are expanded at once (one or two
ops per layer) when the chunk is handed off, on the writer thread on CPU. Conv2d layers (P_in^T of every
patch is a convolution with a (k_in, C_in, kh, kw) kernel, no unfold), Linear layers over positions and a
layer called twice in a step form their block in the step. Nothing is cloned (a tensor hook registered
before an in-place op still receives the gradient of the value it was registered on), nothing is copied
to the host per step (ids stay on the device until the chunk is handed off), and with `out_dir` two chunk
buffers alternate, so no memory is allocated per step (with a fp16 GradScaler, reading its scale syncs the
device once a step). What is left is ~6 thin matmuls and ~6 Python hook calls per step, plus on CPU the
writer thread's expansion and file writes (8 KB per example at proj_dim=2048): +14% training-thread CPU on
a 2.5 ms MLP step at batch 64, +9% on a 14 ms one (`benchmarks/RESULTS.md`, Capture overhead);
`every_n_steps=n` pays it on every n-th step only (+4% at n=4).

On-disk format (`out_dir`): see `core/capture.py` (chunk files per rank, streamed while training runs).
`core.capture.read_capture` iterates the chunks, `capture_projector` rebuilds the projector with the same
matrices, and `tracin_from_capture` turns a capture into in-run TracIn scores:

    cap = GradientCapture(out_dir="capture", every_n_steps=n, ids_fn=lambda batch: batch[2])  # dataset ids
    snaps = CheckpointCapture(dirpath="snaps", every_n_steps=n)   # the weights each captured step trained at
    trainer = L.Trainer(callbacks=[cap, snaps], ...); trainer.fit(model, loader)
    proj = capture_projector("capture", model)                    # the capture's projection matrices
    def query_features(step):
        path = f"snaps/snapshot-step{step:08d}.pt"
        if not os.path.exists(path): return None                  # step 0: CheckpointCapture saves none
        model.load_state_dict(torch.load(path)["state_dict"]); return proj.features(query_batch)
    result = tracin_from_capture("capture", query_features)        # result.scores (n_train, Q)

(`tests/test_gradient_capture.py` checks exactly this against per-example gradients at every step's weights.)
The snapshots are what the query side needs: weights at every captured step. When queries are known before
training (`query_dataset`, by default the validation set), their features are computed inside the run at every
captured step and the scores accumulate during training instead: no snapshots, no ids_fn (the batch sampler's
indices are recorded), a standard result at the end of fit (`result`, `load_results(result_dir)`), and
`AttributionCallback(method="tracin")` on the same Trainer takes it as its result (`captured_tracin`).

Limitations: parameters outside Linear/Conv2d layers (norms, embeddings) cannot be captured this way;
with `params=None` they are left out (listed in `skipped_params`), an explicit `params` selection that
includes them is refused. A layer that runs twice in a step (weight sharing, two forwards) gets the sum of
both calls' terms, as its gradient does; a captured step must run one backward (on_after_backward closes it).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from torch.utils.data import DataLoader, Dataset

from ..core.batches import move_to
from ..core.capture import (FORMAT_VERSION, META_FIELDS, BatchIndexRecorder, InRunScores, chunk_features_path,
                            read_capture, runs, write_chunk)
from ..core.factorized import ALLOCATIONS, FactorizedProjector, LayerPlan
from ..core.gradients import select_parameters
from ..core.outputs import resolve_output

PENDING_QUERY_BYTES = 256 << 20
MAX_INRUN_BYTES = 4 << 30          # the in-run train x query matrix beyond this is refused before training   # query features of captured steps not yet scored: a chunk is emitted beyond this


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL = _NullContext()


def _no_autocast(device: torch.device) -> Any:
    """Autocast off for the projections when the training forward runs under it (AMP); else a no-op context."""
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) else _NULL


class _Layer:
    """One hooked layer: where its block goes in a feature row, and what happened to it in this step."""

    __slots__ = ("plan", "module", "index", "start", "full", "rem", "factorable", "calls", "fired", "vec", "grad_hook")

    def __init__(self, plan: LayerPlan, module: nn.Module, index: int, start: int):
        self.plan, self.module, self.index, self.start = plan, module, index, start
        self.full, self.rem = divmod(plan.dim, plan.k_in)   # dim = full rows of k_in + a partial row of rem
        self.factorable = plan.kind == "linear"              # one position per example: a rank-one block
        self.calls = self.fired = 0
        self.vec = False
        self.grad_hook: Callable | None = None

    def expand(self, features: torch.Tensor, d: torch.Tensor, a: torch.Tensor) -> None:
        """features[:, block] = vec(d_i a_i^T)[:dim] for rows of d (n, k_out) and a (n, k_in), in place."""
        n, start, full, rem, k_in = d.shape[0], self.start, self.full, self.rem, self.plan.k_in
        torch.mul(d[:, :full, None], a[:, None, :], out=features[:, start:start + full * k_in].view(n, full, k_in))
        if rem:
            torch.mul(d[:, full:full + 1], a[:, :rem], out=features[:, start + full * k_in:start + self.plan.dim])


class _Chunk:
    """Preallocated rows: features, the rank-one factors of Linear layers (expanded per chunk, off the hot
    path), which rows hold such factors, and the per-row metadata."""

    def __init__(self, cap: int, proj_dim: int, layers: list[_Layer], dtype: torch.dtype, device: torch.device):
        self.cap, self.dtype, self.device, self.rows = cap, dtype, device, 0
        self.features = torch.empty(cap, proj_dim, dtype=torch.float32, device=device)
        self.a: list[torch.Tensor | None] = []
        self.d: list[torch.Tensor | None] = []
        for lay in layers:
            fac = lay.factorable
            self.a.append(torch.empty(cap, lay.plan.k_in, dtype=dtype, device=device) if fac else None)
            self.d.append(torch.empty(cap, lay.plan.k_out, dtype=dtype, device=device) if fac else None)
            if fac and lay.plan.in_identity and lay.plan.has_bias:
                self.a[-1][:, -1] = 1.0   # the bias's input column of ones (the scale sits on the out side)
        self.factored = np.zeros((len(layers), cap), dtype=bool)
        self.meta = {k: np.empty(cap, dtype=t) for k, t in META_FIELDS if k != "ids"}
        self.ids = torch.full((cap,), -1, dtype=torch.int64, device=device)  # on the device: no per-step sync
        self.future: Future | None = None

    def expand(self, layers: list[_Layer], release: bool = False) -> torch.Tensor:
        """Write the factored rows' outer products into `features` (one or two ops per layer); return the rows."""
        rows = self.rows
        for lay in layers:
            if self.a[lay.index] is None:
                continue
            for lo, hi in runs(self.factored[lay.index, :rows]):
                if self.factored[lay.index, lo]:
                    lay.expand(self.features[lo:hi], self.d[lay.index][lo:hi], self.a[lay.index][lo:hi])
        if release:  # kept in memory: the factors are not needed any more
            self.a = [None] * len(self.a)
            self.d = [None] * len(self.d)
        return self.features[:rows]

    def reset(self) -> None:
        self.rows = 0
        self.ids.fill_(-1)

    def row_meta(self) -> dict[str, np.ndarray]:
        """Copies of the filled rows' metadata (ids copied off the device here, once per chunk)."""
        meta = {k: v[:self.rows].copy() for k, v in self.meta.items()}
        meta["ids"] = self.ids[:self.rows].cpu().numpy().copy()
        return meta


class GradientCapture(Callback):
    """Projected per-example loss gradients of training batches, (B, proj_dim) float32, captured in the steps.

    Args:
        proj_dim, seed, allocation: the factorized projection (same meaning, and the same matrices, as
            `FactorizedProjector` / `Attributor(projector="factorized")` with the same parameter selection).
        params: parameter names/prefixes/predicate to capture (default: every trainable Linear/Conv2d
            weight and bias of the LightningModule).
        every_n_steps: capture the batches of every n-th optimizer step (1: every batch). The capture
            cost is paid on captured steps only, so n divides the overhead by about n; in-run TracIn then
            sums over every n-th step (multiply by n for an estimate of the full sum).
        ids_fn: optional `batch -> Tensor[B]` of dataset indices, stored with each row (needed by
            `tracin_from_capture`, and under DDP, where batch_idx does not name examples).
        reduction: "mean" (default) or "sum": how the training loss reduces per-example losses.
        out_dir: stream the rows to chunk files under this folder while training (see the module
            docstring for the format; each DDP rank writes its own folder). None keeps them in memory
            (`records`), which suits short runs only: 8 KB per example at proj_dim=2048.
        chunk_size: rows per chunk (buffer and file). Two chunk buffers of chunk_size x proj_dim float32
            are preallocated on the module's device (64 MB at the defaults).
        query_dataset: queries known before training: "val" (default: the first validation dataset, if the
            fit has one), a map-style dataset, or None. At every captured step the queries' projected loss
            gradients are computed at that step's weights (eval mode, before the optimizer step) and the in-run
            TracIn scores sum_t lr_t phi_t(z_i) . psi_t(z_q) accumulate during training: no snapshots, no second
            pass. The result is written at the end of fit (`load_results(result_dir)`) and kept in `result`.
        query_batch_size: batch size of the query pass.
        result_dir: where the in-run TracIn result goes (default `<trainer.default_root_dir>/inrun_tracin`).

    Dataset ids: without `ids_fn`, the callback records the indices the training DataLoader's batch sampler
    yields (`core.capture.BatchIndexRecorder`), so rows carry ids without changing the dataset or `training_step`.
    """

    def __init__(self, proj_dim: int = 2048, seed: int = 0, allocation: str = "equal",
                 params: None | Sequence[str] | Callable = None, every_n_steps: int = 1,
                 ids_fn: Callable[[Any], torch.Tensor] | None = None, reduction: str = "mean",
                 out_dir: str | os.PathLike | None = None, chunk_size: int = 4096,
                 query_dataset: Dataset | str | None = "val", query_batch_size: int = 256,
                 result_dir: str | os.PathLike | None = None):
        super().__init__()
        for name, val in (("proj_dim", proj_dim), ("every_n_steps", every_n_steps), ("chunk_size", chunk_size),
                          ("query_batch_size", query_batch_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if ids_fn is not None and not callable(ids_fn):
            raise TypeError(f"ids_fn must be a callable batch -> Tensor[B] of dataset indices, got {type(ids_fn).__name__}")
        self.proj_dim, self.seed, self.allocation = proj_dim, seed, allocation
        self.params, self.every_n_steps, self.ids_fn, self.reduction = params, every_n_steps, ids_fn, reduction
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.chunk_size = chunk_size
        if not (query_dataset is None or query_dataset == "val" or hasattr(query_dataset, "__len__")):
            raise TypeError(f"query_dataset must be 'val', None or a map-style dataset with __len__, got "
                            f"{type(query_dataset).__name__}")
        self.query_dataset, self.query_batch_size = query_dataset, query_batch_size
        self.result_dir = Path(result_dir) if result_dir is not None else None
        self.result = None
        self._queries: _QueryPass | None = None
        self._inrun: InRunScores | None = None
        self._recorder: BatchIndexRecorder | None = None
        self._n_train: int | None = None
        self._resume_inrun: dict | None = None
        self.query_source: Dataset | None = None   # the query dataset the in-run scores are against
        self.projector: FactorizedProjector | None = None
        self.param_names: list[str] = []
        self.skipped_params: list[str] = []
        self.rank_dir: Path | None = None
        self._layers: list[_Layer] = []
        self._handles: list = []
        self._trainer: L.Trainer | None = None
        self._resume_step: int | None = None
        self._owns_rank_dir = False
        self._kept: list[Any] = []   # memory mode: finished chunks (CPU `_Chunk`s, or (features, meta) copies)
        self._writer: ThreadPoolExecutor | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._active = False
        self._n: int | None = None
        self._r0 = 0
        self._chunk: _Chunk | None = None     # the chunk being filled
        self._spare: _Chunk | None = None     # out_dir on CPU: the one the writer thread may still be reading
        self._host: list[torch.Tensor | None] = [None, None]  # out_dir on GPU: pinned copies for the writer
        self._host_futures: list[Future | None] = [None, None]
        self._cur = 0
        self._next_chunk = 0
        self._factors: dict[tuple, list[tuple]] = {}
        self._f: list[tuple] = []
        self._scale: tuple | None = None
        self._dtype = torch.float32
        self._no_autocast: Any = _NULL
        self._base_scale = 1.0
        self._scaler = None
        self._group: dict | None = None
        self._row_meta: tuple = ()
        self._ids: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}   # step -> query features, until that step's chunk is scored

    @property
    def state_key(self) -> str:
        return self._generate_state_key(out_dir=str(self.out_dir) if self.out_dir else None, every_n_steps=self.every_n_steps)

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and self.ids_fn is None:
            record_train_batch_indices(trainer)
        if self.projector is None:
            self._build_projector(pl_module)
        if self.out_dir is not None and stage == "fit":
            from ..core.store import ensure_writable_dir

            # each rank probes only its own folder (ranks probing one shared folder would race on the probe file)
            self.rank_dir = ensure_writable_dir(self.out_dir / f"rank-{trainer.global_rank:05d}", "GradientCapture(out_dir)")
            settings = self.settings(trainer.world_size)
            path = self.out_dir / "capture.json"
            if path.exists():
                old = json.loads(path.read_text())
                if old.get("layout_hash") != settings["layout_hash"]:
                    raise ValueError(
                        f"GradientCapture: {self.out_dir} holds a capture with another projector layout "
                        f"(proj_dim, seed, allocation or layers differ). Use a new out_dir or delete that one."
                    )
            if trainer.is_global_zero:
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                tmp.write_text(json.dumps(settings, indent=2))
                os.replace(tmp, path)

    def _build_projector(self, pl_module: L.LightningModule) -> None:
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
        modules, start = dict(pl_module.named_modules()), 0
        self._layers = []
        for plan in probe.layers:
            if plan.dim:
                self._layers.append(_Layer(plan, modules[plan.name], len(self._layers), start))
            start += plan.dim
        for lay in self._layers:
            lay.grad_hook = self._make_grad_hook(lay)

    def settings(self, world_size: int = 1) -> dict:
        """What the captured features depend on besides the weights (written to `capture.json`)."""
        return {"format": "lightning-attrib-gradient-capture", "version": FORMAT_VERSION,
                "layout": self.projector.layout, "layout_hash": self.projector.layout_hash,
                "param_names": self.param_names, "skipped_params": self.skipped_params,
                "proj_dim": self.projector.proj_dim, "every_n_steps": self.every_n_steps,
                "reduction": self.reduction, "output": "loss", "world_size": int(world_size),
                "chunk_size": self.chunk_size}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_run_state()
        self._group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else None
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if self.out_dir is not None:
            self._prepare_rank_dir()
        # the writer thread's torch ops (the chunk expansion) run on one intra-op thread: the training keeps the rest
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="GradientCapture",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self._setup_ids_and_queries(trainer, pl_module)
        if self.every_n_steps == 1:  # every step is captured: keep the hooks for the whole fit
            self._add_hooks()

    def _setup_ids_and_queries(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the training batches' dataset indices (no `ids_fn`), and prepare the query pass (`query_dataset`)."""
        loader = _first_loader(trainer.train_dataloader)
        dataset = getattr(loader, "dataset", None)
        self._n_train = len(dataset) if hasattr(dataset, "__len__") else None
        self._recorder = BatchIndexRecorder.installed(loader) if self.ids_fn is None else None
        queries, collate = self.query_dataset, None
        if queries == "val":
            val = _first_loader(trainer.val_dataloaders)
            source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
            if val is None and source is not None and source.is_defined():   # not set up yet (no sanity check)
                requested = source.dataloader()
                val = _first_loader(getattr(requested, "iterables", requested))
            queries, collate = (val.dataset, val.collate_fn) if val is not None and hasattr(val, "dataset") else (None, None)
        self._queries = self._inrun = None
        if queries is None:
            return
        if self.ids_fn is None and self._recorder is None:
            raise ValueError("GradientCapture(query_dataset=...) needs the dataset index of every training example: "
                             "this train DataLoader has no batch sampler to record them from; pass ids_fn=")
        if self._n_train is None:
            raise ValueError("GradientCapture(query_dataset=...) needs a training dataset with __len__")
        need = self._n_train * len(queries) * 8
        if need > MAX_INRUN_BYTES:
            raise ValueError(f"GradientCapture(query_dataset={'val' if self.query_dataset == 'val' else '...'}): the "
                             f"in-run score matrix ({self._n_train} x {len(queries)} float64) would take "
                             f"{need / 2**30:.1f} GiB; pass a smaller query_dataset, or query_dataset=None to capture "
                             "features only")
        device = pl_module.device
        self._queries = _QueryPass(self.projector, pl_module, queries, collate, self.query_batch_size, device)
        self._inrun = InRunScores(self._n_train, len(queries), device)
        self.query_source = queries
        saved, self._resume_inrun = self._resume_inrun, None
        if saved is not None:
            if tuple(saved["scores"].shape) != tuple(self._inrun.scores.shape):
                raise ValueError(f"GradientCapture: the checkpoint's in-run scores are {tuple(saved['scores'].shape)}"
                                 f" (train x query), this fit's {tuple(self._inrun.scores.shape)}: resume with the "
                                 "same training and query sets")
            if trainer.is_global_zero:   # the totals were summed over ranks: one rank carries them on
                for name in ("scores", "self_influence", "counts", "seen"):
                    getattr(self._inrun, name).copy_(saved[name])
                self._inrun.steps = list(saved["steps"])

    def _prepare_rank_dir(self) -> None:
        """Number new chunks after the existing ones; on resume, drop chunks written after the checkpoint."""
        existing = sorted(self.rank_dir.glob("chunk-*.meta.npz"))
        if existing and self._resume_step is None and not self._owns_rank_dir:
            raise ValueError(
                f"GradientCapture: {self.rank_dir} already holds captured chunks. Use a new out_dir, delete it, "
                "or resume the fit from a checkpoint that contains this callback's state."
            )
        if self._resume_step is not None:
            for path in existing:
                with np.load(path) as meta:
                    stale = len(meta["step"]) and int(meta["step"].max()) >= self._resume_step
                if stale:
                    chunk_features_path(path).unlink(missing_ok=True)
                    path.unlink()
        for tmp in self.rank_dir.glob("*.tmp*"):
            tmp.unlink()
        for feats in self.rank_dir.glob("chunk-*.npy"):   # features whose metadata never got written
            if not feats.with_name(feats.name[:-len(".npy")] + ".meta.npz").exists():
                feats.unlink()
        left = sorted(self.rank_dir.glob("chunk-*.meta.npz"))
        self._next_chunk = int(left[-1].name[6:12]) + 1 if left else 0
        self._owns_rank_dir, self._resume_step = True, None

    # -- hooks on the training step -------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        recorded = self._recorder.pop() if self._recorder is not None else None   # every batch: keeps the queue aligned
        if self._inrun is not None:
            ids = self.ids_fn(batch) if self.ids_fn is not None else recorded
            if ids is not None:
                self._inrun.saw(torch.as_tensor(ids))
        if step % self.every_n_steps:
            return
        if self._queries is not None and step not in self._pending:   # once per step (gradient accumulation)
            if len(self._pending) * self._queries.bytes_per_step >= PENDING_QUERY_BYTES:
                self._emit()   # score the rows captured so far and let their steps' query features go
            self._pending[step] = self._queries.features()
        if not self._handles:
            self._add_hooks()
        scale = float(trainer.accumulate_grad_batches)
        if self._scaler is not None:
            scale /= float(self._scaler.get_scale())
        lr = self._group["lr"] if self._group is not None else float("nan")
        self._base_scale = scale
        self._row_meta = (step, trainer.current_epoch, batch_idx, float(lr))
        self._ids = self.ids_fn(batch) if self.ids_fn is not None else (
            torch.tensor(recorded, dtype=torch.int64) if recorded is not None else None)
        self._n = None
        self._active = True

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        if self.every_n_steps > 1:
            self._remove_hooks()
        n = self._n
        if n is None:  # no hooked layer ran in this step's forward
            return
        ch, r0 = self._chunk, self._r0
        r1 = r0 + n
        for lay in self._layers:
            factored = lay.vec and lay.calls == 1 and lay.fired == 1
            if not lay.fired:  # not on the loss's path (or never called): its gradient is zero
                ch.features[r0:r1, lay.start:lay.start + lay.plan.dim].zero_()
            if lay.factorable:
                ch.factored[lay.index, r0:r1] = factored
            lay.calls = lay.fired = 0
            lay.vec = False
        meta = ch.meta
        step, epoch, batch_idx, lr = self._row_meta
        meta["step"][r0:r1] = step
        meta["epoch"][r0:r1] = epoch
        meta["batch_idx"][r0:r1] = batch_idx
        meta["lr"][r0:r1] = lr
        if self._ids is not None:
            ids = torch.as_tensor(self._ids).detach().reshape(-1)
            if ids.numel() != n:
                raise ValueError(f"GradientCapture: ids_fn returned {ids.numel()} ids for a batch of {n} examples")
            ch.ids[r0:r1].copy_(ids, non_blocking=True)
        ch.rows = r1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._active:  # a step without backward (skipped, or no loss): no rows, no hooks left behind
            self._active = False
            for lay in self._layers:
                lay.calls = lay.fired = 0
                lay.vec = False
            if self.every_n_steps > 1:
                self._remove_hooks()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.out_dir is not None and self._chunk is not None:  # everything up to the checkpoint is on disk
            self._emit()
            self._wait()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()
        if self._inrun is not None:
            self._write_result(trainer)

    def _write_result(self, trainer: L.Trainer) -> None:
        """The in-run TracIn result (summed over ranks), as a standard result: `load_results(result_dir)`."""
        from ..core.results import write_result

        inrun, strategy = self._inrun, trainer.strategy
        self.seen = strategy.reduce(inrun.seen, reduce_op="sum").cpu()
        self.captured_counts = strategy.reduce(inrun.counts, reduce_op="sum").cpu()
        self.last_lr = float(self._group["lr"]) if self._group is not None else None
        scores = strategy.reduce(inrun.scores, reduce_op="sum")
        self_inf = strategy.reduce(inrun.self_influence, reduce_op="sum")
        counts = strategy.reduce(inrun.counts, reduce_op="sum")
        out = self.result_dir or Path(trainer.default_root_dir) / "inrun_tracin"
        if trainer.is_global_zero:
            never = counts == 0
            self_inf = torch.where(never, torch.full_like(self_inf, float("nan")), self_inf)
            manifest = {
                "method": "tracin", "variant": "in-run: GradientCapture(query_dataset=...), queries featurized at "
                "every captured step; self-influence NaN for examples never in a captured batch",
                "output": "loss", "projector": "factorized",
                "proj_dim": self.projector.proj_dim, "seed": self.seed, "n_train": inrun.n_train,
                "n_query": inrun.n_query, "every_n_steps": self.every_n_steps, "captured_steps": len(inrun.steps),
                "never_captured": int(never.sum()), "lr": "recorded at every captured step",
                "world_size": trainer.world_size, "constant_self_influence": False, "self_influence_computed": True,
                "excluded": {"train": never.nonzero().flatten().tolist(), "query": []},  # no captured step: no score
                "params": self.param_names if len(self.param_names) <= 64 else f"{len(self.param_names)} tensors",
                "sign": "positive = the training example helps the query (lowers its loss)",
            }
            self.result = write_result(out, manifest=manifest, scores=scores.cpu().numpy(),
                                       self_influence=self_inf.cpu().numpy(), train_ids=np.arange(inrun.n_train),
                                       query_ids=np.arange(inrun.n_query))
        strategy.barrier("GradientCapture.result")
        if not trainer.is_global_zero:
            from ..core.results import load_results

            self.result = load_results(out)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._finish()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._finish()

    def _finish(self) -> None:
        self._remove_hooks()
        self._active = False
        try:
            self._emit()
            self._wait()
            self._pending.clear()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    # -- resumption ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The global step; with queries also the in-run totals so far, summed over ranks (every captured row up
        to the checkpoint is scored first), so a resumed fit continues them instead of starting from zero."""
        step = int(self._trainer.global_step) if self._trainer is not None else None
        state = {"out_dir": str(self.out_dir) if self.out_dir else None, "global_step": step}
        if self._inrun is not None and self._trainer is not None:
            self._emit()
            self._wait()
            inrun, strategy = self._inrun, self._trainer.strategy
            state["inrun"] = {name: strategy.reduce(getattr(inrun, name).clone(), reduce_op="sum").cpu()
                              for name in ("scores", "self_influence", "counts", "seen")}
            state["inrun"]["steps"] = list(inrun.steps)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed fit drops the chunks its ranks wrote after the checkpoint (steps >= its global step) and
        continues the in-run totals of the checkpoint."""
        step = state_dict.get("global_step")
        self._resume_step = int(step) if step is not None else None
        self._resume_inrun = state_dict.get("inrun")

    # -- the hot path -------------------------------------------------------------------------------------
    def _add_hooks(self) -> None:
        self._handles = [lay.module.register_forward_hook(self._make_forward_hook(lay)) for lay in self._layers]

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_forward_hook(self, lay: _Layer) -> Callable:
        i, has_bias, mod = lay.index, lay.plan.has_bias, lay.module
        if lay.plan.kind == "conv2d":  # P_in^T [patch; 1] at every output position is a convolution
            padding = 0 if mod.padding == "valid" else mod.padding
            stride, dilation = mod.stride, mod.dilation

            def conv_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                if not self._active or not output.requires_grad:
                    return
                a = inputs[0].detach()
                if self._n is None:
                    self._begin(a)
                weight, bias = self._f[i][0], self._f[i][1]
                lay.calls += 1
                with self._no_autocast:  # projected in float32 (or float64), also inside an AMP forward
                    a_proj = F.conv2d(a.to(weight.dtype), weight, bias, stride, padding, dilation).flatten(2)  # (B, k_in, T)
                output.register_hook(partial(lay.grad_hook, a_proj))
            return conv_hook

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not self._active or not output.requires_grad:
                return
            a = inputs[0].detach()
            if self._n is None:
                self._begin(a)
            if a.dim() != 2:
                a = a.reshape(a.shape[0], -1, a.shape[-1])       # (B, T, d_in)
                if a.shape[1] == 1:
                    a = a[:, 0]
            if a.dtype != self._dtype:
                a = a.to(self._dtype)
            in_w, in_b = self._f[i][0], self._f[i][1]
            lay.calls += 1
            with self._no_autocast:
                if a.dim() == 2 and lay.calls == 1:   # one position: keep P_in^T a in the chunk, expand later
                    lay.vec = True
                    a_proj = self._chunk.a[i][self._r0:self._r0 + a.shape[0]]
                    if in_w is None:
                        a_proj[:, :a.shape[1]].copy_(a)
                    elif in_b is None:
                        torch.mm(a, in_w, out=a_proj)
                    else:
                        torch.addmm(in_b, a, in_w, out=a_proj)
                elif in_w is None:
                    a_proj = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if has_bias else a
                elif in_b is None:
                    a_proj = a @ in_w
                else:
                    a_proj = (a @ in_w).add_(in_b)
            output.register_hook(partial(lay.grad_hook, a_proj))  # this call's input (a layer may run twice)
        return hook

    def _make_grad_hook(self, lay: _Layer) -> Callable:
        i, conv, start, dim = lay.index, lay.plan.kind == "conv2d", lay.start, lay.plan.dim

        def hook(a: torch.Tensor, g: torch.Tensor) -> None:
            if not self._active:
                return
            d = g.detach()
            if d.dtype != a.dtype:
                d = d.to(a.dtype)
            out_m, post = self._f[i][2], self._f[i][3]
            n, r0 = d.shape[0], self._r0
            if conv:                                      # d (B, C_out, T), a (B, k_in, T): sum over positions
                d = d.flatten(2)
                if out_m is not None:
                    d = torch.matmul(out_m, d)              # out_m is P_out^T here: (B, k_out, T)
                blk = torch.bmm(d, a.transpose(1, 2))
            else:
                if a.dim() == 3:
                    d = d.reshape(n, -1, d.shape[-1])
                elif d.dim() != 2:
                    d = d.reshape(n, d.shape[-1])
                if lay.vec and lay.calls == 1:          # rank one: keep P_out^T delta next to P_in^T a
                    dst = self._chunk.d[i][r0:r0 + n]
                    if out_m is not None:
                        torch.mm(d, out_m, out=dst)
                    elif post != 1.0:
                        torch.mul(d, post, out=dst)
                    else:
                        dst.copy_(d)
                    lay.fired += 1
                    return
                if out_m is not None:
                    d = d @ out_m
                elif post != 1.0:
                    d = d * post
                blk = (d[:, :, None] * a[:, None, :]) if a.dim() == 2 else torch.bmm(d.transpose(1, 2), a)
            view = self._chunk.features[r0:r0 + n, start:start + dim]  # positions, or a layer called again: summed
            blk = blk.reshape(n, -1)[:, :dim]
            view.add_(blk) if lay.fired else view.copy_(blk)
            lay.fired += 1
        return hook

    def _begin(self, a: torch.Tensor) -> None:
        """First hooked layer of a captured batch: reserve rows, pick the factors with this batch's scale."""
        n = int(a.shape[0])
        scale = self._base_scale * (n if self.reduction == "mean" else 1)
        dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
        key = (scale, dtype, a.device)
        if key != self._scale:
            if key not in self._factors:
                self._factors[key] = self._scaled_factors(scale, dtype, a.device)
            self._f, self._scale, self._dtype = self._factors[key], key, dtype
        ch = self._chunk
        if ch is None or ch.rows + n > ch.cap or ch.dtype != dtype or ch.device != a.device:
            self._emit()
            self._next_buffer(max(self.chunk_size, n), dtype, a.device)
        self._r0 = self._chunk.rows
        self._n = n
        self._no_autocast = _no_autocast(a.device)

    def _scaled_factors(self, scale: float, dtype: torch.dtype, device: torch.device) -> list[tuple]:
        """Per layer (in_w, in_b, out_m, post): the factors with layer.scale * `scale` folded into one side.

        Linear: in_w (d_in, k_in) and in_b (k_in,) split off the bias row of P_in (None for an identity side);
        out_m = P_out; `post` multiplies the delta when both sides are identities. Conv2d: in_w, in_b are
        the weight (k_in, C_in, kh, kw) and bias of the convolution that computes P_in^T [patch; 1]
        (an identity P_in included, so that the convolution also does the unfolding), out_m = P_out^T.
        """
        out = []
        for lay in self._layers:
            plan, s = lay.plan, lay.plan.scale * scale
            p_in = self.projector.factor(plan, "in", dtype, device)
            p_out = self.projector.factor(plan, "out", dtype, device)
            in_w = in_b = None
            post = 1.0
            if plan.kind == "conv2d":
                if p_in is None:
                    p_in = torch.eye(plan.d_in, dtype=dtype, device=device)
                p_in = p_in * s
                w = p_in[:-1] if plan.has_bias else p_in
                mod = lay.module
                in_w = w.T.reshape(plan.k_in, mod.in_channels, *mod.kernel_size).contiguous()
                in_b = p_in[-1].contiguous() if plan.has_bias else None
                out.append((in_w, in_b, p_out.T.contiguous() if p_out is not None else None, 1.0))
                continue
            if p_in is not None:
                p_in = p_in * s
                in_w, in_b = (p_in[:-1].contiguous(), p_in[-1].contiguous()) if plan.has_bias else (p_in, None)
            elif p_out is not None:
                p_out = p_out * s
            else:
                post = s
            out.append((in_w, in_b, p_out, post))
        return out

    # -- chunks ------------------------------------------------------------------------------------------
    def _next_buffer(self, cap: int, dtype: torch.dtype, device: torch.device) -> None:
        """A chunk to fill: the spare one once the writer thread is done with it, else a new one."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.future is not None:
            spare.future.result()
            spare.future = None
        if spare is None or spare.cap < cap or spare.dtype != dtype or spare.device != device:
            spare = _Chunk(cap, self.projector.proj_dim, self._layers, dtype, device)
        spare.reset()
        self._chunk = spare

    def _emit(self) -> None:
        """Hand the filled rows of the current chunk on: to the writer thread (out_dir) or to `records`.

        On CPU the writer thread also expands the factored rows (torch releases the GIL), so the training
        thread only swaps buffers; on a GPU the expansion is queued on the device and the rows copied once.
        """
        ch = self._chunk
        if ch is None or not ch.rows:
            return
        rows, cpu = ch.rows, ch.device.type == "cpu"
        self._chunk = None
        score = None
        if self._inrun is not None:   # the in-run scores of this chunk's rows, against their steps' queries
            meta = ch.row_meta()
            queries = {int(t): self._pending.pop(int(t)) for t in np.unique(meta["step"])}
            score = partial(self._inrun.add, meta=meta, queries=queries)
        if self.out_dir is None:
            if cpu:
                ch.future = self._writer.submit(_expand_and_score, ch, self._layers, score)
                self._kept.append(ch)
            else:
                feats = ch.expand(self._layers)
                if score is not None:
                    score(feats)
                self._kept.append((feats.cpu(), ch.row_meta()))
                self._spare = ch
            return
        index = self._next_chunk
        self._next_chunk += 1
        meta = ch.row_meta()
        if cpu:
            ch.future = self._writer.submit(_expand_and_write, ch, self._layers, self.rank_dir, index, meta, score)
            self._spare = ch
            return
        feats = ch.expand(self._layers)
        if score is not None:
            score(feats)
        cur = self._cur
        if self._host_futures[cur] is not None:
            self._host_futures[cur].result()
            self._host_futures[cur] = None
        if self._host[cur] is None or self._host[cur].shape[0] < rows:
            self._host[cur] = torch.empty(ch.features.shape, dtype=torch.float32, pin_memory=torch.cuda.is_available())
        host = self._host[cur][:rows]
        host.copy_(feats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._host_futures[cur] = self._writer.submit(write_chunk, self.rank_dir, index, host, meta, event)
        self._cur = cur ^ 1
        self._spare = ch   # later kernels on the same stream run after the copy: safe to refill

    def _wait(self) -> None:
        """Wait for the writer thread's pending work; re-raise its errors here."""
        for i, fut in enumerate(self._host_futures):
            if fut is not None:
                self._host_futures[i] = None
                fut.result()
        if self._spare is not None and self._spare.future is not None:
            fut, self._spare.future = self._spare.future, None
            fut.result()
        for ch in self._kept:
            if isinstance(ch, _Chunk) and ch.future is not None:
                fut, ch.future = ch.future, None
                fut.result()

    # -- results ---------------------------------------------------------------------------------------
    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per captured batch: step, epoch, batch_idx, lr, ids (None without ids_fn), features (B, k).

        In memory (no `out_dir`) this is what was captured on this rank; with `out_dir` it reads this rank's
        chunk files back (all of them into memory: for big captures iterate `read_capture` instead).
        """
        if self.out_dir is None:
            self._wait()
            chunks = [(c.features[:c.rows], c.row_meta()) if isinstance(c, _Chunk) else c for c in self._kept]
            ch = self._chunk
            if ch is not None and ch.rows:   # rows not emitted yet (records read during fit)
                chunks.append((ch.expand(self._layers).clone(), ch.row_meta()))
        else:
            self._wait()
            chunks = [(torch.from_numpy(np.array(c["features"])), c) for c in read_capture(self.out_dir)
                      if self.rank_dir is not None and c["rank_dir"] == self.rank_dir.name]
        out = []
        for feats, meta in chunks:
            for lo, hi in runs(meta["step"], meta["batch_idx"], meta["epoch"]):
                ids = meta["ids"][lo:hi]
                lr = float(meta["lr"][lo])
                out.append({"step": int(meta["step"][lo]), "epoch": int(meta["epoch"][lo]),
                            "batch_idx": int(meta["batch_idx"][lo]), "lr": None if np.isnan(lr) else lr,
                            "ids": None if (ids < 0).all() else torch.from_numpy(ids.copy()),
                            "features": feats[lo:hi]})
        return out


def _expand_and_write(chunk: _Chunk, layers: list[_Layer], rank_dir: Path, index: int, meta: dict,
                      score: Callable | None = None) -> None:
    """Writer thread, CPU: expand the factored rows, score them against the queries (if any), write the chunk."""
    feats = chunk.expand(layers)
    if score is not None:
        score(feats)
    write_chunk(rank_dir, index, feats, meta, None)


def _expand_and_score(chunk: _Chunk, layers: list[_Layer], score: Callable | None) -> torch.Tensor:
    """Writer thread, CPU, in memory: expand the factored rows (releasing the factors), score them if asked."""
    feats = chunk.expand(layers, True)
    if score is not None:
        score(feats)
    return feats


def record_train_batch_indices(trainer: L.Trainer) -> None:
    """Have the fit's training DataLoader record its batches' dataset indices (`BatchIndexRecorder`), from its
    first batch on: the loader is wrapped where the fit loop requests it, before its iterator exists. A loader
    without a batch sampler is left alone (then `ids_fn` is needed)."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or getattr(source, "_attrib_recording", False) or not callable(getattr(source, "dataloader", None)):
        return
    request = source.dataloader

    def dataloader():
        loaders = request()
        first = _first_loader(getattr(loaders, "iterables", loaders))
        if first is not None and BatchIndexRecorder.installed(first) is None:
            BatchIndexRecorder().install(first)
        return loaders

    source.dataloader = dataloader
    source._attrib_recording = True


def _first_loader(loaders: Any):
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


class _QueryPass:
    """The queries' projected loss gradients at the module's current weights (eval mode), with the capture's own
    projection (the same matrices, so phi_t(z_i) . psi_t(z_q) is the projected TracIn term)."""

    def __init__(self, capture_projector: FactorizedProjector, module: nn.Module, dataset: Dataset,
                 collate_fn: Callable | None, batch_size: int, device: torch.device):
        lay = capture_projector.layout
        self.projector = FactorizedProjector(module, resolve_output("loss"), capture_projector.param_names,
                                             proj_dim=lay["requested_dim"], seed=lay["seed"],
                                             allocation=lay["allocation"], kind=lay["kind"])
        if self.projector.layout_hash != capture_projector.layout_hash:
            raise RuntimeError("GradientCapture: the query projector's layout differs from the capture's")
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        self.batches = [move_to(b, device) for b in loader]   # queries are few: collated and moved once
        self.n = len(dataset)
        self.bytes_per_step = self.n * capture_projector.proj_dim * 4

    def features(self) -> torch.Tensor:
        feats = torch.cat([self.projector.features(b) for b in self.batches])
        if feats.shape[0] != self.n:
            raise ValueError(f"GradientCapture: the query loader gave {feats.shape[0]} examples for a query_dataset "
                             f"of {self.n}: its __len__ and its items disagree")
        return feats


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
            query = _QueryPass(cap.projector, pl_module, query_dataset, query_collate, batch_size, device)
            train = _QueryPass(cap.projector, pl_module, torch.utils.data.Subset(train_dataset, missing.tolist()),
                               train_collate, batch_size, device)
            phi, psi = train.features().double().cpu(), query.features().double().cpu()
            weight = torch.from_numpy(seen[missing] * cap.last_lr).double()
            scores[missing] = (weight[:, None] * (phi @ psi.T)).numpy()
            self_inf[missing] = (weight * phi.pow(2).sum(1)).numpy()
        manifest = {**res.manifest, "train_features": "GradientCapture: captured during training (in-run TracIn)",
                    "post_hoc_examples": int(len(missing)), "never_trained_on": int((seen == 0).sum()),
                    "variant": "in-run TracIn from GradientCapture; examples never in a captured batch featurized post "
                               "hoc at the final weights, scaled by how often they were trained on x the last lr"}
        write_result(out_dir, manifest=manifest, scores=scores, self_influence=self_inf,
                     train_ids=res.train_ids, query_ids=res.query_ids)
    trainer.strategy.barrier("captured_tracin")
    return load_results(out_dir)

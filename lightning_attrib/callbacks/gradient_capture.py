"""`GradientCapture`: projected per-example loss gradients captured inside real training steps.

The training step already runs a batched forward and backward of the loss. The layer engine (`core/layers.py`)
records every hookable layer of the step (nn.Linear, nn.Conv1d/2d, nn.Embedding, LayerNorm/GroupNorm affine
parameters, nn.MultiheadAttention's packed in-projection, HF Conv1D) with `recording(on_grad=..., eval_mode=False)`:
the step's own `loss.backward()` hands each layer's per-example factors (A_t, D_t) to this callback, which turns
them into the capture projector's features (`projector="tensorsketch"`: `core.sketch.TensorSketchProjector`,
`"factorized"`: `KroneckerProjector`), at the weights of that step (before the optimizer moves them): exactly what
in-run TracIn sums over steps. The projection maths is the projectors'; this module keeps only Lightning hooks,
row buffers and the hand-off to the chunk writer (`core/capture.py`, the one place of the on-disk format).

With a loss that is the mean of per-example losses, the output gradient the backward sees for example i is
(1/B) d loss_i / d output_i (divided again by `accumulate_grad_batches`, which Lightning applies), so the captured
features are rescaled by B * accumulate_grad_batches (and by 1 / the AMP grad scale when a GradScaler is active).
They then equal `capture_projector(...)` / `make_capture_projector(...).features(batch)` (the "loss" output) at the
same weights for a model without train/eval differences (no dropout, no BatchNorm); with dropout the captured
gradients are of the train-mode loss the optimizer actually used. BatchNorm layers normalize with batch statistics
in train mode (examples are not independent): their parameters are not captured (`skipped_params`).

Hot path. A layer with one position per example (a Linear on (B, d) inputs: most MLP layers, classifier heads) has a
rank-one per-example gradient d_i a_i^T: its two sides are stored in the chunk buffer (Kronecker: P_out^T d and P_in^T
a; tensor sketch: d and a themselves, when d_in + d_out <= 2 proj_dim) and the features are formed for the whole
chunk at once when it is handed off (outer products; tensor sketch: `TensorSketchProjector.add_rank_one`, count
sketches + FFTs with one inverse FFT per row block for all layers, small layers formed and scattered), on the writer
thread on CPU. Every other layer (positions: conv pixels, tokens; a layer called twice in a step; embeddings, norms,
attention) is projected in the step by the projector's own `_combine`, with the loss scale passed in (no copy of
the layer's inputs); a convolution's patches are never unfolded for it (`core.layers.ConvTerm`). Nothing is copied to the host per step (ids stay on the
device until the chunk is handed off), and with `out_dir` two chunk buffers alternate. Overheads: see
`benchmarks/bench_capture_overhead.py` and `benchmarks/RESULTS.md` (Capture overhead); `every_n_steps=n` pays the
cost on every n-th step only.

On-disk format (`out_dir`): see `core/capture.py` (chunk files per rank, streamed while training runs).
`core.capture.read_capture` iterates the chunks, `capture_projector` rebuilds the projector with the same
matrices, and `tracin_from_capture` turns a capture into in-run TracIn scores:

    cap = GradientCapture(out_dir="capture", every_n_steps=n, ids_fn=lambda batch: batch[2])  # dataset ids
    snaps = CheckpointCapture(dirpath="snaps", every_n_steps=n)   # the weights each captured step trained at
    trainer = L.Trainer(callbacks=[cap, snaps], ...); trainer.fit(model, loader)
    proj = capture_projector("capture", model)                    # the capture's projection
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
`AttributionCallback(method="tracin")` on the same Trainer takes it as its result (`callbacks/in_run.captured_tracin`).

Limitations: parameters the engine does not hook (and BatchNorm's) cannot be captured this way; with `params=None`
they are left out (listed in `skipped_params`), an explicit `params` selection that includes them is refused. A layer
that runs twice in a step (weight sharing, two forwards) gets the sum of both calls' terms, as its gradient does; a
captured step must run one backward (on_after_backward closes it).
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
from lightning.pytorch.callbacks import Callback

from torch.utils.data import Dataset

from ..core.capture import (CAPTURE_PROJECTORS, FORMAT_VERSION, BatchIndexRecorder, InRunScores,
                            QueryFeatures, chunk_features_path, make_capture_projector,
                            projector_kind, read_capture, runs, write_chunk)
from ..core.gradients import select_parameters
from ..core.capture_rows import (NULL, LayerSlot, RankOneSides, RowChunk, consume_all, expand_and_consume,
                                 expand_and_score, expand_and_write, no_autocast)
from ..core.io import atomic_write_json
from ..core.layers import SUPPORTED, Layer, Term
from ..core.tasks import read_batch
from ..core.windows import LossToMargin, SnapshotWindows
from .capture_windows import SnapshotWindowsMixin
from .loaders import first_loader
from ..core.sketch import ALLOCATIONS, HookedProjector, LayerPlan, TensorSketchProjector

PENDING_QUERY_BYTES = 256 << 20    # query features of captured steps not yet scored: a chunk is emitted beyond this
MAX_INRUN_BYTES = 4 << 30          # the in-run train x query matrix beyond this is refused before training


class GradientCapture(SnapshotWindowsMixin, Callback):
    """Projected per-example loss gradients of training batches, (B, proj_dim) float32, captured in the steps.

    Args:
        projector: "auto" (default): "tensorsketch" when the rows feed TRAK's snapshot windows (an
            `AttributionCallback` asks for them), else "factorized". "tensorsketch" (one count sketch of the whole
            gradient, `TensorSketchProjector`) is TRAK's post-hoc default and as accurate as a dense projection;
            captured TRAK with it was within 0.003-0.018 LDS of post hoc, with Kronecker 0.078 below (MNIST-5k).
            "factorized" (Kronecker, `KroneckerProjector`) is cheaper in the step on layers with several positions:
            +7-13% of a small transformer's step vs +25-29%, +28% of a small CNN's vs +46-49%
            (`benchmarks/RESULTS.md`). Either gives the same matrices as `Attributor(projector=...)` /
            `make_projector` with the same parameter selection and seed (BatchNorm left out, see `skipped_params`).
        proj_dim, seed: the projection's size and seed; allocation: how "factorized" splits proj_dim over layers.
        params: parameter names/prefixes/predicate to capture (default: every trainable parameter of a layer the
            engine hooks: Linear, Conv1d/2d, Embedding, LayerNorm/GroupNorm, MultiheadAttention, HF Conv1D).
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
        query_dataset: queries known before training: "auto" (default: the first validation dataset, if the fit
            has one, unless an `AttributionCallback` on the Trainer computes another method than TracIn, which
            would not use the in-run scores), "val" (the validation set in any case), a map-style dataset, or None. At every captured step the queries' projected loss
            gradients are computed at that step's weights (eval mode, before the optimizer step) and the in-run
            TracIn scores sum_t lr_t phi_t(z_i) . psi_t(z_q) accumulate during training: no snapshots, no second
            pass. The result is written at the end of fit (`load_results(result_dir)`) and kept in `result`.
        query_batch_size: batch size of the query pass.
        result_dir: where the in-run TracIn result goes (default `<trainer.default_root_dir>/inrun_tracin`).
        keep_records: without `out_dir`, keep every captured row in memory for `records` (n_rows x proj_dim x 4
            bytes). None (default): only when nothing else uses the rows (no in-run scores, no snapshot windows for
            TRAK), which then never hold the whole capture in memory.

    Dataset ids: without `ids_fn`, the callback records the indices the training DataLoader's batch sampler
    yields (`core.capture.BatchIndexRecorder`), so rows carry ids without changing the dataset or `training_step`.
    """

    def __init__(self, proj_dim: int = 2048, seed: int = 0, allocation: str = "equal", projector: str = "auto",
                 params: None | Sequence[str] | Callable = None, every_n_steps: int = 1,
                 ids_fn: Callable[[Any], torch.Tensor] | None = None, reduction: str = "mean",
                 out_dir: str | os.PathLike | None = None, chunk_size: int = 4096,
                 query_dataset: Dataset | str | None = "auto", query_batch_size: int = 256,
                 result_dir: str | os.PathLike | None = None, keep_records: bool | None = None):
        super().__init__()
        for name, val in (("proj_dim", proj_dim), ("every_n_steps", every_n_steps), ("chunk_size", chunk_size),
                          ("query_batch_size", query_batch_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if projector != "auto" and projector not in CAPTURE_PROJECTORS:
            raise ValueError(f"projector must be 'auto' or one of {CAPTURE_PROJECTORS}, got {projector!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if ids_fn is not None and not callable(ids_fn):
            raise TypeError(f"ids_fn must be a callable batch -> Tensor[B] of dataset indices, got {type(ids_fn).__name__}")
        self.proj_dim, self.seed, self.allocation, self.projector_choice = proj_dim, seed, allocation, projector
        self.params, self.every_n_steps, self.ids_fn, self.reduction = params, every_n_steps, ids_fn, reduction
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.chunk_size = chunk_size
        if not (query_dataset is None or query_dataset in ("auto", "val") or hasattr(query_dataset, "__len__")):
            raise TypeError(f"query_dataset must be 'auto', 'val', None or a map-style dataset with __len__, got "
                            f"{type(query_dataset).__name__}")
        self.query_dataset, self.query_batch_size = query_dataset, query_batch_size
        self.result_dir = Path(result_dir) if result_dir is not None else None
        if keep_records not in (None, True, False):
            raise TypeError(f"keep_records must be None, True or False, got {keep_records!r}")
        self.keep_records = keep_records
        self.result = None
        self._queries: QueryFeatures | None = None
        self._inrun: InRunScores | None = None
        self._recorder: BatchIndexRecorder | None = None
        self._n_train: int | None = None
        self._resume_inrun: dict | None = None
        self._resume_windows: dict | None = None
        self.query_source: Dataset | None = None   # the query dataset the in-run scores are against
        self.projector: HookedProjector | None = None
        self.param_names: list[str] = []
        self.skipped_params: list[str] = []
        self.rank_dir: Path | None = None
        self._layers: list[LayerSlot] = []
        self._by_name: dict[str, LayerSlot] = {}
        self._sides: RankOneSides | None = None
        self._recording: Any = None   # the engine's recording context of the captured batch, while open
        self._trainer: L.Trainer | None = None
        self._resume_step: int | None = None
        self._owns_rank_dir = False
        self._kept: list[Any] = []   # memory mode: finished chunks (CPU `RowChunk`s, or (features, meta) copies)
        self._dropped_rows = False   # memory mode: rows handed to their consumers and not kept (`keep_records`)
        self._writer: ThreadPoolExecutor | None = None
        # snapshot windows for TRAK (`core/windows.py`), asked for by an AttributionCallback before training
        self.windows_requested = False
        self.windows_required = False   # train_features="capture": a loss mismatch is an error at the first step
        self.default_queries_released = False   # query_dataset="auto" and the Trainer's AttributionCallback is not TracIn
        self.windows: SnapshotWindows | None = None
        self.window_steps: int | None = None
        self.windows_unused: str | None = None   # why the capture cannot give TRAK's train features (None: it can)
        self.window_seeds: dict[str, int] = {}   # snapshot -> the projection seed of its window's rows
        self._resume_seeds: dict | None = None
        self._to_margin: LossToMargin | None = None
        self._forward_hook: Any = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._active = False
        self.captured_steps = 0   # training batches captured in this fit (on this rank)
        self._n: int | None = None
        self._r0 = 0
        self._chunk: RowChunk | None = None     # the chunk being filled
        self._spare: RowChunk | None = None     # out_dir on CPU: the one the writer thread may still be reading
        self._host: list[torch.Tensor | None] = [None, None]  # out_dir on GPU: pinned copies for the writer
        self._host_futures: list[Future | None] = [None, None]
        self._cur = 0
        self._next_chunk = 0
        self._dtype = torch.float32
        self._scale = 1.0        # the loss-reduction scale of the batch being captured
        self._factors: list[tuple] = []        # Kronecker rank-one path: per layer (P_out * scales, P_in)
        self._factor_key: tuple | None = None
        self.no_autocast: Any = NULL
        self._base_scale = 1.0
        self._scaler = None
        self._group: dict | None = None
        self._row_meta: tuple = ()
        self._ids: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}   # step -> query features, until that step's chunk is scored
        self._output: list | None = None   # windows: [prediction, its gradient, the tensor, outermost] per forward
        self._target: Any = None
        self._inputs: Any = None

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

    def _write_capture_settings(self, trainer: L.Trainer) -> None:
        """out_dir: `capture.json` (rank 0), after refusing a folder that holds a capture of another layout."""
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
            atomic_write_json(path, settings)

    def _build_projector(self, pl_module: L.LightningModule) -> None:
        """The capture projector over the engine's layers (BatchNorm vetoed); what it cannot hook is skipped
        (params=None) or refused (explicit params), before the first training step."""
        chosen = select_parameters(pl_module, self.params)

        def build(names):
            return make_capture_projector(self.projector_kind, pl_module, None, names, self.proj_dim, self.seed,
                                          self.allocation)
        probe = build(chosen)
        if probe.fallback.param_names:
            if self.params is not None:
                raise ValueError(
                    f"GradientCapture captures the parameters of {', '.join(SUPPORTED)} layers (BatchNorm excluded: "
                    f"batch statistics in train mode); params selects {probe.fallback.param_names[:5]} as well. "
                    "Select only those layers' parameters, or params=None to skip the others.")
            self.skipped_params = list(probe.fallback.param_names)
            chosen = [n for la in probe.layers for n in la.param_names]
            if not chosen:
                raise ValueError(f"GradientCapture found no trainable layer it can capture ({', '.join(SUPPORTED)})")
            probe = build(chosen)
        self.param_names = chosen
        self._install_projector(probe)

    def _install_projector(self, probe: HookedProjector) -> None:
        """Use `probe` for the rows captured from now on (its layer plans place each layer's block in a row)."""
        self.projector = probe
        tensor, start = isinstance(probe, TensorSketchProjector), 0
        self._layers = []
        for plan in probe.layers:
            if plan.dim:
                self._layers.append(LayerSlot(plan, len(self._layers), start, tensor, probe.proj_dim))
            start += 0 if tensor else plan.dim
        self._by_name = {lay.plan.name: lay for lay in self._layers}
        self._offsets = {lay.plan.name: lay.start for lay in self._layers}
        self._sides = RankOneSides(probe, self._layers)
        self._factor_key = None   # Kronecker: the scaled factors are taken from this projector at the next batch

    def settings(self, world_size: int = 1) -> dict:
        """What the captured features depend on besides the weights (written to `capture.json`)."""
        return {"format": "lightning-attrib-gradient-capture", "version": FORMAT_VERSION,
                "projector": projector_kind(self.projector), "layout": self.projector.layout, "layout_hash": self.projector.layout_hash,
                "param_names": self.param_names, "skipped_params": self.skipped_params,
                "proj_dim": self.projector.proj_dim, "every_n_steps": self.every_n_steps,
                "reduction": self.reduction, "output": "loss", "world_size": int(world_size),
                "chunk_size": self.chunk_size}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_run_state()
        if projector_kind(self.projector) != self.projector_kind:   # "auto", built before the windows were asked for
            self._build_projector(pl_module)
        if self.out_dir is not None:
            self._write_capture_settings(trainer)
        self._group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else None
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if self.out_dir is not None:
            self._prepare_rank_dir()
        # the writer thread's torch ops (the chunk expansion) run on one intra-op thread: the training keeps the rest
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="GradientCapture",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self._setup_ids_and_queries(trainer, pl_module)
        self._setup_windows(trainer, pl_module)

    def release_default_queries(self) -> None:
        """With query_dataset="auto": no in-run TracIn query pass (the Trainer's AttributionCallback computes another
        method). Called by `AttributionCallback` before training."""
        self.default_queries_released = True

    @property
    def scores_queries(self) -> bool:
        """Whether this capture will run the in-run TracIn query pass (and so record learning rates)."""
        return self.query_dataset is not None and not (self.query_dataset == "auto" and self.default_queries_released)

    @property
    def projector_kind(self) -> str:
        """The projector the rows are captured with: `projector`, with "auto" resolved (tensor sketch for TRAK's
        windows, Kronecker otherwise)."""
        if self.projector_choice != "auto":
            return self.projector_choice
        return "tensorsketch" if self.windows_requested else "factorized"

    def _setup_ids_and_queries(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the training batches' dataset indices (no `ids_fn`), and prepare the query pass (`query_dataset`)."""
        loader = first_loader(trainer.train_dataloader)
        dataset = getattr(loader, "dataset", None)
        self._n_train = len(dataset) if hasattr(dataset, "__len__") else None
        self._recorder = BatchIndexRecorder.installed(loader) if self.ids_fn is None else None
        queries, collate = self.query_dataset, None
        if queries == "auto":
            queries = None if self.default_queries_released else "val"
        if queries == "val":
            val = first_loader(trainer.val_dataloaders)
            source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
            if val is None and source is not None and source.is_defined():   # not set up yet (no sanity check)
                requested = source.dataloader()
                val = first_loader(getattr(requested, "iterables", requested))
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
            raise ValueError(f"GradientCapture(query_dataset={self.query_dataset if isinstance(self.query_dataset, str) else '...'}): the "
                             f"in-run score matrix ({self._n_train} x {len(queries)} float64) would take "
                             f"{need / 2**30:.1f} GiB; pass a smaller query_dataset, or query_dataset=None to capture "
                             "features only")
        device = pl_module.device
        self._queries = QueryFeatures(self.projector, pl_module, queries, collate, self.query_batch_size, device)
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
        if self.windows is not None:
            self.freeze_windows(trainer, next_projection=True)
        if step % self.every_n_steps or (self._windows_only() and not self._in_a_window(trainer)):
            return
        if self.windows is not None:
            self._output = None
            try:
                self._inputs, self._target = read_batch(pl_module, batch)
            except Exception:   # not readable as (inputs, target): these rows get no ratio (featurized post hoc)
                self._inputs = self._target = None
        if self._queries is not None and step not in self._pending:   # once per step (gradient accumulation)
            if len(self._pending) * self._queries.bytes_per_step >= PENDING_QUERY_BYTES:
                self._emit()   # score the rows captured so far and let their steps' query features go
            self._pending[step] = self._queries.features()
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
        # the query pass above ran its own recording; the capture's opens last (MHA forwards are patched inside)
        self._recording = self.projector.engine.recording(on_grad=self._on_terms, eval_mode=False)
        self._recording.__enter__()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        self._close_recording()
        n = self._n
        if n is None:  # no hooked layer ran in this step's forward
            return
        ch, r0 = self._chunk, self._r0
        r1 = r0 + n
        self.captured_steps += 1
        for lay in self._layers:   # a layer off the loss's path never fired: its rows stay zero
            if lay.deferrable:
                ch.factored[lay.index, r0:r1] = lay.vec
            lay.fired = 0
            lay.vec = False
        meta = ch.meta
        step, epoch, batch_idx, lr = self._row_meta
        meta["step"][r0:r1] = step
        meta["epoch"][r0:r1] = epoch
        meta["batch_idx"][r0:r1] = batch_idx
        meta["lr"][r0:r1] = lr
        meta["ratio"][r0:r1], meta["q"][r0:r1] = self._margin_ratios(n) if self.windows is not None else (np.nan, np.nan)
        if self._ids is not None:
            ids = torch.as_tensor(self._ids).detach().reshape(-1)
            if ids.numel() != n:
                raise ValueError(f"GradientCapture: ids_fn returned {ids.numel()} ids for a batch of {n} examples")
            ch.ids[r0:r1].copy_(ids, non_blocking=True)
        ch.rows = r1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._active:  # a step without backward (skipped, or no loss): no rows, no hooks left behind
            self._active = False
            self._output = None
            self._close_recording()
            for lay in self._layers:
                lay.fired = 0
                lay.vec = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.out_dir is not None and self._chunk is not None:  # everything up to the checkpoint is on disk
            self._emit()
            self._wait()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()
        self.freeze_windows(trainer)
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
                "output": "loss", "projector": projector_kind(self.projector),
                "proj_dim": self.projector.proj_dim, "seed": self.seed, "n_train": inrun.n_train,
                "n_query": inrun.n_query, "every_n_steps": self.every_n_steps, "captured_steps": len(inrun.steps),
                "never_captured": int(never.sum()), "lr": "recorded at every captured step",
                "excluded": {"train": np.flatnonzero(never.cpu().numpy()).tolist(), "query": []},   # NaN self-influence
                "world_size": trainer.world_size, "constant_self_influence": False, "self_influence_computed": True,
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
        self._close_windows()

    def _finish(self) -> None:
        self._close_recording()
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
        if self.windows is not None:   # snapshot windows frozen so far (their files stay on a resume)
            state["windows_frozen"] = dict(self.windows.frozen)
            state["window_seeds"] = dict(self.window_seeds)
        if self._inrun is not None and self._trainer is not None:
            self._emit()
            self._wait()
            inrun, strategy = self._inrun, self._trainer.strategy
            state["inrun"] = {name: strategy.reduce(getattr(inrun, name).clone(), reduce_op="sum").cpu()
                              for name in ("scores", "self_influence", "counts", "seen")}
            state["inrun"]["steps"] = list(inrun.steps)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed fit drops the chunks its ranks wrote after the checkpoint (steps >= its global step),
        continues the in-run totals of the checkpoint, and keeps the snapshot windows frozen before it (a window
        open at the checkpoint holds only the rows captured after the resume; the others are featurized post hoc)."""
        step = state_dict.get("global_step")
        self._resume_step = int(step) if step is not None else None
        self._resume_inrun = state_dict.get("inrun")
        self._resume_windows = state_dict.get("windows_frozen")
        self._resume_seeds = state_dict.get("window_seeds")

    # -- the hot path -------------------------------------------------------------------------------------
    def _close_recording(self) -> None:
        rec, self._recording = self._recording, None
        if rec is not None:
            rec.__exit__(None, None, None)

    def _on_terms(self, layer: Layer, terms: list[Term]) -> None:
        """The engine's on_grad: one layer call's per-example terms from the step's backward -> its feature rows."""
        if not self._active:
            return
        lay = self._by_name.get(layer.name)
        if lay is None:
            return
        n = int(terms[0].n)
        if self._n is None:
            self._begin(n, terms[0].dtype, terms[0].device)
        elif n != self._n:
            raise ValueError(f"GradientCapture: layer {layer.name!r} saw {n} examples in a batch of {self._n}: "
                             "its per-example gradient cannot be read; exclude it with params=")
        dtype, r0 = self._dtype, self._r0
        if any(t.dtype != dtype or (t.d is not None and t.d.dtype != dtype) for t in terms):
            terms = [t.to(dtype) for t in terms]
        with self.no_autocast:
            t = terms[0]
            if lay.deferrable and not lay.fired and len(terms) == 1 and t.d is not None and t.positions == 1:
                self._store_sides(lay, t.d[:, 0], t.a[:, 0], r0, n)
            else:
                feats = self._chunk.features[r0:r0 + n]
                if lay.vec:   # a rank-one layer called again: its stored first call goes into the rows now
                    ch, i = self._chunk, lay.index
                    self._sides.add(lay, feats, ch.d[i][r0:r0 + n], ch.a[i][r0:r0 + n])
                    lay.vec = False
                self.projector._combine(feats, [(lay.plan, terms)], self._offsets, self._scale)
        lay.fired += 1

    def _store_sides(self, lay: LayerSlot, d: torch.Tensor, a: torch.Tensor, r0: int, n: int) -> None:
        """Rank-one layer: keep its two sides in the chunk (features formed per chunk, `RankOneSides.add`)."""
        plan, i = lay.plan, lay.index
        d_dst, a_dst = self._chunk.d[i][r0:r0 + n], self._chunk.a[i][r0:r0 + n]
        if self._sides.tensor:
            torch.mul(d, self._scale, out=d_dst)
            a_dst.copy_(a)
        else:
            p_out, p_in = self._factors[i]
            if p_out is None:
                torch.mul(d, plan.scale * self._scale, out=d_dst)
            else:   # P_out with plan.scale * the batch's loss scale folded in
                torch.mm(d, p_out, out=d_dst)
            if p_in is None:
                a_dst.copy_(a)
            else:
                torch.mm(a, p_in, out=a_dst)
        lay.vec = True

    def _scaled_factors(self, plan: LayerPlan, scale: float, dtype: torch.dtype, device: torch.device) -> tuple:
        p_out = self.projector.factor(plan, "out", dtype, device)
        return (None if p_out is None else p_out * (plan.scale * scale),
                self.projector.factor(plan, "in", dtype, device))

    def _begin(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        """First layer of a captured batch's backward: reserve (and zero) rows, set this batch's loss scale."""
        self._scale = self._base_scale * (n if self.reduction == "mean" else 1)
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        ch = self._chunk
        if ch is None or ch.rows + n > ch.cap or ch.dtype != dtype or ch.device != device:
            self._emit()
            self._next_buffer(max(self.chunk_size, n), dtype, device)
        key = (self._scale, dtype, device)
        if key != self._factor_key and not self._sides.tensor:   # Kronecker: (P_out * scale, P_in) per layer
            self._factors = [self._scaled_factors(lay.plan, self._scale, dtype, device) for lay in self._layers]
        self._factor_key = key
        self.no_autocast = no_autocast(device)
        self._dtype = dtype
        self._r0 = self._chunk.rows
        self._n = n

    # -- chunks ------------------------------------------------------------------------------------------
    def _next_buffer(self, cap: int, dtype: torch.dtype, device: torch.device) -> None:
        """A chunk to fill: the spare one once the writer thread is done with it, else a new one."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.future is not None:
            spare.future.result()
            spare.future = None
        if spare is None or spare.cap < cap or spare.dtype != dtype or spare.device != device:
            spare = RowChunk(cap, self.projector.proj_dim, self._layers, dtype, device)
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
        consumers = []   # run on each chunk's features (writer thread on CPU)
        if self._inrun is not None:   # the in-run scores of this chunk's rows, against their steps' queries
            meta = ch.row_meta()
            queries = {int(t): self._pending.pop(int(t)) for t in np.unique(meta["step"])}
            consumers.append(partial(self._inrun.add, meta=meta, queries=queries))
        if self.windows is not None:   # each example's latest row, for TRAK's snapshot windows
            consumers.append(partial(self.windows.add, meta=ch.row_meta()))
        score = partial(consume_all, consumers) if consumers else None
        if self.out_dir is None and not self._keeps_records(bool(consumers)):   # consumed, then dropped
            self._dropped_rows = True
            if cpu:
                ch.future = self._writer.submit(expand_and_consume, ch, self._sides, score)
            else:
                feats = ch.expand(self._sides)
                if score is not None:
                    score(feats)
                feats.zero_()
            self._spare = ch
            return
        if self.out_dir is None:
            if cpu:
                ch.future = self._writer.submit(expand_and_score, ch, self._sides, score)
                self._kept.append(ch)
            else:
                feats = ch.expand(self._sides)
                if score is not None:
                    score(feats)
                self._kept.append((feats.cpu(), ch.row_meta()))
                feats.zero_()
                self._spare = ch
            return
        index = self._next_chunk
        self._next_chunk += 1
        meta = ch.row_meta()
        if cpu:
            ch.future = self._writer.submit(expand_and_write, ch, self._sides, self.rank_dir, index, meta, score)
            self._spare = ch
            return
        feats = ch.expand(self._sides)
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
        feats.zero_()   # queued after the copy on the same stream
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
            if isinstance(ch, RowChunk) and ch.future is not None:
                fut, ch.future = ch.future, None
                fut.result()

    # -- results ---------------------------------------------------------------------------------------
    def _keeps_records(self, consumed: bool) -> bool:
        """In memory (no out_dir): rows are kept for `records` when asked (keep_records=True), or by default when
        nothing else uses them (no in-run scores, no snapshot windows): n_rows x proj_dim x 4 bytes of RAM."""
        return self.keep_records if self.keep_records is not None else not consumed

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per captured batch: step, epoch, batch_idx, lr, ids (None without ids_fn), features (B, k).

        In memory (no `out_dir`) this is what was captured on this rank (see `keep_records`); with `out_dir` it reads
        this rank's chunk files back (all of them into memory: for big captures iterate `read_capture` instead).
        """
        if self.out_dir is None and self._dropped_rows:
            raise ValueError("GradientCapture kept no rows in memory (they went to the in-run scores / snapshot windows; "
                             "keep_records=None keeps them only when nothing else uses them): pass keep_records=True "
                             "or out_dir= to read them back")
        if self.out_dir is None:
            self._wait()
            chunks = [(c.features[:c.rows], c.row_meta()) if isinstance(c, RowChunk) else c for c in self._kept]
            ch = self._chunk
            if ch is not None and ch.rows:   # rows not emitted yet (records read during fit)
                chunks.append((ch.expand(self._sides, out=ch.features[:ch.rows].clone()), ch.row_meta()))
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
        first = first_loader(getattr(loaders, "iterables", loaders))
        if first is not None and BatchIndexRecorder.installed(first) is None:
            BatchIndexRecorder().install(first)
        return loaders

    source.dataloader = dataloader
    source._attrib_recording = True

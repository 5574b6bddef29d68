"""`GradientCapture`'s row buffers, plain torch: which captured layers a feature row holds and where
(`LayerSlot`), the preallocated chunk of rows (`RowChunk`: features, the deferred rank-one sides, per-row metadata),
turning stored rank-one sides into features off the training step (`RankOneSides`, with the capture projector's
matrices), and the writer thread's hand-off functions. The on-disk chunk format is `core/capture.py`; the
Lightning hooks that fill these buffers are `callbacks/gradient_capture.py`.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture import META_FIELDS, runs, write_chunk
from .sketch import HookedProjector, LayerPlan, TensorSketchProjector

EXPAND_ROWS = 512                  # rows per block when a chunk's rank-one sides are turned into features
RANK_ONE_KINDS = ("linear", "hf_conv1d")


class NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


NULL = NullContext()


def no_autocast(device: torch.device) -> Any:
    """Autocast off for the projections when the training forward runs under it (AMP); else a no-op context."""
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) else NULL


class LayerSlot:
    """One captured layer: where its block goes in a feature row, whether its rank-one sides are deferred to the
    chunk hand-off, and what happened to it in this step (`fired`: backward calls; `vec`: sides stored)."""

    __slots__ = ("plan", "index", "start", "full", "rem", "deferrable", "side_in", "side_out", "fired", "vec")

    def __init__(self, plan: LayerPlan, index: int, start: int, tensor: bool, proj_dim: int):
        self.plan, self.index, self.start = plan, index, start
        self.full, self.rem = divmod(plan.dim, plan.k_in)   # Kronecker: dim = full rows of k_in + a partial row
        if tensor:   # raw sides, when they are no larger than their sketches would be
            self.side_in, self.side_out = plan.d_in, plan.d_out
            self.deferrable = plan.kind in RANK_ONE_KINDS and plan.d_in + plan.d_out <= 2 * proj_dim
        else:        # projected sides
            self.side_in, self.side_out = plan.k_in, plan.k_out
            self.deferrable = plan.kind in RANK_ONE_KINDS
        self.fired = 0
        self.vec = False


class RowChunk:
    """Preallocated rows: features, the rank-one sides of deferrable layers (turned into features per chunk, off
    the hot path), which rows hold such sides, and the per-row metadata."""

    def __init__(self, cap: int, proj_dim: int, layers: list[LayerSlot], dtype: torch.dtype, device: torch.device):
        self.cap, self.dtype, self.device, self.rows = cap, dtype, device, 0
        # zero: rows are filled by adding (tensor sketch, in-step blocks); a reused buffer is zeroed after its hand-off
        self.features = torch.zeros(cap, proj_dim, dtype=torch.float32, device=device)
        self.a: list[torch.Tensor | None] = []
        self.d: list[torch.Tensor | None] = []
        for lay in layers:
            fac = lay.deferrable
            self.a.append(torch.empty(cap, lay.side_in, dtype=dtype, device=device) if fac else None)
            self.d.append(torch.empty(cap, lay.side_out, dtype=dtype, device=device) if fac else None)
        self.factored = np.zeros((len(layers), cap), dtype=bool)
        self.meta = {k: np.empty(cap, dtype=t) for k, t in META_FIELDS if k != "ids"}
        self.ids = torch.full((cap,), -1, dtype=torch.int64, device=device)  # on the device: no per-step sync
        self.future: Future | None = None

    def expand(self, sides: "RankOneSides", release: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """Add the stored rank-one rows' features into `features` (or into `out`, a copy of the filled rows, which
        leaves this chunk as it is); return the filled rows."""
        rows = self.rows
        feats = self.features[:rows] if out is None else out
        for b0 in range(0, rows, EXPAND_ROWS):   # row blocks: bounded temporaries (outer products, spectra)
            b1 = min(rows, b0 + EXPAND_ROWS)
            spectrum = sides.spectrum(b1 - b0, self.dtype, self.device)   # tensor sketch: FFT layers' sum
            used = False
            for lay in sides.layers:
                if self.a[lay.index] is None:
                    continue
                for lo, hi in runs(self.factored[lay.index, b0:b1]):
                    if self.factored[lay.index, b0 + lo]:
                        r0, r1 = b0 + lo, b0 + hi
                        sides.add(lay, feats[r0:r1], self.d[lay.index][r0:r1], self.a[lay.index][r0:r1],
                                  None if spectrum is None else spectrum[lo:hi])
                        used = True
            if used and spectrum is not None:
                feats[b0:b1] += torch.fft.irfft(spectrum, n=feats.shape[1], dim=1).float()
        if release:  # kept in memory: the sides are not needed any more
            self.a = [None] * len(self.a)
            self.d = [None] * len(self.d)
        return feats

    def reset(self) -> None:
        self.rows = 0
        self.ids.fill_(-1)

    def row_meta(self) -> dict[str, np.ndarray]:
        """Copies of the filled rows' metadata (ids copied off the device here, once per chunk)."""
        meta = {k: v[:self.rows].copy() for k, v in self.meta.items()}
        meta["ids"] = self.ids[:self.rows].cpu().numpy().copy()
        return meta


class RankOneSides:
    """Turns stored rank-one sides (d, a) of a layer into its feature contribution, with the capture projector's
    matrices: Kronecker vec((P_out^T d)(P_in^T a)^T)[:dim] at the layer's block; tensor sketch the circular
    convolution of the sides' count sketches (FFT), added to every column."""

    def __init__(self, projector: HookedProjector, layers: list[LayerSlot]):
        self.projector, self.layers = projector, layers
        self.tensor = isinstance(projector, TensorSketchProjector)

    def spectrum(self, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Tensor sketch: a zeroed (rows, s // 2 + 1) spectrum that the FFT-path layers of a row block add into
        (inverted once per block, not once per layer); None for Kronecker."""
        if not self.tensor:
            return None
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return torch.zeros(rows, self.projector.proj_dim // 2 + 1, dtype=cdtype, device=device)

    def add(self, lay: LayerSlot, features: torch.Tensor, d: torch.Tensor, a: torch.Tensor,
            spectrum: torch.Tensor | None = None) -> None:
        if self.tensor:
            self.projector.add_rank_one(lay.plan, features, d, a, spectrum)
            return
        n, start, full, rem, k_in = d.shape[0], lay.start, lay.full, lay.rem, lay.plan.k_in
        torch.mul(d[:, :full, None], a[:, None, :], out=features[:, start:start + full * k_in].view(n, full, k_in))
        if rem:
            torch.mul(d[:, full:full + 1], a[:, :rem], out=features[:, start + full * k_in:start + lay.plan.dim])


def consume_all(consumers: list[Callable], feats: torch.Tensor) -> None:
    for consume in consumers:
        consume(feats)


def expand_and_write(chunk: RowChunk, layers: RankOneSides, rank_dir: Path, index: int, meta: dict,
                      score: Callable | None = None) -> None:
    """Writer thread, CPU: form the stored rank-one rows' features, score them against the queries (if any), write the chunk."""
    feats = chunk.expand(layers)
    if score is not None:
        score(feats)
    write_chunk(rank_dir, index, feats, meta, None)
    feats.zero_()   # the buffer is reused: its rows start at zero


def expand_and_consume(chunk: RowChunk, layers: RankOneSides, score: Callable | None) -> None:
    """Writer thread, CPU, rows not kept: form the rank-one rows' features, hand them on, zero the reused buffer."""
    feats = chunk.expand(layers)
    if score is not None:
        score(feats)
    feats.zero_()


def expand_and_score(chunk: RowChunk, layers: RankOneSides, score: Callable | None) -> torch.Tensor:
    """Writer thread, CPU, in memory: form the stored rank-one rows' features (then release the sides), score them."""
    feats = chunk.expand(layers, True)
    if score is not None:
        score(feats)
    return feats

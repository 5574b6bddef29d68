"""Streaming pieces of the scorer: shard read-ahead and where score blocks go (the full matrix or a running top-k).

`Attributor._score_my_queries` computes (train rows x query chunk) blocks shard by shard; a sink receives them.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_write_bytes


def prefetched(load: Callable[[Any], Any], items: Sequence) -> Iterator:
    """Yield `load(item)` for each item while a background thread already loads the next one, so that reading
    shard s+1 (numpy file reads release the GIL) overlaps the matmul of shard s."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, items[0])
        for nxt in list(items[1:]) + [None]:
            result = pending.result()
            if nxt is not None:
                pending = pool.submit(load, nxt)
            yield result


class FullScoresSink:
    """Writes score blocks (train rows x query chunk) into this rank's memory-mapped (n_train, n_block) part."""

    def __init__(self, path: Path, n_train: int, q_lo: int, q_hi: int):
        self.part = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_train, q_hi - q_lo))
        self.q_lo, self.cols = q_lo, slice(0, 0)

    def begin(self, c_lo: int, c_hi: int) -> None:
        self.cols = slice(c_lo - self.q_lo, c_hi - self.q_lo)

    def add(self, lo: int, block: torch.Tensor) -> None:
        self.part[lo:lo + block.shape[0], self.cols] = block.float().cpu().numpy()

    def close(self) -> None:
        self.part.flush()
        del self.part


class RunningTopK:
    """The k largest (or smallest) scores per query, and their train rows, over blocks of train rows streamed in.

    A block is merged by one `torch.topk` over [best k so far, block], but only for the queries whose block holds
    a score beyond their current k-th best (checked with one max/min per query): once a few thousand rows were
    seen that is a small minority, and topk (~10 ns per element on a CPU) would otherwise cost a third of the GEMM.
    """

    def __init__(self, k: int, largest: bool):
        self.k, self.largest = k, largest
        self.values: torch.Tensor | None = None  # (n_query, <= k), best first
        self.rows: torch.Tensor | None = None    # (n_query, <= k) int64 train rows

    def update(self, lo: int, block: torch.Tensor) -> None:
        """Merge `block` (m train rows starting at row `lo`, n queries) into the running top k."""
        values = block.T
        if self.values is not None and self.values.shape[1] == self.k:  # full: merge only where it can change
            extreme = values.amax(dim=1) if self.largest else values.amin(dim=1)
            beyond = extreme > self.values[:, -1] if self.largest else extreme < self.values[:, -1]
            sel = beyond.nonzero().squeeze(1)
            if len(sel):
                best, rows = self._merge(self.values[sel], self.rows[sel], values[sel], lo)
                self.values[sel], self.rows[sel] = best, rows
            return
        if self.values is None:
            self.values = values[:, :0]
            self.rows = torch.zeros(values.shape[0], 0, dtype=torch.int64, device=values.device)
        self.values, self.rows = self._merge(self.values, self.rows, values, lo)

    def _merge(self, best: torch.Tensor, best_rows: torch.Tensor, values: torch.Tensor, lo: int):
        rows = torch.arange(lo, lo + values.shape[1], device=values.device).expand(values.shape[0], -1)
        values, rows = torch.cat([best, values], dim=1), torch.cat([best_rows, rows], dim=1)
        top, pos = torch.topk(values, min(self.k, values.shape[1]), dim=1, largest=self.largest, sorted=True)
        return top, rows.gather(1, pos)


class TopKSink:
    """Keeps each query's top-k proponents and opponents over the streamed blocks; writes this rank's part.
    Train rows in `exclude` (non-finite examples) never enter either list while others remain."""

    def __init__(self, path: Path, k: int, exclude: Sequence[int] = ()):
        self.path, self.k = path, k
        self.exclude = np.asarray(sorted(exclude), dtype=np.int64)
        self.chunks: list[tuple[RunningTopK, RunningTopK]] = []

    def begin(self, c_lo: int, c_hi: int) -> None:
        self.chunks.append((RunningTopK(self.k, largest=True), RunningTopK(self.k, largest=False)))

    def add(self, lo: int, block: torch.Tensor) -> None:
        rows = self.exclude[(self.exclude >= lo) & (self.exclude < lo + block.shape[0])] - lo
        best, worst = self.chunks[-1]
        if len(rows):
            rows = torch.from_numpy(rows).to(block.device)
            best.update(lo, block.index_fill(0, rows, float("-inf")))
            worst.update(lo, block.index_fill(0, rows, float("inf")))
        else:
            best.update(lo, block)
            worst.update(lo, block)

    def close(self) -> None:
        """One .npz with the four `topk_*` arrays of this rank's queries (keys: the file names without .npy)."""
        rows = {"proponents": [b.rows for b, _ in self.chunks], "opponents": [w.rows for _, w in self.chunks]}
        vals = {"proponents": [b.values for b, _ in self.chunks], "opponents": [w.values for _, w in self.chunks]}
        arrays = {}
        for side in ("proponents", "opponents"):
            arrays[f"topk_{side}"] = _stack(rows[side], self.k, np.int64)
            arrays[f"topk_{side}_scores"] = _stack(vals[side], self.k, np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.path, buffer.getvalue())


def _stack(parts: list[torch.Tensor], k: int, dtype) -> np.ndarray:
    if not parts:  # a rank with an empty query block
        return np.zeros((0, k), dtype)
    return np.concatenate([p.cpu().numpy() for p in parts]).astype(dtype, copy=False)

"""Streaming pieces of the scorer: shard read-ahead, where score blocks go (the full matrix or a running top-k), and
the ranks' part files stitched into the result.

`Attributor._score_my_queries` computes (train rows x query chunk) blocks shard by shard; a sink receives them into
this rank's part file (`RankParts`); rank 0 then assembles the parts into the staged result files.
"""
from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_write_bytes
from .results import TOPK_FILES


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


class RankParts:
    """The ranks' score parts under `out_dir/.parts`: rank r scores the query block `block(r)` into its own file
    (full columns, or its queries' top-k), and rank 0 stitches them into the staged result."""

    def __init__(self, out_dir: Path, n_train: int, n_query: int, world_size: int):
        self.root = Path(out_dir) / ".parts"
        self.n_train, self.n_query, self.world_size = n_train, n_query, world_size
        self.bounds = np.linspace(0, n_query, world_size + 1).round().astype(int)  # rank r: [bounds[r], bounds[r+1])

    def block(self, rank: int) -> tuple[int, int]:
        return int(self.bounds[rank]), int(self.bounds[rank + 1])

    def scores_path(self, rank: int) -> Path:
        return self.root / f"scores-rank{rank:04d}.npy"

    def topk_path(self, rank: int) -> Path:
        return self.root / f"topk-rank{rank:04d}.npz"

    def sink(self, rank: int, top_k: int | None, excluded_train: Sequence[int]) -> "FullScoresSink | TopKSink":
        """Where rank `rank`'s score blocks go: its top-k part with `top_k`, else its full columns."""
        if top_k:
            return TopKSink(self.topk_path(rank), top_k, excluded_train)
        return FullScoresSink(self.scores_path(rank), self.n_train, *self.block(rank))

    def assemble_scores(self, staging: Any, excluded: dict[str, list[int]]) -> None:
        """scores.npy (staged) from the ranks' column blocks (one rank: its part is the matrix); excluded train rows
        and query columns are NaN."""
        path = staging.path("scores.npy")
        if self.world_size == 1:
            os.replace(self.scores_path(0), path)
            scores = np.load(path, mmap_mode="r+") if excluded["train"] or excluded["query"] else None
        else:
            scores = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(self.n_train, self.n_query))
            for r in range(self.world_size):
                q_lo, q_hi = self.block(r)
                if q_hi > q_lo:
                    part = np.load(self.scores_path(r), mmap_mode="r")
                    for lo in range(0, self.n_train, 4096):
                        scores[lo:lo + 4096, q_lo:q_hi] = part[lo:lo + 4096]
        if scores is not None:
            scores[excluded["train"]] = np.nan
            scores[:, excluded["query"]] = np.nan
            scores.flush()
            del scores

    def assemble_topk(self, staging: Any, excluded: dict[str, list[int]]) -> None:
        """topk_*.npy (staged) from the ranks' query blocks, stacked in rank (= query) order; excluded queries get NaN
        scores."""
        parts = [np.load(self.topk_path(r)) for r in range(self.world_size)]
        for name in TOPK_FILES:
            array = np.concatenate([p[Path(name).stem] for p in parts])
            if name.endswith("_scores.npy") and excluded["query"]:
                array[excluded["query"]] = np.nan
            staging.save(name, array)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

"""TRAK's training features from a `GradientCapture`: each example's latest captured row before a snapshot.

A captured row is example i's projected loss gradient at the weights of the step it trained at. For a task whose
per-example loss gradient is a multiple of its margin gradient (cross-entropy: d loss/d output = -(1 - p_y) d margin/
d output; binary logistic; one-output regression), the ratio c_i is read off the step's own output gradient and
the margin feature is phi_i = -row_i / c_i, exactly, at the weights of that step. `LossToMargin` computes c_i and
checks the proportionality on every captured batch; a loss that is not the task's (label smoothing, class weights,
an extra term on the outputs) is detected there and the capture is not used for TRAK (post-hoc features instead).

`SnapshotWindows` keeps, per rank, each example's latest row (a memory-mapped (n_train, k) file, written on the
capture's writer thread) and freezes it when a snapshot is taken:

    <root>/latest-rank-RRRRR.npy              (n_train, k) float32, the latest row of every example on this rank
    <root>/<snapshot>/rank-RRRRR.npz          ids, steps, ratio c, Q of the rows captured before that snapshot
    <root>/<snapshot>/rank-RRRRR.features.npy their (m, k) float32 rows (written before the .npz: the .npz marks done)

Each window has its own projection (the capture switches seed after freezing a window, as TRAK projects every
checkpoint independently); a row taken before the switch never enters the next window.
`read_window` merges the ranks' files (the latest row per example) and keeps the rows of the window: captured in
the last `window_steps` optimizer steps before the snapshot (one epoch by default), with a valid ratio. Every other
example is featurized post hoc at the snapshot's weights by the caller: missing never means zero.
Plain torch/numpy.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import atomic_save_npy, atomic_write_bytes

RATIO_TOL = 1e-3        # relative residual of d loss/d output against -c d margin/d output that counts as exact
WELL_CONDITIONED = 1e-3  # c above this with a residual beyond RATIO_TOL: the training loss is not the task's


class LossToMargin:
    """Per captured batch: c_i with d loss_i/d output_i = -c_i d margin_i/d output_i, and the task's Q, from the
    step's own output and output gradient (the gradient the backward saw, times the capture's loss scale)."""

    def __init__(self, task):
        self.task = task
        self.mismatch: str | None = None   # why the training loss is not the task's (set once, never cleared)

    def __call__(self, pred: torch.Tensor, target, out_grad: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(ratio c, Q) per example, float64; c is NaN for rows whose ratio is not exact (or when mismatched)."""
        n = pred.shape[0]
        with torch.enable_grad():
            o = pred.detach().double().requires_grad_(True)
            dm, = torch.autograd.grad(self.task.margin(o, target).sum(), o)
        with torch.no_grad():
            q = self.task.loss_weight(pred.detach(), target).double().reshape(n)
            g, dm = out_grad.detach().double().reshape(n, -1), dm.reshape(n, -1)
            c = -(g * dm).sum(1) / (dm * dm).sum(1).clamp_min(1e-300)
            resid = (g + c[:, None] * dm).norm(dim=1)
            exact = (resid <= RATIO_TOL * g.norm(dim=1)) & (c > 0) & torch.isfinite(c)
            bad = ~exact & (c > WELL_CONDITIONED)
            if bool(bad.any()) and self.mismatch is None:
                i = int(bad.nonzero()[0])
                self.mismatch = (f"the training loss's output gradient is not a multiple of the {self.task.name} "
                                 f"margin's (relative residual {float(resid[i] / g[i].norm()):.2g} for an example "
                                 "with loss-to-margin ratio {:.3g}): the training step's loss is not the task's "
                                 "loss (label smoothing, class weights, an extra term?)".format(float(c[i])))
            c = torch.where(exact, c, torch.full_like(c, float("nan")))
        return c.cpu().numpy(), q.cpu().numpy()


@dataclass
class Window:
    """The captured rows of one snapshot's window, merged over ranks: `ids` (m,), `features` (m, k) float32 margin
    features phi = -row / c, `loss_weight` Q (m,), `steps` (m,) the step each row was captured at."""

    ids: np.ndarray
    features: np.ndarray
    loss_weight: np.ndarray
    steps: np.ndarray


class SnapshotWindows:
    """Each example's latest captured row on this rank, frozen per snapshot (see the module docstring)."""

    def __init__(self, root: str | Path, n_train: int, proj_dim: int, rank: int = 0):
        self.root, self.n_train, self.rank = Path(root), int(n_train), int(rank)
        self.root.mkdir(parents=True, exist_ok=True)
        self.latest = np.lib.format.open_memmap(self.root / f"latest-rank-{rank:05d}.npy", mode="w+",
                                                dtype=np.float32, shape=(self.n_train, int(proj_dim)))
        self.step = np.full(self.n_train, -1, dtype=np.int64)
        self.ratio = np.full(self.n_train, np.nan)
        self.q = np.full(self.n_train, np.nan)
        self.row_window = np.full(self.n_train, -1, dtype=np.int64)   # the window (projection) each row was taken in
        self.window_index = 0
        self.frozen: dict[str, int] = {}   # snapshot name -> its step

    def next_window(self) -> None:
        """Rows from now on belong to the next window (a new projection): older rows never enter it."""
        self.window_index += 1

    def add(self, features: torch.Tensor, meta: dict[str, np.ndarray]) -> None:
        """A chunk's rows (writer thread): each example keeps its latest row (rows come in capture order)."""
        ids = np.asarray(meta["ids"], dtype=np.int64)
        keep = ids >= 0
        if not keep.any():
            return
        pos = np.flatnonzero(keep)
        # the last row of each id in this chunk
        uniq, first_from_end = np.unique(ids[pos][::-1], return_index=True)
        rows = pos[len(pos) - 1 - first_from_end]
        if int(uniq.max()) >= self.n_train:
            raise ValueError(f"GradientCapture: a captured row has dataset id {int(uniq.max())} >= {self.n_train}")
        self.latest[uniq] = features[torch.from_numpy(rows)].cpu().numpy()
        self.step[uniq] = meta["step"][rows]
        self.ratio[uniq] = meta["ratio"][rows]
        self.q[uniq] = meta["q"][rows]
        self.row_window[uniq] = self.window_index

    def freeze(self, name: str, step: int) -> None:
        """Write the rows captured before snapshot `name` (taken after `step` optimizer steps)."""
        have = np.flatnonzero((self.step >= 0) & (self.step < step) & (self.row_window == self.window_index))
        out = self.root / name
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(out / f"rank-{self.rank:05d}.features.npy", np.asarray(self.latest[have]))
        buf = io.BytesIO()
        np.savez(buf, ids=have, steps=self.step[have], ratio=self.ratio[have], q=self.q[have],
                 snapshot_step=np.int64(step))
        atomic_write_bytes(out / f"rank-{self.rank:05d}.npz", buf.getvalue())
        self.frozen[name] = int(step)

    def close(self) -> None:
        """Drop the (n_train, k) latest-row file: the frozen windows are all that is read later."""
        path = Path(self.latest.filename)
        del self.latest
        path.unlink(missing_ok=True)


def read_window(root: str | Path, name: str, window_steps: int) -> Window | None:
    """The window of snapshot `name` merged over the ranks' files: each example's latest row, kept when it was
    captured within `window_steps` steps before the snapshot and its ratio is exact. None if it was never frozen."""
    folder = Path(root) / name
    metas = sorted(folder.glob("rank-*.npz"))
    if not metas:
        return None
    parts = []
    for path in metas:
        with np.load(path) as m:
            meta = {k: m[k] for k in m.files}
        feats = np.load(path.with_name(path.name[:-len(".npz")] + ".features.npy"), mmap_mode="r")
        if feats.shape[0] != len(meta["ids"]):
            raise ValueError(f"{path}: {len(meta['ids'])} ids for {feats.shape[0]} feature rows (a damaged window)")
        parts.append((meta, feats))
    snap_step = int(parts[0][0]["snapshot_step"])
    ids = np.concatenate([m["ids"] for m, _ in parts])
    steps = np.concatenate([m["steps"] for m, _ in parts])
    ratio = np.concatenate([m["ratio"] for m, _ in parts])
    q = np.concatenate([m["q"] for m, _ in parts])
    src = np.concatenate([np.stack([np.full(len(m["ids"]), r), np.arange(len(m["ids"]))], 1)
                          for r, (m, _) in enumerate(parts)]) if len(ids) else np.zeros((0, 2), dtype=np.int64)
    order = np.lexsort((steps, ids))                      # by id, then by step: the last of each id is its latest
    last = order[np.r_[ids[order][1:] != ids[order][:-1], True]] if len(ids) else order
    keep = last[(steps[last] >= snap_step - window_steps) & np.isfinite(ratio[last]) & (ratio[last] > 0)]
    keep = keep[np.argsort(ids[keep], kind="stable")]
    k = parts[0][1].shape[1]
    feats = np.empty((len(keep), k), dtype=np.float32)
    for r, (_, f) in enumerate(parts):
        sel = np.flatnonzero(src[keep, 0] == r)
        if len(sel):
            feats[sel] = f[src[keep[sel], 1]]
    feats = (feats / -ratio[keep][:, None]).astype(np.float32)   # phi = -row / c, divided in float64
    return Window(ids=ids[keep], features=feats, loss_weight=q[keep].astype(np.float32), steps=steps[keep])


@dataclass
class CapturedTrainSource:
    """The Attributor's train-side source from a capture: where its snapshot windows are, how long a window is, and
    the projector the rows were captured with (queries and rows a window lacks are featurized with the same one)."""

    root: Path
    window_steps: int
    projector: str            # "tensorsketch" | "factorized"
    layout: dict              # the capture projector's layout (requested dim, seed, allocation, kind)
    layout_hash: str
    param_names: list[str]
    task: str                 # the task the ratios were read with (the Attributor's output must be its margin)
    seeds: dict               # snapshot -> the projection seed of its window's rows (one projection per window)

    def make_projector(self, module, output, snapshot: str):
        """The projector of `snapshot`'s window (its seed), for the queries and the rows the window lacks."""
        from .capture import make_capture_projector

        lay = self.layout
        seed = int(self.seeds.get(snapshot, lay["seed"]))
        proj = make_capture_projector(self.projector, module, output, self.param_names, lay["requested_dim"],
                                      seed, lay["allocation"], lay["kind"])
        if {k: v for k, v in proj.layout.items() if k != "seed"} != {k: v for k, v in lay.items() if k != "seed"}:
            raise RuntimeError("captured TRAK: the post-hoc projector's layout differs from the capture's")
        return proj

    def describe(self) -> dict:
        return {"source": "GradientCapture snapshot windows", "projector": self.projector,
                "window_steps": self.window_steps, "layout_hash": self.layout_hash, "task": self.task,
                "seeds": dict(self.seeds)}

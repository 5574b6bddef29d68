"""On-disk feature store: plain `.npy` files per (snapshot, split, shard), a settings manifest checked on reopen.

Layout under `root`:
    settings.json                               what every feature depends on (projector, k, seed, model, ...),
                                                the shard size and the file format
    <snapshot>/fingerprint.json                 the weights the snapshot's features came from
    <snapshot>/<split>/ids.npy                  (n,) int64 dataset indices; row i of the split = example ids[i]
    <snapshot>/<split>/loss_weight-XXXXXX.npy   shard s, rows [s*shard_size, ...): (m,) float32 loss weights
                                                (TRAK's Q; ones when undefined)
    <snapshot>/<split>/shard-XXXXXX.npy         shard s: (m, k) float32 features

A shard's loss weights are written first, then its features under a temporary name renamed into place LAST,
so the presence of `shard-XXXXXX.npy` means "done": an interrupted run resumes and recomputes nothing finished
(a crash in between leaves loss weights that the rerun overwrites). Plain `.npy` (no zip, no CRC) is read
memory-mapped: no copy on read. Processes (DDP ranks, nodes on a shared filesystem) write disjoint shard
files, never the same file; only one process (rank 0) creates settings and ids.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


STORE_FORMAT = "npy-shards-v2"  # v1 (no "format" in settings.json): one .npz per shard


class StoreMismatchError(ValueError):
    """The store on disk was written with other settings or other weights than this run uses."""


def ensure_writable_dir(path: str | os.PathLike, what: str = "out_dir") -> Path:
    """Create `path` if needed and check we can write into it; raise a ValueError naming `what` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what}={str(path)!r} is not writable ({err.strerror}): pass a directory you can write to") from err
    return path


class FeatureStore:
    """Per-example features in shard files, written atomically (resumable per shard), read memory-mapped."""

    def __init__(self, root: str | os.PathLike, settings: dict, shard_size: int = 256, create: bool = True):
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.root = Path(root)
        self.settings = _jsonable(settings)
        self.shard_size = int(shard_size)
        if create:
            ensure_writable_dir(self.root, "the feature store directory")
        self._check_settings(create)

    # -- settings and snapshot identity ---------------------------------------------------------
    def _check_settings(self, create: bool) -> None:
        path = self.root / "settings.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("format") != STORE_FORMAT:
                raise StoreMismatchError(
                    f"the feature store at {self.root} was written by an older lightning-attrib (format "
                    f"{old.get('format', 'npz-shards-v1')!r}, this version reads {STORE_FORMAT!r}). Delete that "
                    "directory to recompute the features, or use a new out_dir."
                )
            stored, current = old.get("settings", {}), self.settings
            diff = {k: (stored.get(k), current.get(k)) for k in set(stored) | set(current) if stored.get(k) != current.get(k)}
            if diff:
                details = ", ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise StoreMismatchError(
                    f"the feature store at {self.root} was written with other settings ({details}). "
                    "Use a new out_dir, or delete that directory to recompute the features."
                )
            if old.get("shard_size") != self.shard_size:
                raise StoreMismatchError(
                    f"the feature store at {self.root} uses shard_size={old.get('shard_size')}, this run {self.shard_size}: "
                    "use the same shard_size or a new out_dir"
                )
        elif create:
            _atomic_write(path, json.dumps({"settings": self.settings, "shard_size": self.shard_size,
                                            "format": STORE_FORMAT}, indent=2))

    def register_snapshot(self, snapshot: str, fingerprint: str) -> None:
        """Record which weights `snapshot` means; refuse if the store holds features of other weights."""
        path = self.root / snapshot / "fingerprint.json"
        if path.exists():
            stored = json.loads(path.read_text())["fingerprint"]
            if stored != fingerprint:
                raise StoreMismatchError(
                    f"snapshot {snapshot!r} in {self.root} was featurized from other weights (fingerprint {stored[:12]} "
                    f"vs {fingerprint[:12]} now): the checkpoints changed. Use a new out_dir or delete {path.parent}."
                )
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps({"fingerprint": fingerprint}))

    # -- splits and shards ----------------------------------------------------------------------
    def split_dir(self, snapshot: str, split: str) -> Path:
        return self.root / snapshot / split

    def num_shards(self, n: int) -> int:
        return (n + self.shard_size - 1) // self.shard_size

    def shard_range(self, shard: int, n: int) -> tuple[int, int]:
        return shard * self.shard_size, min(n, (shard + 1) * self.shard_size)

    def create(self, snapshot: str, split: str, ids: np.ndarray) -> None:
        """Record the examples of a split (idempotent; refuses if the split holds other examples)."""
        d = self.split_dir(snapshot, split)
        ids = np.asarray(ids, dtype=np.int64)
        if (d / "ids.npy").exists():
            old = np.load(d / "ids.npy")
            if old.shape != ids.shape or not np.array_equal(old, ids):
                raise StoreMismatchError(
                    f"{d} holds features of other examples ({old.shape[0]} ids) than this run ({ids.shape[0]} ids): "
                    f"the dataset changed. Use a new out_dir or delete {d}."
                )
            return
        d.mkdir(parents=True, exist_ok=True)
        _atomic_save(d / "ids.npy", ids)

    def exists(self, snapshot: str, split: str) -> bool:
        return (self.split_dir(snapshot, split) / "ids.npy").exists()

    def ids(self, snapshot: str, split: str) -> np.ndarray:
        return np.load(self.split_dir(snapshot, split) / "ids.npy")

    def _shard_path(self, snapshot: str, split: str, shard: int) -> Path:
        """The features file: its presence marks the shard done."""
        return self.split_dir(snapshot, split) / f"shard-{shard:06d}.npy"

    def _loss_weight_path(self, snapshot: str, split: str, shard: int) -> Path:
        return self.split_dir(snapshot, split) / f"loss_weight-{shard:06d}.npy"

    def is_done(self, snapshot: str, split: str, shard: int) -> bool:
        return self._shard_path(snapshot, split, shard).exists()

    def write_shard(self, snapshot: str, split: str, shard: int, features: np.ndarray, loss_weight: np.ndarray) -> None:
        """Write one finished shard: loss weights, then the features renamed into place last (marks it done)."""
        features, loss_weight = np.asarray(features), np.asarray(loss_weight)
        if features.ndim != 2 or loss_weight.shape != (features.shape[0],):
            raise ValueError(f"a shard needs (m, k) features and (m,) loss weights, got {features.shape} and "
                             f"{loss_weight.shape}")
        _atomic_save(self._loss_weight_path(snapshot, split, shard), loss_weight.astype(np.float32, copy=False))
        _atomic_save(self._shard_path(snapshot, split, shard), features.astype(np.float32, copy=False))

    def read_features(self, snapshot: str, split: str, shard: int, mmap: bool = True) -> np.ndarray:
        """(m, k) float32 features of one shard. `mmap=True` maps the file copy-on-write: nothing is copied up
        front, and the array is writable (torch.from_numpy takes it) without writes ever reaching the file.
        `mmap=False` reads it into memory now (what a prefetching thread wants)."""
        return np.load(self._shard_path(snapshot, split, shard), mmap_mode="c" if mmap else None)

    def read_loss_weight(self, snapshot: str, split: str, shard: int) -> np.ndarray:
        return np.load(self._loss_weight_path(snapshot, split, shard))

    def read_shard(self, snapshot: str, split: str, shard: int, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(features (m, k) float32, loss_weight (m,) float32) of one shard; see `read_features` for `mmap`."""
        return self.read_features(snapshot, split, shard, mmap), self.read_loss_weight(snapshot, split, shard)

    def pending_shards(self, snapshot: str, split: str) -> list[int]:
        n = len(self.ids(snapshot, split))
        return [s for s in range(self.num_shards(n)) if not self.is_done(snapshot, split, s)]

    def is_complete(self, snapshot: str, split: str) -> bool:
        return self.exists(snapshot, split) and not self.pending_shards(snapshot, split)

    def iter_shards(self, snapshot: str, split: str, shards: list[int] | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield `(lo, hi, features, loss_weight)` shard by shard: the scorer streams, never loading a split whole."""
        n = len(self.ids(snapshot, split))
        for s in range(self.num_shards(n)) if shards is None else shards:
            if not self.is_done(snapshot, split, s):
                raise FileNotFoundError(
                    f"shard {s} of {snapshot}/{split} in {self.root} is missing: featurization did not finish. "
                    "Run attribution again with the same out_dir; finished shards are reused."
                )
            lo, hi = self.shard_range(s, n)
            feats, weights = self.read_shard(snapshot, split, s)
            yield lo, hi, feats, weights

    def load(self, snapshot: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Whole split in memory (tests and small data only)."""
        parts = list(self.iter_shards(snapshot, split))
        if not parts:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
        return np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save under a temporary name (one that never matches `shard-*.npy`), then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a path not ending in it
        np.save(fh, array)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)

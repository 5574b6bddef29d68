"""On-disk feature store: one file per (snapshot, split, shard), a settings manifest checked on reopen.

Layout under `root`:
    settings.json                               what every feature depends on (projector, k, seed, model, ...)
    <snapshot>/fingerprint.json                 the weights the snapshot's features came from
    <snapshot>/<split>/ids.npy                  (n,) int64 dataset indices; row i of the split = example ids[i]
    <snapshot>/<split>/shard-XXXXXX.npz         rows [s*shard_size, ...): `features` (m, k) float32 and
                                                `loss_weight` (m,) float32 (TRAK's Q; ones when undefined)

A shard file is written under a temporary name and renamed, so its presence means "done": an interrupted
run resumes and recomputes nothing finished. Processes (DDP ranks, nodes on a shared filesystem) write
disjoint shard files, never the same file; only one process (rank 0) creates settings and ids.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


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
    """Memmapped per-example features, resumable per shard."""

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
            _atomic_write(path, json.dumps({"settings": self.settings, "shard_size": self.shard_size}, indent=2))

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
        tmp = d / f"ids.tmp{os.getpid()}.npy"
        np.save(tmp, ids)
        os.replace(tmp, d / "ids.npy")

    def exists(self, snapshot: str, split: str) -> bool:
        return (self.split_dir(snapshot, split) / "ids.npy").exists()

    def ids(self, snapshot: str, split: str) -> np.ndarray:
        return np.load(self.split_dir(snapshot, split) / "ids.npy")

    def _shard_path(self, snapshot: str, split: str, shard: int) -> Path:
        return self.split_dir(snapshot, split) / f"shard-{shard:06d}.npz"

    def is_done(self, snapshot: str, split: str, shard: int) -> bool:
        return self._shard_path(snapshot, split, shard).exists()

    def write_shard(self, snapshot: str, split: str, shard: int, features: np.ndarray, loss_weight: np.ndarray) -> None:
        """Write one finished shard atomically (its presence marks it done)."""
        path = self._shard_path(snapshot, split, shard)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, features=np.asarray(features, dtype=np.float32), loss_weight=np.asarray(loss_weight, dtype=np.float32))
        os.replace(tmp, path)

    def read_shard(self, snapshot: str, split: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self._shard_path(snapshot, split, shard)) as z:
            return z["features"], z["loss_weight"]

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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)

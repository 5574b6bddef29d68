"""On-disk feature store: plain `.npy` files per (snapshot, split, shard), content-checked on reuse.

Layout under `root`:
    settings.json                               what every feature depends on (projector, k, seed, model, ...),
                                                the shard size and the file format
    <snapshot>/fingerprint.json                 the weights the snapshot's features came from
    <snapshot>/<split>/ids.npy                  (n,) int64 dataset indices; row i of the split = example ids[i]
    <snapshot>/<split>/loss_weight-XXXXXX.npy   shard s, rows [s*shard_size, ...): (m,) float32 loss weights
                                                (TRAK's Q; ones when undefined)
    <snapshot>/<split>/shard-XXXXXX.npy         shard s: (m, k) float32 features
    <snapshot>/<split>/shard-XXXXXX.json        shard s's record: size and SHA-256 of both files, the fingerprint
                                                of the data it was computed from, the rows excluded as non-finite

A shard's loss weights are written first, then its features, then its record, each under a temporary name
renamed into place; the record comes LAST, so its presence (with the features) means "done": an interrupted run
resumes and recomputes nothing finished. The record makes a shard content-addressed: a shard whose bytes do not
match it (flipped, truncated) is named and recomputed on resume, and one whose data fingerprint differs from the
data of this run is recomputed. Plain `.npy` is read memory-mapped (no copy on read), after a one-time checksum
per process (none for a shard this process wrote: its checksum was taken from the bytes as they were written). Processes (DDP ranks, nodes on a shared filesystem) write disjoint shard files, never the same file;
only one process (rank 0) creates settings and ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .io import atomic_save_npy, atomic_write_json, file_sha256

STORE_FORMAT = "npy-shards-v3"  # v3: per-shard records; v2: no records; v1 (no "format"): one .npz per shard


class CorruptShardError(ValueError):
    """A shard file whose bytes do not match its record (corrupted or truncated)."""


class StoreMismatchError(ValueError):
    """The store on disk was written with other settings or other weights than this run uses."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def ensure_writable_dir(path: str | os.PathLike, what: str = "out_dir") -> Path:
    """Create `path` if needed and check we can write into it; raise a ValueError naming `what` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe{os.getpid()}"  # per process: DDP ranks may probe one directory at once
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
        self._checked: set = set()  # shard files already checked against their records by this process
        if create:
            ensure_writable_dir(self.root, "the feature store directory")
        self._check_settings(create)

    # -- settings and snapshot identity ---------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike, settings: dict, shard_size: int = 256) -> "FeatureStore":
        """The store at `root` for these settings: an existing one when it was written with exactly them, else a
        fresh one (the old features are deleted, with a warning saying what changed). Never refuses."""
        try:
            return cls(root, settings, shard_size)
        except StoreMismatchError as err:
            warnings.warn(f"recomputing all features: {err.reason}", RuntimeWarning, stacklevel=2)
            shutil.rmtree(root)
            return cls(root, settings, shard_size)

    def _check_settings(self, create: bool) -> None:
        path = self.root / "settings.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = {"format": "unreadable settings.json"}
            if old.get("format") != STORE_FORMAT:
                raise StoreMismatchError(
                    f"the feature store at {self.root} was written by an older lightning-attrib (format "
                    f"{old.get('format', 'npz-shards-v1')!r}, this version reads {STORE_FORMAT!r}). Delete that "
                    "directory to recompute the features, or use a new out_dir.",
                    reason=f"the store at {self.root} has format {old.get('format', 'npz-shards-v1')!r}, not "
                           f"{STORE_FORMAT!r}",
                )
            stored, current = old.get("settings", {}), self.settings
            diff = {k: (stored.get(k), current.get(k)) for k in set(stored) | set(current) if stored.get(k) != current.get(k)}
            if diff:
                details = ", ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise StoreMismatchError(
                    f"the feature store at {self.root} was written with other settings ({details}). "
                    "Use a new out_dir, or delete that directory to recompute the features.",
                    reason=f"the settings changed ({details})",
                )
            if old.get("shard_size") != self.shard_size:
                raise StoreMismatchError(
                    f"the feature store at {self.root} uses shard_size={old.get('shard_size')}, this run {self.shard_size}: "
                    "use the same shard_size or a new out_dir",
                    reason=f"shard_size changed ({old.get('shard_size')} -> {self.shard_size})",
                )
        elif create:
            atomic_write_json(path, {"settings": self.settings, "shard_size": self.shard_size, "format": STORE_FORMAT})

    def register_snapshot(self, snapshot: str, fingerprint: str, replace: bool = False) -> None:
        """Record which weights `snapshot` means. If the store holds its features of other weights: refuse, or with
        `replace` delete them (with a warning) so that they are recomputed."""
        path = self.root / snapshot / "fingerprint.json"
        if path.exists():
            try:
                stored = json.loads(path.read_text())["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):
                stored = "unreadable"  # damaged: its features cannot be trusted either
            if stored != fingerprint and replace:
                warnings.warn(f"recomputing the features of snapshot {snapshot!r}: its weights changed",
                              RuntimeWarning, stacklevel=2)
                shutil.rmtree(path.parent)
            elif stored != fingerprint:
                raise StoreMismatchError(
                    f"snapshot {snapshot!r} in {self.root} was featurized from other weights (fingerprint {stored[:12]} "
                    f"vs {fingerprint[:12]} now): the checkpoints changed. Use a new out_dir or delete {path.parent}."
                )
            else:
                return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"fingerprint": fingerprint})

    # -- splits and shards ----------------------------------------------------------------------
    def split_dir(self, snapshot: str, split: str) -> Path:
        return self.root / snapshot / split

    def num_shards(self, n: int) -> int:
        return (n + self.shard_size - 1) // self.shard_size

    def shard_range(self, shard: int, n: int) -> tuple[int, int]:
        return shard * self.shard_size, min(n, (shard + 1) * self.shard_size)

    def create(self, snapshot: str, split: str, ids: np.ndarray, replace: bool = False) -> None:
        """Record the examples of a split (idempotent). If the split holds other examples: refuse, or with
        `replace` delete its features so that they are recomputed."""
        d = self.split_dir(snapshot, split)
        ids = np.asarray(ids, dtype=np.int64)
        if (d / "ids.npy").exists():
            try:
                old = np.load(d / "ids.npy")
            except (OSError, ValueError):
                old = np.zeros(0, np.int64)
            if (old.shape != ids.shape or not np.array_equal(old, ids)) and replace:
                warnings.warn(f"recomputing the {split} features of snapshot {snapshot!r}: the store holds "
                              f"{old.shape[0]} examples, this run {ids.shape[0]}", RuntimeWarning, stacklevel=2)
                shutil.rmtree(d)
            elif old.shape != ids.shape or not np.array_equal(old, ids):
                raise StoreMismatchError(
                    f"{d} holds features of other examples ({old.shape[0]} ids) than this run ({ids.shape[0]} ids): "
                    f"the dataset changed. Use a new out_dir or delete {d}."
                )
            else:
                return
        d.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(d / "ids.npy", ids)

    def exists(self, snapshot: str, split: str) -> bool:
        return (self.split_dir(snapshot, split) / "ids.npy").exists()

    def ids(self, snapshot: str, split: str) -> np.ndarray:
        return np.load(self.split_dir(snapshot, split) / "ids.npy")

    def _shard_path(self, snapshot: str, split: str, shard: int) -> Path:
        """The features file."""
        return self.split_dir(snapshot, split) / f"shard-{shard:06d}.npy"

    def _loss_weight_path(self, snapshot: str, split: str, shard: int) -> Path:
        return self.split_dir(snapshot, split) / f"loss_weight-{shard:06d}.npy"

    def _record_path(self, snapshot: str, split: str, shard: int) -> Path:
        """The shard's record: written last, its presence marks the shard done."""
        return self.split_dir(snapshot, split) / f"shard-{shard:06d}.json"

    def is_done(self, snapshot: str, split: str, shard: int) -> bool:
        return self._record_path(snapshot, split, shard).exists() and self._shard_path(snapshot, split, shard).exists()

    def write_shard(self, snapshot: str, split: str, shard: int, features: np.ndarray, loss_weight: np.ndarray,
                    data: str | None = None, excluded: list[int] | tuple = ()) -> None:
        """Write one finished shard: loss weights, features, then its record (checksums, the fingerprint `data` of
        the inputs it came from, the rows `excluded` as non-finite), renamed into place last (marks it done)."""
        features, loss_weight = np.asarray(features), np.asarray(loss_weight)
        if features.ndim != 2 or loss_weight.shape != (features.shape[0],):
            raise ValueError(f"a shard needs (m, k) features and (m,) loss weights, got {features.shape} and "
                             f"{loss_weight.shape}")
        self._record_path(snapshot, split, shard).unlink(missing_ok=True)  # not done while its files change
        paths = {"loss_weight": self._loss_weight_path(snapshot, split, shard),
                 "features": self._shard_path(snapshot, split, shard)}
        record = {"rows": int(features.shape[0]), "data": data, "excluded": [int(r) for r in excluded]}
        for key, array in (("loss_weight", loss_weight), ("features", features)):
            digest = hashlib.sha256()   # hashed as written: one pass over the bytes, no read-back
            atomic_save_npy(paths[key], array.astype(np.float32, copy=False), hasher=digest)
            record[key] = {"size": paths[key].stat().st_size, "sha256": digest.hexdigest()}
        atomic_write_json(self._record_path(snapshot, split, shard), record)
        # What this process just wrote is what the record says (a read-back would only read the same bytes from
        # the page cache): no check on its first read. Any later change to the file (another writer, a
        # truncation) changes its inode/size/mtime key and is checked again.
        self._checked.add(self._file_key(paths["features"]))

    def record(self, snapshot: str, split: str, shard: int) -> dict:
        """The shard's record (see `write_shard`); {} when missing or unreadable."""
        try:
            return json.loads(self._record_path(snapshot, split, shard).read_text())
        except (OSError, ValueError):
            return {}

    def check_shard(self, snapshot: str, split: str, shard: int) -> str | None:
        """What is wrong with a finished shard's files (None: they match its record)."""
        record = self.record(snapshot, split, shard)
        if not record:
            return "its record is missing or unreadable"
        for key, path in (("features", self._shard_path(snapshot, split, shard)),
                          ("loss_weight", self._loss_weight_path(snapshot, split, shard))):
            entry = record.get(key) or {}
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return f"{path} is missing"
            if size != entry.get("size"):
                return f"{path} has {size} bytes, its record says {entry.get('size')} (truncated or overwritten)"
            if file_sha256(path) != entry.get("sha256"):
                return f"{path} does not match its checksum (corrupted)"
        self._checked.add(self._file_key(self._shard_path(snapshot, split, shard)))
        return None

    @staticmethod
    def _file_key(path: Path) -> tuple:
        """A file's identity for "already checked": path, inode, size, modification time."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return str(path), None
        return str(path), (st.st_ino, st.st_size, st.st_mtime_ns)

    def discard_shard(self, snapshot: str, split: str, shard: int) -> None:
        """Forget a shard (it becomes pending): record first, then its files."""
        for path in (self._record_path(snapshot, split, shard), self._shard_path(snapshot, split, shard),
                     self._loss_weight_path(snapshot, split, shard)):
            path.unlink(missing_ok=True)

    def _verified(self, snapshot: str, split: str, shard: int) -> None:
        """Check a shard against its record once per process (and again if its file changes); else raise."""
        if self._file_key(self._shard_path(snapshot, split, shard)) in self._checked:
            return
        problem = self.check_shard(snapshot, split, shard)
        if problem:
            raise CorruptShardError(
                f"shard {shard} of {snapshot}/{split} in {self.root} is unusable: {problem}. Run attribution again "
                "with the same out_dir: the shard is recomputed (the others are reused)."
            )

    def read_features(self, snapshot: str, split: str, shard: int, mmap: bool = True) -> np.ndarray:
        """(m, k) float32 features of one shard, checked against its record. `mmap=True` maps the file
        copy-on-write: nothing is copied up front, and the array is writable (torch.from_numpy takes it) without
        writes ever reaching the file. `mmap=False` reads it into memory now (what a prefetching thread wants)."""
        self._verified(snapshot, split, shard)
        return np.load(self._shard_path(snapshot, split, shard), mmap_mode="c" if mmap else None)

    def read_loss_weight(self, snapshot: str, split: str, shard: int) -> np.ndarray:
        self._verified(snapshot, split, shard)
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

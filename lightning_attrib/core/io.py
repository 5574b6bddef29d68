"""The one way this package writes a file, checksums it and derives a seed.

Every file a run leaves is written under a temporary name in the same directory and renamed into place
(`os.replace` is atomic on POSIX filesystems, NFS and Lustre included), so a reader never sees half a file.
Temporary names start with "." and end in ".tmp<pid>", so no glob of finished files ever matches them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and one rename."""
    path = Path(path)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON (indented, non-JSON values via `str`) written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


class _HashingWriter:
    """A write-only file object that feeds every byte written to a hash on its way to the file."""

    def __init__(self, fh, hasher):
        self.fh, self.hasher = fh, hasher

    def write(self, data) -> int:
        self.hasher.update(data)
        return self.fh.write(data)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray, hasher=None) -> Path:
    """`np.save` through a temporary file object (np.save would append ".npy" to a bare temporary path).

    `hasher` (e.g. `hashlib.sha256()`) is fed the file's bytes as they are written: the checksum of what was
    written, without reading the file back (`file_sha256` of the result gives the same digest)."""
    path = Path(path)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as fh:
        np.save(fh if hasher is None else _HashingWriter(fh, hasher), np.asarray(array))
    os.replace(tmp, path)
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable 60-bit seed from `seed` and names (SHA-1 of their text; never Python's per-process salted `hash`).

    The one seed scheme of the package: per-snapshot projections, per-layer sketches, LiSSA minibatches and
    subset masks all derive their seeds here from the user's seed and what they are for."""
    text = ":".join(str(p) for p in (int(seed), *parts))
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


def tensor_bytes(t) -> memoryview:
    """The raw bytes of a tensor or array (C order, on the CPU; any dtype, bfloat16 included), without a copy
    when the tensor is already contiguous on the CPU (hashlib reads the buffer directly)."""
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())
    return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))


class BatchFingerprint:
    """SHA-256 of the data a run feeds the model, from its collated batches as they pass (no second read).

    Each leaf of the batch structure (input tensor, target tensor, ...) is hashed on its own, row after row, so the
    fingerprint of a range of examples does not depend on how they were grouped into batches (batch_size)."""

    def __init__(self):
        self._leaves: list = []      # one hasher per leaf position
        self._meta: list[str] = []   # per leaf: type, dtype and shape of one row

    def update(self, batch: Any) -> None:
        leaves = list(_leaves(batch))
        if not self._leaves:
            self._leaves = [hashlib.sha256() for _ in leaves]
            self._meta = [meta for meta, _ in leaves]
        elif [meta for meta, _ in leaves] != self._meta:  # the batch structure changed midway: record it
            self._meta.append("|".join(meta for meta, _ in leaves))
            self._leaves.extend(hashlib.sha256() for _ in range(len(leaves) - len(self._leaves)))
        for h, (_, data) in zip(self._leaves, leaves):
            h.update(data)

    def hexdigest(self) -> str:
        h = hashlib.sha256(";".join(self._meta).encode())
        for leaf in self._leaves:
            h.update(leaf.digest())
        return h.hexdigest()


def _leaves(obj: Any):
    """(row description, bytes) for every leaf of a collated batch, in a fixed order."""
    import torch

    if isinstance(obj, (torch.Tensor, np.ndarray)):
        shape = tuple(obj.shape[1:]) if obj.ndim else ()
        yield f"{type(obj).__name__}:{obj.dtype}:{shape}", tensor_bytes(obj)
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from ((f"{key}.{m}", d) for m, d in _leaves(obj[key]))
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, (str, bytes, int, float, bool)) for v in obj):
        yield "scalars", b"".join(repr(v).encode() + b"\0" for v in obj)  # a collated list of strings, say
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from ((f"{i}.{m}", d) for m, d in _leaves(v))
    else:
        yield type(obj).__name__, repr(obj).encode() + b"\0"

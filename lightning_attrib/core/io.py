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


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """`np.save` through a temporary file object (np.save would append ".npy" to a bare temporary path)."""
    path = Path(path)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(array))
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

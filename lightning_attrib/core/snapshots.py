"""The snapshot directory's index: which snapshot files a `CheckpointCapture` run wrote, so a reader scores exactly
those (a deleted, truncated or replaced file is refused with its path, never silently skipped).

    snapshots.json   {"format": ..., "version": 1, "snapshots": [{name, file, step, epoch, lr, size, sha256}, ...]}

Entries are in capture order (increasing step); `file` is relative to the directory.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write_bytes, atomic_write_json, file_sha256
from .pipeline import Snapshot

INDEX_NAME = "snapshots.json"
INDEX_FORMAT = "lightning-attrib-snapshots"
INDEX_VERSION = 1


def save_snapshot(path: str | os.PathLike, payload: dict[str, Any]) -> dict[str, Any]:
    """torch.save `payload` to `path` atomically; returns the file's {size, sha256} (hashed in memory, no re-read)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_snapshot_index(dirpath: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """The index of the snapshots in `dirpath` (records: name, path, step, epoch, lr, size, sha256)."""
    dirpath = Path(dirpath)
    entries = [{"name": r["name"], "file": Path(r["path"]).name, "step": r.get("step"), "epoch": r.get("epoch"),
                "lr": r.get("lr"), "size": r.get("size"), "sha256": r.get("sha256")} for r in records]
    return atomic_write_json(dirpath / INDEX_NAME, {"format": INDEX_FORMAT, "version": INDEX_VERSION,
                                                     "snapshots": entries})


def read_snapshot_index(dirpath: str | os.PathLike, verify: bool = True) -> list[Snapshot] | None:
    """The snapshots listed in `dirpath/snapshots.json` (None when there is no index: an older or foreign folder).

    Every listed file must exist with its recorded size (and, with `verify`, its SHA-256); otherwise the error
    names the file and says what to do."""
    dirpath = Path(dirpath)
    path = dirpath / INDEX_NAME
    if not path.exists():
        return None
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT or int(index.get("version", 0)) > INDEX_VERSION:
        raise ValueError(f"{path} is not a snapshot index this version reads (format {index.get('format')!r}, "
                         f"version {index.get('version')!r}): upgrade lightning-attrib or remove the file")
    snaps = []
    for e in index["snapshots"]:
        file = dirpath / e["file"]
        if not file.exists():
            raise FileNotFoundError(
                f"snapshot {file} is listed in {path} but missing: scoring without it would silently use fewer "
                "snapshots. Restore the file, or remove its entry from the index to score without it on purpose.")
        size = file.stat().st_size
        if (e.get("size") is not None and size != e["size"]) or (
                verify and e.get("sha256") and file_sha256(file) != e["sha256"]):
            raise ValueError(f"snapshot {file} differs from what {path} recorded (size {size} vs {e.get('size')}"
                             f"{', or its checksum' if verify else ''}): the file was truncated or replaced. Restore "
                             "it or re-create the snapshots.")
        snaps.append(Snapshot(e["name"], path=str(file), lr=e.get("lr"), step=e.get("step"), epoch=e.get("epoch")))
    return snaps

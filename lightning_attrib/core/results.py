"""The files an attribution run leaves (the contract other tools read) and `load_results` to read them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULT_FILES = ("manifest.json", "scores.npy", "self_influence.npy", "train_ids.npy", "query_ids.npy")


@dataclass
class AttributionResult:
    """Scores (n_train, n_query) — positive = the training example helps the query — with ids and manifest."""

    out_dir: Path
    manifest: dict
    scores: np.ndarray
    self_influence: np.ndarray
    train_ids: np.ndarray
    query_ids: np.ndarray

    def _column(self, query: int) -> np.ndarray:
        if not 0 <= query < self.scores.shape[1]:
            raise IndexError(f"query {query} out of range: this result has {self.scores.shape[1]} queries")
        return np.asarray(self.scores[:, query])

    def top_proponents(self, query: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(train dataset ids, scores) of the k training examples that help query position `query` most."""
        col = self._column(query)
        order = np.argsort(-col, kind="stable")[:k]
        return self.train_ids[order], col[order]

    def top_opponents(self, query: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(train dataset ids, scores) of the k training examples that hurt the query most."""
        col = self._column(query)
        order = np.argsort(col, kind="stable")[:k]
        return self.train_ids[order], col[order]

    def suspects(self, k: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """(train ids, self-influence) of the k most self-influential training examples (likely mislabeled)."""
        order = np.argsort(-self.self_influence, kind="stable")[:k]
        return self.train_ids[order], self.self_influence[order]


def load_results(out_dir: str | os.PathLike, mmap: bool = True) -> AttributionResult:
    """Read a finished run's files (no Lightning needed); scores are memory-mapped by default."""
    out_dir = Path(out_dir)
    missing = [f for f in RESULT_FILES if not (out_dir / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{out_dir} is not a finished attribution result (missing {missing}). Run attribution with out_dir={str(out_dir)!r}; "
            "an interrupted run resumes from its feature store."
        )
    return AttributionResult(
        out_dir=out_dir,
        manifest=json.loads((out_dir / "manifest.json").read_text()),
        scores=np.load(out_dir / "scores.npy", mmap_mode="r" if mmap else None),
        self_influence=np.load(out_dir / "self_influence.npy"),
        train_ids=np.load(out_dir / "train_ids.npy"),
        query_ids=np.load(out_dir / "query_ids.npy"),
    )


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save via a temporary name, so a reader never sees half a file."""
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def save_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)

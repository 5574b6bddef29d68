"""The files an attribution run leaves (the contract other tools read) and `load_results` to read them.

A run writes either the full score matrix or, with `Attributor(top_k=k)`, only each query's top k:

    manifest.json, self_influence.npy, train_ids.npy, query_ids.npy     always
    scores.npy                    (n_train, n_query) float32            full result
    topk_proponents.npy           (n_query, k) int64 train row positions, highest score first   top-k result
    topk_proponents_scores.npy    (n_query, k) float32 their scores
    topk_opponents.npy            (n_query, k) int64 train row positions, lowest score first
    topk_opponents_scores.npy     (n_query, k) float32 their scores

Row positions index `train_ids` (the train dataset ids); `manifest["top_k"]` tells which kind a result is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COMMON_FILES = ("manifest.json", "self_influence.npy", "train_ids.npy", "query_ids.npy")
RESULT_FILES = ("manifest.json", "scores.npy", "self_influence.npy", "train_ids.npy", "query_ids.npy")
TOPK_FILES = ("topk_proponents.npy", "topk_proponents_scores.npy", "topk_opponents.npy", "topk_opponents_scores.npy")
TOPK_RESULT_FILES = COMMON_FILES + TOPK_FILES


class FullScoresUnavailable(ValueError):
    """Asked a top-k-only result for its full score matrix."""


@dataclass
class TopKScores:
    """Each query's k best (proponents, highest first) and worst (opponents, lowest first) training rows."""

    proponents: np.ndarray          # (n_query, k) int64 train row positions
    proponent_scores: np.ndarray    # (n_query, k) float32
    opponents: np.ndarray           # (n_query, k) int64
    opponent_scores: np.ndarray     # (n_query, k) float32

    @property
    def k(self) -> int:
        return int(self.proponents.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """File name -> array, in the result-file contract's names."""
        return dict(zip(TOPK_FILES, (self.proponents, self.proponent_scores, self.opponents, self.opponent_scores)))


class AttributionResult:
    """Scores (n_train, n_query) — positive = the training example helps the query — with ids and manifest.

    A top-k result (`Attributor(top_k=k)`) has no full matrix: `scores` raises `FullScoresUnavailable`,
    `top_proponents` / `top_opponents` answer for up to k, and `topk` holds the arrays.
    """

    def __init__(self, out_dir: Path, manifest: dict, scores: np.ndarray | None, self_influence: np.ndarray,
                 train_ids: np.ndarray, query_ids: np.ndarray, topk: TopKScores | None = None):
        if scores is None and topk is None:
            raise ValueError("an AttributionResult needs the score matrix or top-k scores")
        self.out_dir, self.manifest = Path(out_dir), manifest
        self._scores, self.topk = scores, topk
        self.self_influence, self.train_ids, self.query_ids = self_influence, train_ids, query_ids

    def __repr__(self) -> str:
        kind = f"top_k={self.top_k}" if self._scores is None else f"scores {tuple(self._scores.shape)}"
        return f"AttributionResult({str(self.out_dir)!r}, {kind})"

    @property
    def has_scores(self) -> bool:
        """Whether the full score matrix is there (False for a top-k result)."""
        return self._scores is not None

    @property
    def top_k(self) -> int | None:
        """k of a top-k result; None when the full matrix is there."""
        return None if self._scores is not None else self.topk.k

    @property
    def n_query(self) -> int:
        return len(self.query_ids)

    @property
    def scores(self) -> np.ndarray:
        """(n_train, n_query) float32 scores (memory-mapped by default)."""
        if self._scores is None:
            raise FullScoresUnavailable(
                f"the result in {self.out_dir} keeps only each query's top {self.top_k} proponents and opponents "
                f"(Attributor(top_k={self.top_k})), not the full score matrix. Use top_proponents / top_opponents / "
                "topk, or rerun attribution without top_k (same out_dir: the features are reused)."
            )
        return self._scores

    @property
    def files(self) -> tuple[str, ...]:
        """The names of this result's files in `out_dir`."""
        return RESULT_FILES if self._scores is not None else TOPK_RESULT_FILES

    def _check_query(self, query: int) -> None:
        if not 0 <= query < self.n_query:
            raise IndexError(f"query {query} out of range: this result has {self.n_query} queries")

    def _top(self, query: int, k: int, proponents: bool) -> tuple[np.ndarray, np.ndarray]:
        self._check_query(query)
        if self._scores is not None:
            col = np.asarray(self._scores[:, query])
            order = np.argsort(-col if proponents else col, kind="stable")[:k]
            return self.train_ids[order], col[order]
        if k > self.topk.k:
            raise ValueError(f"asked for the top {k}, but this result keeps the top {self.topk.k} per query "
                             f"(Attributor(top_k={self.topk.k})): ask for k <= {self.topk.k} or rerun with a larger "
                             "top_k")
        rows, vals = ((self.topk.proponents, self.topk.proponent_scores) if proponents
                      else (self.topk.opponents, self.topk.opponent_scores))
        return self.train_ids[rows[query, :k]], np.asarray(vals[query, :k])

    def top_proponents(self, query: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(train dataset ids, scores) of the k training examples that help query position `query` most."""
        return self._top(query, k, proponents=True)

    def top_opponents(self, query: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(train dataset ids, scores) of the k training examples that hurt the query most."""
        return self._top(query, k, proponents=False)

    def suspects(self, k: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """(train ids, self-influence) of the k most self-influential training examples (likely mislabeled)."""
        order = np.argsort(-self.self_influence, kind="stable")[:k]
        return self.train_ids[order], self.self_influence[order]


def load_results(out_dir: str | os.PathLike, mmap: bool = True) -> AttributionResult:
    """Read a finished run's files (no Lightning needed); scores are memory-mapped by default."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    top_k = manifest.get("top_k")
    expected = TOPK_RESULT_FILES if top_k else RESULT_FILES
    missing = [f for f in expected if not (out_dir / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{out_dir} is not a finished attribution result (missing {missing}). Run attribution with out_dir={str(out_dir)!r}; "
            "an interrupted run resumes from its feature store."
        )
    mode = "r" if mmap else None
    topk = TopKScores(*(np.load(out_dir / name) for name in TOPK_FILES)) if top_k else None
    return AttributionResult(
        out_dir=out_dir,
        manifest=manifest,
        scores=None if top_k else np.load(out_dir / "scores.npy", mmap_mode=mode),
        self_influence=np.load(out_dir / "self_influence.npy"),
        train_ids=np.load(out_dir / "train_ids.npy"),
        query_ids=np.load(out_dir / "query_ids.npy"),
        topk=topk,
    )


def write_result(out_dir: str | os.PathLike, *, manifest: dict, self_influence: np.ndarray, train_ids: np.ndarray,
                 query_ids: np.ndarray, scores: np.ndarray | None = None, topk: TopKScores | None = None
                 ) -> AttributionResult:
    """The one way a result is written (post-hoc methods, in-run TracIn, ensembles): exactly one of `scores`
    (n_train, n_query) or `topk`, the arrays, and `manifest` (its `top_k` is set here); returns the loaded result."""
    if (scores is None) == (topk is None):
        raise ValueError("write_result needs exactly one of scores= (full matrix) or topk= (top-k arrays)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, "top_k": None if topk is None else topk.k}
    stale = TOPK_FILES if topk is None else ("scores.npy",)  # the other kind's files from an earlier run here
    for name in stale:
        (out_dir / name).unlink(missing_ok=True)
    arrays = {"self_influence.npy": np.asarray(self_influence, dtype=np.float32),
              "train_ids.npy": np.asarray(train_ids), "query_ids.npy": np.asarray(query_ids)}
    arrays.update({"scores.npy": np.asarray(scores, dtype=np.float32)} if topk is None else topk.arrays())
    for name, array in arrays.items():
        save_array(out_dir / name, array)
    save_json(out_dir / "manifest.json", manifest)
    return load_results(out_dir)


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save via a temporary name, so a reader never sees half a file."""
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def save_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)

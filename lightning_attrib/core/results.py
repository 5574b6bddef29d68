"""The files an attribution run leaves (the contract other tools read) and `load_results` to read them.

A run writes either the full score matrix or, with `Attributor(top_k=k)`, only each query's top k:

    manifest.json, self_influence.npy, train_ids.npy, query_ids.npy     always
    scores.npy                    (n_train, n_query) float32            full result
    topk_proponents.npy           (n_query, k) int64 train row positions, highest score first   top-k result
    topk_proponents_scores.npy    (n_query, k) float32 their scores
    topk_opponents.npy            (n_query, k) int64 train row positions, lowest score first
    topk_opponents_scores.npy     (n_query, k) float32 their scores

Row positions index `train_ids` (the train dataset ids); `manifest["top_k"]` tells which kind a result is.

Published as one unit: a writer stages every file in `out_dir/.staging-<pid>/`, lists each with its size and
SHA-256 in the staged `manifest.json` (with `format_version`), then publishes: the old `manifest.json` goes first,
the staged files are renamed in, the new `manifest.json` is renamed in last. `manifest.json` is the commit record:
`load_results` reads only what it lists and checks every byte against it, so a reader sees a complete old result,
a complete new one, or an error, never a mix (a crash mid-publish leaves no manifest: "not finished").
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_save_npy, atomic_write_json, file_sha256
from .lock import OutDirLock

COMMON_FILES = ("manifest.json", "self_influence.npy", "train_ids.npy", "query_ids.npy")
RESULT_FILES = ("manifest.json", "scores.npy", "self_influence.npy", "train_ids.npy", "query_ids.npy")
TOPK_FILES = ("topk_proponents.npy", "topk_proponents_scores.npy", "topk_opponents.npy", "topk_opponents_scores.npy")
TOPK_RESULT_FILES = COMMON_FILES + TOPK_FILES
FORMAT_VERSION = "2.0.0"  # manifest["format_version"]; a result without one is format 1 (no checksums)
READS_FORMAT_MAJOR = 2


class ResultError(ValueError):
    """A result directory that is corrupt, mixed, of a newer format, or whose arrays disagree with its ids."""


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


def _format_major(manifest: dict) -> int:
    version = str(manifest.get("format_version", "1.0.0"))
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise ResultError(f"manifest.json has an unreadable format_version {version!r}") from None


def _open_array(path: Path, entry: dict | None, mmap: bool, verify: bool) -> np.ndarray:
    """Load one .npy, checking it against its manifest entry (size, and SHA-256 when `verify`). The bytes checked
    are the bytes loaded: one open file serves both, so a file renamed over it meanwhile cannot slip in."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise ResultError(f"{path} is listed in manifest.json but missing: the result is incomplete. Rerun "
                          f"attribution into {path.parent} (its features are reused).") from None
    with fh:
        if entry is not None:
            size = os.fstat(fh.fileno()).st_size
            problem = None
            if size != entry.get("size"):
                problem = f"{size} bytes, the manifest lists {entry.get('size')}"
            elif verify:
                h = hashlib.sha256()
                while block := fh.read(1 << 22):
                    h.update(block)
                if h.hexdigest() != entry.get("sha256"):
                    problem = "its SHA-256 differs from the manifest's"
            if problem:
                raise ResultError(
                    f"{path} does not match manifest.json ({problem}): the file was modified or corrupted, or a run "
                    f"is publishing into {path.parent} right now. Rerun attribution into it (its features are reused)."
                )
            fh.seek(0)
        if not mmap:
            return np.load(fh)
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        if dtype.hasobject:
            raise ResultError(f"{path} holds Python objects, not numbers")
        return np.memmap(fh, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=fh.tell())


def load_results(out_dir: str | os.PathLike, mmap: bool = True, verify: bool = True) -> AttributionResult:
    """Read a finished run's files (no Lightning needed); scores are memory-mapped by default.

    Refuses (ResultError) a directory whose files do not match its manifest (size and, with `verify`, SHA-256:
    about 1 s per 2 GB), a newer result format, or arrays whose shapes disagree with the ids."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        present = [f for f in RESULT_FILES + TOPK_FILES if (out_dir / f).exists()]
        why = ("no manifest.json: a run was interrupted or is publishing right now" if present
               else f"missing {list(RESULT_FILES)}")
        raise FileNotFoundError(
            f"{out_dir} is not a finished attribution result ({why}). Run attribution with out_dir={str(out_dir)!r}; "
            "an interrupted run resumes from its feature store."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise ResultError(f"{manifest_path} is not valid JSON ({err}): rerun attribution into {out_dir}") from None
    major = _format_major(manifest)
    if major > READS_FORMAT_MAJOR:
        raise ResultError(
            f"{out_dir} was written by a newer lightning-attrib (result format {manifest.get('format_version')}, "
            f"writer version {manifest.get('lightning_attrib_version')}); this version reads result formats up to "
            f"{READS_FORMAT_MAJOR}.x. Upgrade lightning-attrib to read it."
        )
    top_k = manifest.get("top_k")
    expected = TOPK_RESULT_FILES if top_k else RESULT_FILES
    listed = manifest.get("files") if major >= 2 else None
    if major >= 2:
        if not isinstance(listed, dict):
            raise ResultError(f"{manifest_path} lists no files: it was not written by write_result; rerun attribution")
        unlisted = [f for f in expected if f != "manifest.json" and f not in listed]
        if unlisted:
            raise ResultError(f"{manifest_path} does not list {unlisted}: the manifest and the files disagree; "
                              f"rerun attribution into {out_dir}")
    else:
        missing = [f for f in expected if not (out_dir / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"{out_dir} is not a finished attribution result (missing {missing}). Run attribution with "
                f"out_dir={str(out_dir)!r}; an interrupted run resumes from its feature store."
            )

    def array(name: str, use_mmap: bool = False) -> np.ndarray:
        return _open_array(out_dir / name, None if listed is None else listed[name], use_mmap, verify)

    topk = TopKScores(*(array(name) for name in TOPK_FILES)) if top_k else None
    result = AttributionResult(
        out_dir=out_dir,
        manifest=manifest,
        scores=None if top_k else array("scores.npy", mmap),
        self_influence=array("self_influence.npy"),
        train_ids=array("train_ids.npy"),
        query_ids=array("query_ids.npy"),
        topk=topk,
    )
    check_shapes(result)
    return result


def check_shapes(result: AttributionResult) -> None:
    """Every array agrees with the ids (and the manifest's n_train / n_query): else a ResultError naming it."""
    where = result.out_dir
    if result.train_ids.ndim != 1 or result.query_ids.ndim != 1:
        raise ResultError(f"train_ids.npy / query_ids.npy in {where} must be 1-d, got shapes "
                          f"{result.train_ids.shape} and {result.query_ids.shape}")
    n_train, n_query = len(result.train_ids), len(result.query_ids)
    m = result.manifest
    for key, n in (("n_train", n_train), ("n_query", n_query)):
        if key in m and m[key] != n:
            raise ResultError(f"manifest.json in {where} says {key}={m[key]}, the ids hold {n}")
    wrong = []
    if result.self_influence.shape != (n_train,):
        wrong.append(f"self_influence.npy {result.self_influence.shape} != ({n_train},)")
    if result.has_scores and result.scores.shape != (n_train, n_query):
        wrong.append(f"scores.npy {tuple(result.scores.shape)} != ({n_train}, {n_query})")
    if result.topk is not None:
        k = result.topk.k
        for name, arr in result.topk.arrays().items():
            if arr.shape != (n_query, k):
                wrong.append(f"{name} {arr.shape} != ({n_query}, {k})")
        for arr in (result.topk.proponents, result.topk.opponents):
            if arr.size and (arr.min() < 0 or arr.max() >= n_train):
                wrong.append(f"top-k rows outside [0, {n_train})")
                break
    if wrong:
        raise ResultError(f"the arrays in {where} disagree with its ids ({'; '.join(wrong)}): the result is corrupt. "
                          "Rerun attribution into it (its features are reused).")


def check_finite(name: str, array: np.ndarray, skip_rows=(), skip_cols=(), row_what: str = "train example",
                 col_what: str = "query") -> None:
    """A ValueError naming the first non-finite entry of `array` outside the excluded rows / columns."""
    a = np.asarray(array)
    bad = ~np.isfinite(a)
    if not bad.any():
        return
    if len(skip_rows):
        bad[np.asarray(skip_rows, dtype=np.int64)] = False
    if a.ndim == 2 and len(skip_cols):
        bad[:, np.asarray(skip_cols, dtype=np.int64)] = False
    if not bad.any():
        return
    idx = np.argwhere(bad)[0]
    at = f"{row_what} {idx[0]}" + (f", {col_what} {idx[1]}" if a.ndim == 2 else "")
    raise ValueError(f"non-finite {name} ({a[tuple(idx)]}) at {at} ({int(bad.sum())} entries in all): the inputs or "
                     "the model's numerics give NaN/inf there. Fix that example, or pass non_finite='exclude' to drop "
                     "such examples (they are listed in the manifest).")


class ResultStaging:
    """A result's files written into `out_dir/.staging-<pid>/`, then published as one unit (see the module doc)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / f".staging-{os.getpid()}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def save(self, name: str, array: np.ndarray) -> None:
        atomic_save_npy(self.dir / name, array)

    def publish(self, manifest: dict) -> None:
        """List every staged file (size, SHA-256) in the manifest and move the result into `out_dir`."""
        names = sorted(p.name for p in self.dir.iterdir() if p.suffix == ".npy" and not p.name.startswith("."))
        files = {n: {"size": (self.dir / n).stat().st_size, "sha256": file_sha256(self.dir / n)} for n in names}
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
        atomic_write_json(self.dir / "manifest.json", manifest)
        # the old manifest goes first: from here until the new one lands a reader gets "not finished"
        (self.out_dir / "manifest.json").unlink(missing_ok=True)
        for name in set(RESULT_FILES + TOPK_FILES) - set(files) - {"manifest.json"}:
            (self.out_dir / name).unlink(missing_ok=True)  # the other kind's files from an earlier run here
        for name in names:
            os.replace(self.dir / name, self.out_dir / name)
        os.replace(self.dir / "manifest.json", self.out_dir / "manifest.json")
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_stale_staging(out_dir: str | os.PathLike) -> None:
    """Staging directories left by killed writers (call while holding the out_dir lock)."""
    for d in Path(out_dir).glob(".staging-*"):
        shutil.rmtree(d, ignore_errors=True)


def write_result(out_dir: str | os.PathLike, *, manifest: dict, self_influence: np.ndarray, train_ids: np.ndarray,
                 query_ids: np.ndarray, scores: np.ndarray | None = None, topk: TopKScores | None = None
                 ) -> AttributionResult:
    """The one way a result is written (post-hoc methods, in-run TracIn, ensembles): exactly one of `scores`
    (n_train, n_query) or `topk`, the arrays, and `manifest` (its `top_k` is set here); returns the loaded result.

    Staged and published as one unit under the out_dir lock; non-finite scores (or self-influence, unless
    `manifest["self_influence_computed"]` is False) are refused outside the rows/columns listed in
    `manifest["excluded"]` ({"train": [...], "query": [...]} positions)."""
    if (scores is None) == (topk is None):
        raise ValueError("write_result needs exactly one of scores= (full matrix) or topk= (top-k arrays)")
    out_dir = Path(out_dir)
    manifest = {**manifest, "top_k": None if topk is None else topk.k}
    excluded = manifest.get("excluded") or {}
    skip_train, skip_query = excluded.get("train", []), excluded.get("query", [])
    if scores is not None:
        check_finite("score", scores, skip_train, skip_query)
    else:
        check_finite("top-k proponent score", topk.proponent_scores, skip_query, row_what="query", col_what="rank")
        check_finite("top-k opponent score", topk.opponent_scores, skip_query, row_what="query", col_what="rank")
    if manifest.get("self_influence_computed", True):
        check_finite("self-influence", self_influence, skip_train)
    arrays = {"self_influence.npy": np.asarray(self_influence, dtype=np.float32),
              "train_ids.npy": np.asarray(train_ids), "query_ids.npy": np.asarray(query_ids)}
    arrays.update({"scores.npy": np.asarray(scores, dtype=np.float32)} if topk is None else topk.arrays())
    with OutDirLock(out_dir):
        staging = ResultStaging(out_dir)
        try:
            for name, array in arrays.items():
                staging.save(name, array)
            staging.publish(manifest)
        finally:
            staging.discard()
    return load_results(out_dir)


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save via a temporary name (kept for callers; `core.io.atomic_save_npy`)."""
    atomic_save_npy(path, array)


def save_json(path: Path, obj: dict) -> None:
    """JSON written atomically (kept for callers; `core.io.atomic_write_json`)."""
    atomic_write_json(path, obj)

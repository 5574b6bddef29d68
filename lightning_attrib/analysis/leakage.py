"""Train–test leakage: training examples that are near-duplicates of query (test) examples.

A pair (train i, query j) is a suspected leak when two independent pieces of evidence agree:

1. **The attribution is extreme.** Robust z-scores `z = (s - median) / (1.4826 * MAD)` of the score
   `s = scores[i, j]`, taken within the query's column (is i unusually helpful to j among all training
   examples?) and within the training example's row (is j the query i helps most, unusually?). The row
   z matters because TRAK multiplies every score of training example i by `Q_i = 1 - p_i` (its remaining
   loss): a memorized duplicate has a tiny `Q_i`, which shrinks its whole row and hides it in the column,
   while the row z-score is invariant to that factor. Attribution evidence: `z_attr = max(z_col, z_row)`.
2. **The inputs are near-identical.** The normalized L2 distance `d = ||x_i - x_j||_2 / sqrt(D)` (root
   mean square difference per input dimension) is compared with the natural spacing of the data: the
   distances of training examples to their nearest *other* training example. With `m` and `s` the median
   and the MAD-based spread of `log d_nn` over (a sample of) the training set, the distance evidence is
   `z_dist = (m - log d) / s`: how many robust standard deviations closer than a typical nearest neighbour
   the pair is (log scale, so it is unit-free and a 10x closer pair scores the same at any input scale).

Thresholds. Both tests use one Bonferroni rule: with `n_candidates` pairs examined and level `alpha`
(default 0.05), `tau = Phi^-1(1 - alpha / n_candidates)`, so that under a Gaussian null for each robust
z-score the expected number of clean candidate pairs passing that test is at most `alpha`. TRAK columns are
heavy-tailed (most training examples score near 0, a few same-class ones far above), so the attribution
test alone passes many clean pairs: it is a necessary condition, and the input test supplies the
specificity. Either threshold can be set explicitly (`attribution_threshold=`, `distance_threshold=`).

Combined leakage score: `min(z_attr / tau_attr, z_dist / tau_dist)` -- the weaker of the two pieces of
evidence, each in units of its own threshold. A pair is flagged iff the score is >= 1, i.e. iff both tests
pass (an AND); the table is ranked by it. When TRAK features are given (see `load_store_features`) the
table also reports their cosine; `min_cosine=` adds it as a third required condition.

Candidates (so the n_train x n_query distance matrix is never formed): for every query its
`candidates_per_query` highest-scoring training examples and its nearest training input, and for every
training example the query it scores highest.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from ..core.io import atomic_write_text, derive_seed
from ..core.results import AttributionResult
from ..core.store import FeatureStore

MAD_TO_SIGMA = 1.4826  # MAD * 1.4826 estimates the standard deviation of a normal distribution
MEAN_AD_TO_SIGMA = 1.2533  # fallback when the MAD is 0 (Iglewicz & Hoaglin): mean absolute deviation * sqrt(pi/2)


# -- feature store ----------------------------------------------------------------------------------
def load_store_features(result: AttributionResult | str | os.PathLike, snapshot: str | None = None,
                        output: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_features, query_features) float32 from a result's feature store, rows aligned with the result.

    Reads `out_dir/features/<output>/<snapshot>/{train,query}`; `output` defaults to the manifest's output
    function and `snapshot` to the last snapshot the manifest lists (the final weights for TRAK run on
    the trained model).
    """
    if not isinstance(result, AttributionResult):
        from ..core.results import load_results

        result = load_results(result)
    out_dir = Path(result.out_dir)
    output = output or result.manifest.get("output")
    if output is None:
        found = sorted(p.name for p in (out_dir / "features").glob("*") if p.is_dir())
        if len(found) != 1:
            raise ValueError(f"cannot tell which output's features to read under {out_dir / 'features'} "
                             f"(found {found}): pass output=")
        output = found[0]
    root = out_dir / "features" / output
    settings_path = root / "settings.json"
    if not settings_path.exists():
        raise FileNotFoundError(
            f"no feature store at {root}: the result's features were deleted or written elsewhere. "
            "Rerun attribution with the same out_dir (finished shards are reused) or pass the features directly."
        )
    stored = json.loads(settings_path.read_text())
    store = FeatureStore(root, stored["settings"], stored["shard_size"], create=False)
    if snapshot is None:
        names = [s["name"] for s in result.manifest.get("snapshots", []) if isinstance(s, dict) and "name" in s]
        if not names:
            names = sorted(p.parent.name for p in root.glob("*/fingerprint.json"))
        if not names:
            raise FileNotFoundError(f"the feature store at {root} holds no snapshot")
        snapshot = names[-1]
    feats = {}
    for split, ids in (("train", result.train_ids), ("query", result.query_ids)):
        if not store.exists(snapshot, split):
            raise FileNotFoundError(f"snapshot {snapshot!r} has no {split} features in {root}")
        stored_ids = store.ids(snapshot, split)
        if not np.array_equal(stored_ids, np.asarray(ids)):
            raise ValueError(f"the {split} features in {root}/{snapshot} are of other examples than the result's "
                             f"{split}_ids ({len(stored_ids)} vs {len(ids)} ids)")
        feats[split] = store.load(snapshot, split)[0]
    return feats["train"], feats["query"]


# -- robust statistics ------------------------------------------------------------------------------
def robust_scale(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(median, sigma) along `axis`: sigma = 1.4826 * MAD, else 1.2533 * mean abs. deviation, never 0."""
    med = np.median(values, axis=axis, keepdims=True)
    dev = np.abs(values - med)
    sigma = MAD_TO_SIGMA * np.median(dev, axis=axis, keepdims=True)
    fallback = MEAN_AD_TO_SIGMA * dev.mean(axis=axis, keepdims=True)
    sigma = np.where(sigma > 0, sigma, fallback)
    tiny = 1e-12 * np.maximum(np.abs(values).max(axis=axis, keepdims=True), 1e-300)
    return med, np.maximum(sigma, tiny)


def _column_stats(scores: np.ndarray, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    n_q = scores.shape[1]
    med, sig = np.empty(n_q), np.empty(n_q)
    for lo in range(0, n_q, block):
        m, s = robust_scale(np.asarray(scores[:, lo:lo + block], dtype=np.float64), axis=0)
        med[lo:lo + block], sig[lo:lo + block] = m[0], s[0]
    return med, sig


def _row_stats(scores: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row medians, sigmas and argmax (the query each training example helps most)."""
    n_t = scores.shape[0]
    med, sig, top = np.empty(n_t), np.empty(n_t), np.empty(n_t, dtype=np.int64)
    for lo in range(0, n_t, block):
        rows = np.asarray(scores[lo:lo + block], dtype=np.float64)
        m, s = robust_scale(rows, axis=1)
        med[lo:lo + block], sig[lo:lo + block], top[lo:lo + block] = m[:, 0], s[:, 0], rows.argmax(axis=1)
    return med, sig, top


def _as_matrix(inputs: Any, n: int, what: str) -> torch.Tensor:
    """Inputs as a float64 (n, D) tensor: arrays/tensors are flattened per example; a dataset's items' first field."""
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(np.asarray(inputs) if isinstance(inputs, np.ndarray) else inputs)
    elif hasattr(inputs, "__getitem__") and hasattr(inputs, "__len__"):
        items = [inputs[i] for i in range(len(inputs))]
        items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
        t = torch.stack([torch.as_tensor(it) for it in items])
    else:
        raise TypeError(f"{what} must be an array, a tensor or a map-style dataset, got {type(inputs).__name__}")
    if t.shape[0] != n:
        raise ValueError(f"{what} has {t.shape[0]} rows but the result has {n}: pass the inputs in the result's row "
                         "order (row i = the dataset example the result's ids[i] names)")
    return t.reshape(n, -1).double()


def _block_rows(n_cols: int, budget: int = 2**24) -> int:
    """Rows per block so that a (rows, n_cols) float64 distance block stays near 128 MiB."""
    return max(1, min(1024, budget // max(n_cols, 1)))


def _nearest(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """For each row of a, the index of the nearest row of b (Euclidean), in blocks of a."""
    block = _block_rows(b.shape[0])
    return np.concatenate([torch.cdist(a[lo:lo + block], b).argmin(dim=1).numpy() for lo in range(0, a.shape[0], block)])


def _bonferroni(alpha: float, m: int) -> float:
    return NormalDist().inv_cdf(1.0 - alpha / max(m, 1))


# -- result ------------------------------------------------------------------------------------------
@dataclass
class LeakagePair:
    """One suspected (query, train) duplicate pair; `*_index` are row/column positions in the result."""

    query_id: int
    train_id: int
    query_index: int
    train_index: int
    score: float
    z_column: float
    z_row: float
    attribution_z: float
    input_distance: float
    distance_z: float
    feature_cosine: float | None
    leakage_score: float
    flagged: bool


@dataclass
class LeakageReport:
    """Candidate pairs ranked by leakage score (top `top_k`), with the number of flagged pairs overall."""

    pairs: list[LeakagePair]
    flags: int
    n_candidates: int
    thresholds: dict
    reference: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def flagged(self) -> list[LeakagePair]:
        return [p for p in self.pairs if p.flagged]

    def records(self) -> list[dict]:
        return [asdict(p) for p in self.pairs]

    def table(self, k: int | None = 20) -> str:
        """A plain-text table of the top `k` pairs."""
        head = f"{'rank':>4} {'query':>6} {'train':>6} {'score':>10} {'z_col':>8} {'z_row':>8} {'dist':>7} " \
               f"{'z_dist':>7} {'cos':>6} {'leak':>6} flag"
        lines = [head]
        for r, p in enumerate(self.pairs[:k]):
            cos = f"{p.feature_cosine:6.3f}" if p.feature_cosine is not None else f"{'-':>6}"
            lines.append(f"{r:>4} {p.query_id:>6} {p.train_id:>6} {p.score:>10.3g} {p.z_column:>8.3g} {p.z_row:>8.3g} "
                         f"{p.input_distance:>7.4f} {p.distance_z:>7.2f} {cos} {p.leakage_score:>6.2f} "
                         f"{'*' if p.flagged else ''}")
        lines.append(f"{self.flags} flagged of {self.n_candidates} candidate pairs "
                     f"(tau_attr={self.thresholds['attribution']:.2f}, tau_dist={self.thresholds['distance']:.2f})")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (pairs, flags, thresholds, reference statistics)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"flags": self.flags, "n_candidates": self.n_candidates,
                                            "thresholds": self.thresholds, "reference": self.reference,
                                            "pairs": self.records()}, indent=2, default=float))
        return path


# -- detector ----------------------------------------------------------------------------------------
def detect_leakage(result: AttributionResult, train_inputs: Any, query_inputs: Any,
                   train_features: np.ndarray | None = None, query_features: np.ndarray | None = None, *,
                   top_k: int = 50, candidates_per_query: int = 5, alpha: float = 0.05,
                   attribution_threshold: float | None = None, distance_threshold: float | None = None,
                   min_cosine: float | None = None, reference_size: int = 4000, seed: int = 0) -> LeakageReport:
    """Rank suspected train–test duplicate pairs of an attribution result (see the module doc for the method).

    Args:
        result: an `AttributionResult` (scores (n_train, n_query), positive = helps).
        train_inputs, query_inputs: raw inputs in the result's row order: arrays/tensors (n, ...) or map-style
            datasets whose items are `(x, ...)`; flattened per example.
        train_features, query_features: optional TRAK features (e.g. from `load_store_features(result)`),
            reported as a cosine per pair.
        top_k: pairs kept in the report (the flag count covers all candidates).
        candidates_per_query: highest-scoring training examples examined per query.
        alpha: family-wise level of the Bonferroni thresholds.
        attribution_threshold, distance_threshold: explicit thresholds on `z_attr` and `z_dist` instead.
        min_cosine: if set (and features are given), a flagged pair also needs this feature cosine.
        reference_size: training examples sampled to estimate the nearest-neighbour distance distribution.
    """
    scores = result.scores
    n_train, n_query = scores.shape
    if top_k <= 0 or candidates_per_query <= 0:
        raise ValueError("top_k and candidates_per_query must be positive")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    xt = _as_matrix(train_inputs, n_train, "train_inputs")
    xq = _as_matrix(query_inputs, n_query, "query_inputs")
    if xt.shape[1] != xq.shape[1]:
        raise ValueError(f"train inputs have {xt.shape[1]} values per example, query inputs {xq.shape[1]}")
    if (train_features is None) != (query_features is None):
        raise ValueError("pass both train_features and query_features, or neither")

    # candidates
    col_med, col_sig = _column_stats(scores)
    row_med, row_sig, row_top = _row_stats(scores)
    k = min(candidates_per_query, n_train)
    cand_t, cand_q = [], []
    for lo in range(0, n_query, 256):
        block = np.asarray(scores[:, lo:lo + 256], dtype=np.float64)
        top = np.argpartition(-block, k - 1, axis=0)[:k]
        cand_t.append(top.T.ravel())
        cand_q.append(np.repeat(np.arange(lo, lo + block.shape[1]), k))
    nn_t = _nearest(xq, xt)
    cand_t += [nn_t, np.arange(n_train)]
    cand_q += [np.arange(n_query), row_top]
    pairs = np.unique(np.stack([np.concatenate(cand_t), np.concatenate(cand_q)], axis=1), axis=0)
    ti, qj = pairs[:, 0], pairs[:, 1]
    m = len(pairs)

    # evidence
    s = np.asarray(scores[ti, qj], dtype=np.float64)
    z_col = (s - col_med[qj]) / col_sig[qj]
    z_row = (s - row_med[ti]) / row_sig[ti]
    z_attr = np.maximum(z_col, z_row)
    dist = torch.linalg.vector_norm(xt[ti] - xq[qj], dim=1).numpy() / math.sqrt(xt.shape[1])

    # reference: distances of (sampled) training examples to their nearest other training example
    if n_train > 1:
        rng = np.random.default_rng(derive_seed(seed, "leakage-reference"))
        ref = np.sort(rng.choice(n_train, size=min(reference_size, n_train), replace=False))
        d_nn = np.empty(len(ref))
        block = _block_rows(n_train)
        for lo in range(0, len(ref), block):
            rows = ref[lo:lo + block]
            d = torch.cdist(xt[rows], xt)
            d[torch.arange(len(rows)), torch.as_tensor(rows)] = float("inf")
            d_nn[lo:lo + block] = d.min(dim=1).values.numpy() / math.sqrt(xt.shape[1])
    else:
        d_nn = np.array([1.0])
    floor = 1e-3 * max(float(np.median(d_nn)), 1e-12)
    log_nn = np.log(np.maximum(d_nn, floor))
    ref_med, ref_sig = (float(v[0]) for v in robust_scale(log_nn, axis=0))
    z_dist = (ref_med - np.log(np.maximum(dist, floor))) / ref_sig

    cos = None
    if train_features is not None:
        ft = np.asarray(train_features, dtype=np.float64)
        fq = np.asarray(query_features, dtype=np.float64)
        if ft.shape[0] != n_train or fq.shape[0] != n_query:
            raise ValueError(f"features have {ft.shape[0]} train / {fq.shape[0]} query rows, the result "
                             f"{n_train} / {n_query}")
        a, b = ft[ti], fq[qj]
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)

    tau_attr = attribution_threshold if attribution_threshold is not None else _bonferroni(alpha, m)
    tau_dist = distance_threshold if distance_threshold is not None else _bonferroni(alpha, m)
    combined = np.minimum(z_attr / tau_attr, z_dist / tau_dist)
    flagged = combined >= 1.0
    if min_cosine is not None and cos is not None:
        flagged &= cos >= min_cosine

    order = np.lexsort((-z_attr, -combined))[:top_k]
    train_ids, query_ids = np.asarray(result.train_ids), np.asarray(result.query_ids)
    out = [LeakagePair(query_id=int(query_ids[qj[o]]), train_id=int(train_ids[ti[o]]), query_index=int(qj[o]),
                       train_index=int(ti[o]), score=float(s[o]), z_column=float(z_col[o]), z_row=float(z_row[o]),
                       attribution_z=float(z_attr[o]), input_distance=float(dist[o]), distance_z=float(z_dist[o]),
                       feature_cosine=None if cos is None else float(cos[o]), leakage_score=float(combined[o]),
                       flagged=bool(flagged[o])) for o in order]
    return LeakageReport(
        pairs=out, flags=int(flagged.sum()), n_candidates=m,
        thresholds={"attribution": float(tau_attr), "distance": float(tau_dist), "alpha": alpha,
                    "rule": "flag iff min(z_attr / tau_attr, z_dist / tau_dist) >= 1"
                            + (f" and feature cosine >= {min_cosine}" if min_cosine is not None and cos is not None else "")},
        reference={"nn_distance_median": float(np.exp(ref_med)), "log_nn_distance_sigma": ref_sig,
                   "reference_size": int(len(d_nn))},
    )

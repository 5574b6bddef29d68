"""Brittleness (Ilyas et al. 2022): the smallest number k of top proponents whose removal flips a prediction.

For one query with margin m > threshold (the prediction, e.g. the true-class margin; it flips when the
margin drops below `threshold`) and a score column s (positive = the example raises the query's output):

1. *Predict* k from the scores with a linear model of the margin: removing the top-k proponents gives
   m_k ~= m - (sum of the k largest scores), so the predicted k is the smallest k on the search grid
   with m_k < threshold. The scores must be in units of the output (e.g. influence functions, or scores
   calibrated against a few retrainings); the *ordering* is all that the verification uses.
2. *Verify* by retraining without the top-k proponents, starting at the predicted k and walking the grid
   down (while removal still flips) or up (until it flips). The verified k flips and the grid value before
   it does not (both retrained), so it is the smallest flipping grid value whenever flipping is monotone in
   k. With `refine=True` a bisection then narrows (previous grid value, verified k] to a single k (and the
   prediction is made on every k, not the grid, so the two stay comparable).

`retrain_fn(keep_mask) -> float` trains on the kept examples (bool (n_train,)) and returns the query's margin.
"Not found" is -1 (the `Brittleness` metric also accepts inf/NaN).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

NOT_FOUND = -1


def power_of_two_grid(max_k: int) -> list[int]:
    """[1, 2, 4, ..., max_k] (max_k appended when it is not a power of two)."""
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    grid, k = [], 1
    while k < max_k:
        grid.append(k)
        k *= 2
    grid.append(int(max_k))
    return grid


def proponent_order(score_col: np.ndarray) -> np.ndarray:
    """Training indices by decreasing score (stable: ties keep index order)."""
    return np.argsort(-np.asarray(score_col, dtype=np.float64), kind="stable")


def _score_column(score_col) -> np.ndarray:
    s = np.asarray(score_col.detach().cpu().numpy() if hasattr(score_col, "detach") else score_col, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"expected one score column (n_train,), got shape {s.shape}: pass scores[:, q]")
    if not np.isfinite(s).all():
        raise ValueError("the score column contains NaN/inf")
    return s


def _resolve_grid(n_train: int, grid: Sequence[int] | None, max_k: int | None) -> list[int]:
    if max_k is None:
        max_k = max(1, n_train // 2)
    if not 1 <= max_k < n_train:
        raise ValueError(f"max_k must be in [1, n_train={n_train}), got {max_k}")
    if grid is None:
        return power_of_two_grid(max_k)
    g = sorted({int(k) for k in grid})
    if not g or g[0] < 1 or g[-1] >= n_train:
        raise ValueError(f"grid values must lie in [1, n_train={n_train}), got {list(grid)}")
    return g


def predicted_margins(score_col, margin: float, ks: Sequence[int]) -> np.ndarray:
    """Linear prediction of the query margin after removing the top-k proponents, for each k in ks."""
    s = _score_column(score_col)
    csum = np.concatenate([[0.0], np.cumsum(np.sort(s)[::-1])])
    return float(margin) - csum[np.asarray(ks, dtype=np.int64)]


def predict_support_size(score_col, margin: float, *, grid: Sequence[int] | None = None, max_k: int | None = None,
                         refine: bool = False, threshold: float = 0.0) -> int:
    """Smallest k on the grid (every k in 1..max_k if `refine`) whose predicted margin is < threshold, else -1."""
    s = _score_column(score_col)
    ks = _resolve_grid(len(s), grid, max_k)
    if refine:
        ks = list(range(1, ks[-1] + 1))
    flips = predicted_margins(s, margin, ks) < threshold
    return int(ks[int(np.argmax(flips))]) if flips.any() else NOT_FOUND


@dataclass
class SupportSize:
    """One query's search: predicted and verified k, and every retraining done (k -> margin after removal)."""

    predicted_k: int
    verified_k: int
    margin: float
    grid: list[int]
    retrained: dict[int, float] = field(default_factory=dict)  # k -> margin retrained without the top k (0 = full)
    threshold: float = 0.0

    @property
    def agrees(self) -> bool:
        return self.predicted_k == self.verified_k

    @property
    def num_retrains(self) -> int:
        return len(self.retrained)

    def flipped(self, k: int) -> bool:
        """Whether retraining without the top-k proponents flipped the prediction (k must have been retrained)."""
        return self.retrained[k] < self.threshold


def _call_margin(retrain_fn: Callable[[np.ndarray], float], keep: np.ndarray) -> float:
    out = retrain_fn(keep)
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    arr = np.asarray(out, dtype=np.float64).reshape(-1)
    if arr.size != 1:
        raise ValueError(f"retrain_fn must return the query's margin (one number), got {arr.size} values")
    return float(arr[0])


def support_size(score_col, retrain_fn: Callable[[np.ndarray], float], margin: float | None = None, *,
                 grid: Sequence[int] | None = None, max_k: int | None = None, refine: bool = False,
                 threshold: float = 0.0) -> SupportSize:
    """Predict, then verify by retraining, the smallest k whose top-k proponents' removal flips the query.

    Args:
        score_col: (n_train,) scores of the training examples for this query (positive = helps it).
        retrain_fn: keep_mask (n_train,) bool -> the query's margin after training on the kept examples.
        margin: the query's margin trained on everything; None retrains on the full set to get it.
        grid: the k values searched (default 1, 2, 4, ... up to max_k); max_k defaults to n_train // 2 and is
            ignored when a grid is given.
        refine: bisect between the verified k and the grid value before it (assumes monotone flipping there).
        threshold: the prediction flips when the margin drops below it.
    Raises ValueError if the query is already flipped (margin < threshold) with the full training set.
    """
    s = _score_column(score_col)
    n = len(s)
    ks = _resolve_grid(n, grid, max_k)
    order = proponent_order(s)
    retrained_full = margin is None
    if retrained_full:
        margin = _call_margin(retrain_fn, np.ones(n, dtype=bool))
    margin = float(margin)
    if not margin >= threshold:
        raise ValueError(f"the query's margin {margin:.4g} is already below the threshold {threshold}: brittleness is "
                         "defined for queries whose prediction holds with the full training set")
    result = SupportSize(predict_support_size(s, margin, grid=ks, refine=refine, threshold=threshold), NOT_FOUND,
                         margin, ks, threshold=threshold)
    if retrained_full:
        result.retrained[0] = margin

    def flips(k: int) -> bool:
        if k not in result.retrained:
            keep = np.ones(n, dtype=bool)
            keep[order[:k]] = False
            result.retrained[k] = _call_margin(retrain_fn, keep)
        return result.retrained[k] < threshold

    pred = result.predicted_k
    start = 0 if pred == NOT_FOUND else int(np.searchsorted(ks, pred))  # for refine, the grid value >= prediction
    start = min(start, len(ks) - 1)
    if flips(ks[start]):
        j = start
        while j > 0 and flips(ks[j - 1]):
            j -= 1
        result.verified_k = ks[j]
    else:
        j = start + 1
        while j < len(ks) and not flips(ks[j]):
            j += 1
        result.verified_k = ks[j] if j < len(ks) else NOT_FOUND
    if refine and result.verified_k != NOT_FOUND:
        j = ks.index(result.verified_k)
        lo, hi = (ks[j - 1] if j > 0 else 0), result.verified_k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if flips(mid):
                hi = mid
            else:
                lo = mid
        result.verified_k = hi
    return result


def support_sizes(scores, retrain_fn: Callable[[np.ndarray, int], float], queries: Sequence[int],
                  margins: Sequence[float] | None = None, **kwargs) -> list[SupportSize]:
    """`support_size` for several query columns; `retrain_fn(keep_mask, q)` -> margin of query q; margins[i]
    (optional) is the full-data margin of queries[i]."""
    s = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64)
    out = []
    for i, q in enumerate(queries):
        m = None if margins is None else margins[i]
        out.append(support_size(s[:, q], lambda keep, q=q: retrain_fn(keep, q), m, **kwargs))
    return out


__all__ = ["NOT_FOUND", "SupportSize", "power_of_two_grid", "predict_support_size", "predicted_margins",
           "proponent_order", "support_size", "support_sizes"]

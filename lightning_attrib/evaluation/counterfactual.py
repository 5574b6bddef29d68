"""Counterfactual check: remove a chosen training subset, compare the predicted and actual change of the queries.

Predicted effect of removing set R on query q = sum_{i in R} scores[i, q] (positive = the removed examples
helped q, so its output should drop); actual effect = output(full) - output(retrained without R). Same
sign convention as `lightning_attrib.testing.leave_one_out`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..metrics._stats import pearson_columns, spearman_columns


def _np(x, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN/inf")
    return a


def _removal_masks(removed, n_train: int) -> np.ndarray:
    r = np.asarray(removed.detach().cpu().numpy() if isinstance(removed, torch.Tensor) else removed)
    if r.dtype != bool:
        raise TypeError("removed must be a bool mask (n_train,) or (R, n_train): True = removed from training")
    r = r[None, :] if r.ndim == 1 else r
    if r.ndim != 2 or r.shape[1] != n_train:
        raise ValueError(f"removed must be (n_train={n_train},) or (R, n_train), got {r.shape}")
    return r


def predicted_removal_effect(scores, removed) -> np.ndarray:
    """(R, n_query): predicted drop of each query's output when the rows in removed[j] are left out."""
    s = _np(scores, "scores")
    s = s[:, None] if s.ndim == 1 else s
    return _removal_masks(removed, s.shape[0]).astype(np.float64) @ s


@dataclass
class CounterfactualResult:
    predicted: np.ndarray        # (R, n_query) predicted drop (sum of removed scores)
    actual: np.ndarray           # (R, n_query) actual drop: base - retrained
    pearson: float               # over all (removal set, query) pairs
    spearman: float
    sign_agreement: float        # fraction of pairs where predicted and actual drops have the same sign
    per_query_pearson: np.ndarray | None  # (n_query,) across removal sets, when there are >= 3 of them

    def as_dict(self) -> dict[str, float]:
        return {"pearson": self.pearson, "spearman": self.spearman, "sign_agreement": self.sign_agreement}


def counterfactual_correlation(scores, removed, base_outputs, retrained_outputs) -> CounterfactualResult:
    """Correlate predicted (sum of removed scores) and actual (base - retrained) changes of the query outputs.

    Args:
        scores: (n_train, n_query). removed: bool (n_train,) for one removal set or (R, n_train) for R sets.
        base_outputs: (n_query,) outputs of the model trained on everything.
        retrained_outputs: (n_query,) or (R, n_query) outputs after retraining without each removal set.
    With one removal set the correlation runs across queries; with R sets, across all R * n_query pairs
    (and per query across the sets in `per_query_pearson`).
    """
    predicted = predicted_removal_effect(scores, removed)
    base = _np(base_outputs, "base_outputs").reshape(-1)
    retrained = _np(retrained_outputs, "retrained_outputs")
    retrained = retrained[None, :] if retrained.ndim == 1 else retrained
    if retrained.shape != predicted.shape or base.shape[0] != predicted.shape[1]:
        raise ValueError(f"expected base_outputs ({predicted.shape[1]},) and retrained_outputs {predicted.shape}, "
                         f"got {base.shape} and {retrained.shape}")
    actual = base[None, :] - retrained
    p, a = torch.from_numpy(predicted.reshape(-1, 1)), torch.from_numpy(actual.reshape(-1, 1))
    per_query = None
    if predicted.shape[0] >= 3:
        per_query = pearson_columns(torch.from_numpy(predicted), torch.from_numpy(actual)).numpy()
    return CounterfactualResult(
        predicted=predicted, actual=actual,
        pearson=float(pearson_columns(p, a)[0]), spearman=float(spearman_columns(p, a)[0]),
        sign_agreement=float(np.mean(np.sign(predicted) == np.sign(actual))),
        per_query_pearson=per_query,
    )


__all__ = ["CounterfactualResult", "counterfactual_correlation", "predicted_removal_effect"]

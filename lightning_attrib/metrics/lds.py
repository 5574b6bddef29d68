"""Linear datamodeling score (LDS, Park et al. 2023): do summed attribution scores rank subsets like retraining does?"""
from __future__ import annotations

import warnings

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ._stats import as_float64, bootstrap_mean_ci, spearman_columns


def _lds_inputs(scores, masks, outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions (M, Q), outputs (M, Q)) in float64, with shapes checked.

    Also takes an `AttributionResult` for scores and a `SubsetMasks` for masks (their `.scores` / `.masks`).
    """
    s = as_float64(getattr(scores, "scores", scores), "scores")
    masks = getattr(masks, "masks", masks)
    m = torch.as_tensor(masks).detach() if not isinstance(masks, torch.Tensor) else masks.detach()
    y = as_float64(outputs, "outputs")
    if s.ndim == 1:
        s = s[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if m.ndim == 1:
        m = m[None, :]
    if s.ndim != 2 or m.ndim != 2 or y.ndim != 2:
        raise ValueError("expected scores (n_train, n_query), masks (M, n_train), outputs (M, n_query)")
    if m.shape[1] != s.shape[0]:
        raise ValueError(f"masks have {m.shape[1]} columns but scores have {s.shape[0]} training rows: "
                         "masks must be (M, n_train) with the training examples in the rows' order of scores")
    if y.shape != (m.shape[0], s.shape[1]):
        raise ValueError(f"outputs must be (M={m.shape[0]}, n_query={s.shape[1]}), got {tuple(y.shape)}")
    if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("masks must be boolean (True = the training example is kept in the subset)")
    preds = m.to(device=s.device, dtype=torch.float64) @ s
    return preds, y.to(s.device)


def _lds_from_predictions(preds: torch.Tensor, target: torch.Tensor, n_bootstrap: int, confidence: float,
                          seed: int) -> dict[str, torch.Tensor]:
    if preds.shape[0] < 3:
        warnings.warn(f"LDS over only {preds.shape[0]} subsets is meaningless; use dozens to hundreds", stacklevel=3)
    per_query = spearman_columns(preds, target)
    valid = ~torch.isnan(per_query)
    if not bool(valid.any()):
        lds = float("nan")
    else:
        if not bool(valid.all()):
            warnings.warn(f"{int((~valid).sum())} queries have constant predictions or outputs across the subsets: "
                          "their Spearman correlation is undefined (NaN) and they are left out of the mean",
                          stacklevel=3)
        lds = per_query[valid].mean().item()
    lo, hi = bootstrap_mean_ci(per_query, n_bootstrap, confidence, seed)
    f64 = dict(dtype=torch.float64)
    return {"lds": torch.tensor(lds, **f64), "per_query": per_query, "ci_low": torch.tensor(lo, **f64),
            "ci_high": torch.tensor(hi, **f64), "num_subsets": torch.tensor(float(preds.shape[0]), **f64)}


def linear_datamodeling_score(scores, masks, outputs, n_bootstrap: int = 1000, confidence: float = 0.95,
                              seed: int = 0) -> dict[str, torch.Tensor]:
    """LDS of `scores` (n_train, n_query) on subsets `masks` (M, n_train) with retrained `outputs` (M, n_query).

    The prediction for subset S_j and query q is g(S_j, q) = sum_{i in S_j} scores[i, q] (= masks @ scores);
    per_query[q] = Spearman(g(., q), outputs[:, q]) over the M subsets (tie-averaged ranks); `lds` is its mean
    over queries (NaN queries — constant across subsets — left out); `ci_low`, `ci_high` a seeded percentile
    bootstrap CI of that mean, resampling queries.
    """
    preds, target = _lds_inputs(scores, masks, outputs)
    return _lds_from_predictions(preds, target, n_bootstrap, confidence, seed)


class LinearDatamodelingScore(Metric):
    """LDS as a torchmetrics `Metric`: `update(scores, masks, outputs)`, `compute()` -> the dict of
    `linear_datamodeling_score` (`lds`, `per_query`, `ci_low`, `ci_high`, `num_subsets`).

    The states are the per-subset predictions g(S_j, .) = masks @ scores and the retrained outputs, both
    (M, n_query), concatenated over updates and — under DDP — over ranks. **Split the work by subsets**:
    every rank passes the same `scores` (all queries) and its own subsets' masks and outputs (e.g. the subsets
    it retrained). Spearman's correlation does not depend on the order of the subsets, so the synced value
    equals the single-process one exactly. (Splitting by queries is not supported: the states would be
    concatenated along the subset axis.) Memory: 2 * M * n_query float64 per rank.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.n_bootstrap, self.confidence, self.seed = int(n_bootstrap), float(confidence), int(seed)
        self.add_state("predictions", default=[], dist_reduce_fx="cat")
        self.add_state("outputs", default=[], dist_reduce_fx="cat")

    def update(self, scores, masks, outputs) -> None:
        preds, target = _lds_inputs(scores, masks, outputs)
        if isinstance(self.predictions, list) and self.predictions and self.predictions[0].shape[1] != preds.shape[1]:
            raise ValueError(f"every update must cover the same {self.predictions[0].shape[1]} queries, "
                             f"got {preds.shape[1]}: split LDS work by subsets, not by queries")
        self.predictions.append(preds.to(self.device))
        self.outputs.append(target.to(self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.predictions, list) and not self.predictions:
            raise ValueError("LinearDatamodelingScore.compute() called before any update(scores, masks, outputs)")
        preds = dim_zero_cat(self.predictions).to(torch.float64)
        target = dim_zero_cat(self.outputs).to(torch.float64)
        return _lds_from_predictions(preds, target, self.n_bootstrap, self.confidence, self.seed)

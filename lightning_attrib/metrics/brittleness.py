"""Agreement of predicted and verified support-set sizes (the smallest k whose removal flips a prediction)."""
from __future__ import annotations

import torch
from torchmetrics import Metric

from ._stats import as_float64

_SUMS = ("total", "agree", "predicted_found", "verified_found", "both_found", "sum_predicted_k", "sum_verified_k",
         "sum_abs_log2_ratio")


def _normalize_k(k, name: str) -> torch.Tensor:
    """float64 (n,) with every 'not found' (negative, inf, NaN) as NaN; sizes must be positive integers."""
    t = as_float64(k, name).reshape(-1)
    not_found = ~torch.isfinite(t) | (t < 0)
    t = torch.where(not_found, torch.full_like(t, float("nan")), t)
    found = t[~not_found]
    if bool((found < 1).any()) or bool((found != found.round()).any()):
        raise ValueError(f"{name} must hold support sizes k >= 1 (integers), or -1/inf/NaN for 'not found'")
    return t


class Brittleness(Metric):
    """`update(predicted_k, verified_k)` per query (k = number of top proponents whose removal flips the
    query's prediction; -1, inf or NaN = not found within the search range); sum-states, so DDP sync is exact.

    `compute()` -> dict of float64 scalars:
      `agreement`: fraction of queries where predicted and verified k are equal (both 'not found' counts as equal);
      `agreement_found`: the same among queries where both were found;
      `predicted_found_rate`, `verified_found_rate`: fraction of queries with a finite k;
      `mean_predicted_k`, `mean_verified_k`: mean k over the queries where it was found (NaN if none);
      `mean_abs_log2_ratio`: mean |log2(predicted/verified)| where both were found (0 = exact; 1 = off by 2x);
      `num_queries`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in _SUMS:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted_k, verified_k) -> None:
        p = _normalize_k(predicted_k, "predicted_k")
        v = _normalize_k(verified_k, "verified_k")
        if p.shape != v.shape:
            raise ValueError(f"predicted_k and verified_k must have the same length, got {p.numel()} and {v.numel()}")
        pf, vf = ~torch.isnan(p), ~torch.isnan(v)
        both = pf & vf
        agree = (both & (p == v)) | (~pf & ~vf)
        dev = self.total.device
        self.total += p.numel()
        self.agree += float(agree.sum())
        self.predicted_found += float(pf.sum())
        self.verified_found += float(vf.sum())
        self.both_found += float(both.sum())
        self.sum_predicted_k += p[pf].sum().to(dev)
        self.sum_verified_k += v[vf].sum().to(dev)
        self.sum_abs_log2_ratio += torch.log2(p[both] / v[both]).abs().sum().to(dev)

    def compute(self) -> dict[str, torch.Tensor]:
        if float(self.total) == 0:
            raise ValueError("Brittleness.compute() called before any update(predicted_k, verified_k)")

        def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a / b) if float(b) > 0 else torch.tensor(float("nan"), dtype=torch.float64, device=a.device)

        return {
            "agreement": ratio(self.agree, self.total),
            "agreement_found": ratio(self.agree - (self.total - self.predicted_found - self.verified_found
                                                   + self.both_found), self.both_found),
            "predicted_found_rate": ratio(self.predicted_found, self.total),
            "verified_found_rate": ratio(self.verified_found, self.total),
            "mean_predicted_k": ratio(self.sum_predicted_k, self.predicted_found),
            "mean_verified_k": ratio(self.sum_verified_k, self.verified_found),
            "mean_abs_log2_ratio": ratio(self.sum_abs_log2_ratio, self.both_found),
            "num_queries": self.total.clone(),
        }

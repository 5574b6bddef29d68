"""Small, exact statistics in torch (float64): tie-averaged ranks, per-column Spearman/Pearson, bootstrap CI."""
from __future__ import annotations

import numpy as np
import torch


def as_float64(x, name: str) -> torch.Tensor:
    """A float64 CPU-or-same-device tensor from a tensor, numpy array or sequence (no copy of grads)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):  # includes read-only memmaps (AttributionResult.scores): copy
        if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
            raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
        return torch.from_numpy(np.array(x, dtype=np.float64))
    else:
        t = torch.as_tensor(x)
    if not (t.is_floating_point() or t.dtype in (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64,
                                                  torch.uint8)):
        raise TypeError(f"{name} must be numeric, got dtype {t.dtype}")
    return t.to(torch.float64)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..M along dim 0, ties given their average rank (as scipy.stats.rankdata(method='average'))."""
    if x.ndim == 1:
        return average_ranks(x[:, None])[:, 0]
    m = x.shape[0]
    sorted_x, order = torch.sort(x, dim=0, stable=True)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = new_group.long().cumsum(0) - 1
    ordinal = torch.arange(1, m + 1, dtype=torch.float64, device=x.device)[:, None].expand_as(sorted_x)
    sums = torch.zeros_like(sorted_x, dtype=torch.float64).scatter_add_(0, group, ordinal)
    counts = torch.zeros_like(sorted_x, dtype=torch.float64).scatter_add_(0, group, torch.ones_like(ordinal))
    avg = (sums / counts.clamp_min(1)).gather(0, group)
    return torch.empty_like(avg).scatter_(0, order, avg)


def pearson_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each column of a with the same column of b; NaN where either column is constant."""
    a = a - a.mean(dim=0, keepdim=True)
    b = b - b.mean(dim=0, keepdim=True)
    denom = a.norm(dim=0) * b.norm(dim=0)
    r = (a * b).sum(dim=0) / denom
    return torch.where(denom > 0, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))


def spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per column (tie-averaged ranks), NaN where a column is constant."""
    return pearson_columns(average_ranks(a), average_ranks(b))


def bootstrap_mean_ci(values: torch.Tensor, n_bootstrap: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (NaNs dropped), resampling with a seeded generator."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    v = values[~torch.isnan(values)].to(torch.float64).cpu()
    if v.numel() == 0 or n_bootstrap <= 0:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(int(seed))
    means = []
    for start in range(0, int(n_bootstrap), 256):  # bounded memory for many queries
        rows = min(256, int(n_bootstrap) - start)
        idx = torch.randint(0, v.numel(), (rows, v.numel()), generator=gen)
        means.append(v[idx].mean(dim=1))
    means = torch.cat(means)
    lo = torch.quantile(means, (1.0 - confidence) / 2.0).item()
    hi = torch.quantile(means, 1.0 - (1.0 - confidence) / 2.0).item()
    return lo, hi

"""The statistics behind the metrics, from the libraries (float64 throughout): ranks, Spearman/Pearson, the
bootstrap CI and AUROC (Mann-Whitney U) from `scipy.stats`, average precision from scikit-learn.

Only input conversion and the guards that make an undefined value NaN (constant columns, one class) live here.
"""
from __future__ import annotations

import warnings

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


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).cpu().numpy()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..M along dim 0, ties given their average rank (`scipy.stats.rankdata(method='average')`)."""
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(_numpy(x), method="average", axis=0)).to(x.device)


def _per_column(stat, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`stat(a[:, j], b[:, j]).statistic` for every column j; NaN where either column is constant."""
    from scipy.stats import ConstantInputWarning

    a_np, b_np = _numpy(a), _numpy(b)
    if a_np.ndim == 1:
        a_np, b_np = a_np[:, None], b_np[:, None]
    out = np.full(a_np.shape[1], np.nan)
    if a_np.shape[0] >= 2:
        with warnings.catch_warnings():  # constant columns: NaN, counted and reported by the caller
            warnings.simplefilter("ignore", ConstantInputWarning)
            for j in range(a_np.shape[1]):
                if np.ptp(a_np[:, j]) > 0 and np.ptp(b_np[:, j]) > 0:
                    out[j] = stat(a_np[:, j], b_np[:, j]).statistic
    return torch.from_numpy(out).to(a.device)


def pearson_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each column of a with the same column of b (`scipy.stats.pearsonr`); NaN where
    either column is constant."""
    from scipy.stats import pearsonr

    return _per_column(pearsonr, a, b)


def spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per column (`scipy.stats.spearmanr`, tie-averaged ranks); NaN where a column
    is constant."""
    from scipy.stats import spearmanr

    return _per_column(spearmanr, a, b)


def bootstrap_mean_ci(values: torch.Tensor, n_bootstrap: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (NaNs dropped): `scipy.stats.bootstrap(method='percentile')`
    with a numpy generator seeded by `derive_seed(seed, 'bootstrap')`."""
    from scipy.stats import bootstrap

    from ..core.io import derive_seed

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    v = _numpy(values.reshape(-1))
    v = v[~np.isnan(v)]
    if v.size == 0 or n_bootstrap <= 0:
        return float("nan"), float("nan")
    if np.ptp(v) == 0:  # every resample has the same mean
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(derive_seed(seed, "bootstrap"))
    res = bootstrap((v,), np.mean, n_resamples=int(n_bootstrap), confidence_level=confidence, method="percentile",
                    vectorized=True, **_rng_kwarg(rng))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _rng_kwarg(rng: np.random.Generator) -> dict:
    """scipy >= 1.15 takes `rng=`, older versions `random_state=` (same generator stream)."""
    import inspect

    from scipy.stats import bootstrap

    return {"rng": rng} if "rng" in inspect.signature(bootstrap).parameters else {"random_state": rng}


def binary_auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
    """AUROC = U / (n_pos n_neg), U the Mann-Whitney statistic of `scipy.stats.mannwhitneyu` (tie-aware, float64);
    NaN with one class only. (torchmetrics' binary_auroc counts its curve in float32: off by ~1e-8.)"""
    from scipy.stats import mannwhitneyu

    t = target.detach().cpu().numpy().astype(bool)
    n_pos = int(t.sum())
    if n_pos == 0 or n_pos == t.size:
        return float("nan")
    s = _numpy(scores)
    return float(mannwhitneyu(s[t], s[~t], method="asymptotic").statistic) / (n_pos * (t.size - n_pos))


def binary_average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Average precision, scikit-learn's `average_precision_score` (float64, tie-aware); NaN without positives.
    (torchmetrics' binary_average_precision counts in float32: off by ~1e-8; scipy has none.)"""
    from sklearn.metrics import average_precision_score

    t = target.detach().cpu().numpy().astype(bool)
    if not t.any():
        return float("nan")
    return float(average_precision_score(t, _numpy(scores)))

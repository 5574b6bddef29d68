"""Linear datamodels (Ilyas et al. 2022): per query, regress the retrained output on the subset mask.

The fitted weights are an attribution in their own right (shaped like scores: (n_train, n_query), positive =
including the example raises the output) and the usual reference the other methods are compared with.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..metrics.lds import linear_datamodeling_score
from .subsets import SubsetMasks


def _as_masks(masks) -> np.ndarray:
    m = masks.masks if isinstance(masks, SubsetMasks) else np.asarray(masks)
    if m.ndim != 2:
        raise ValueError(f"masks must be (M, n_train), got shape {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("masks must be boolean (True = the training example is kept in the subset)")
        m = m.astype(bool)
    return m


@dataclass
class Datamodels:
    """Fitted per-query linear datamodels: output(S, q) ~= intercept[q] + sum_{i in S} weights[i, q]."""

    weights: np.ndarray     # (n_train, n_query)
    intercept: np.ndarray   # (n_query,)
    alpha: np.ndarray       # (n_query,) the L1 penalty chosen by cross-validation
    num_subsets: int

    def predict(self, masks) -> np.ndarray:
        """(M, n_query) predicted outputs for subsets `masks` (M, n_train)."""
        m = _as_masks(masks)
        return m.astype(np.float64) @ self.weights + self.intercept

    def lds(self, masks, outputs, **kwargs) -> dict[str, torch.Tensor]:
        """LDS of the datamodel weights on (held-out) subsets: see `linear_datamodeling_score`."""
        return linear_datamodeling_score(self.weights, _as_masks(masks), outputs, **kwargs)


def fit_datamodels(masks, outputs, *, cv: int = 5, n_alphas: int = 50, max_iter: int = 10_000, tol: float = 1e-4,
                   progress: Callable[[int, int], None] | None = None) -> Datamodels:
    """Fit one L1-regularized linear model per query (sklearn `LassoCV`, penalty chosen by `cv`-fold CV).

    Args:
        masks: (M, n_train) bool subsets (or `SubsetMasks`); outputs: (M, n_query) retrained query outputs.
        cv, n_alphas, max_iter, tol: passed to `LassoCV` (unshuffled K-fold: deterministic).
    Rule of thumb: M should be a sizeable multiple of the number of truly influential examples; with
    M << n_train only a sparse datamodel can be recovered.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LassoCV

    m = _as_masks(masks)
    y = np.asarray(outputs.detach().cpu().numpy() if isinstance(outputs, torch.Tensor) else outputs, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[0] != m.shape[0]:
        raise ValueError(f"outputs have {y.shape[0]} rows but there are {m.shape[0]} subsets")
    if m.shape[0] < 2 * cv:
        raise ValueError(f"{m.shape[0]} subsets are too few for {cv}-fold cross-validation; use many more subsets")
    import sklearn

    # scikit-learn >= 1.7 takes the number of penalties as `alphas=int` (n_alphas deprecated); older as `n_alphas`
    major_minor = tuple(int(p) for p in sklearn.__version__.split(".")[:2] if p.isdigit())
    grid = {"alphas": n_alphas} if major_minor >= (1, 7) else {"n_alphas": n_alphas}
    x = m.astype(np.float64)
    n_query = y.shape[1]
    weights = np.zeros((m.shape[1], n_query))
    intercept, alpha = np.zeros(n_query), np.zeros(n_query)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for q in range(n_query):
            model = LassoCV(**grid, cv=cv, max_iter=max_iter, tol=tol).fit(x, y[:, q])
            weights[:, q], intercept[q], alpha[q] = model.coef_, model.intercept_, model.alpha_
            if progress:
                progress(q + 1, n_query)
    return Datamodels(weights, intercept, alpha, m.shape[0])


__all__ = ["Datamodels", "fit_datamodels"]

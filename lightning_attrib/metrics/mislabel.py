"""How well a suspicion score (e.g. self-influence) ranks the training examples whose labels were flipped."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ._stats import as_float64, binary_auroc, binary_average_precision


def _check_fractions(top_fractions: Sequence[float]) -> tuple[float, ...]:
    fr = tuple(float(f) for f in top_fractions)
    for f in fr:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"top_fractions must lie in (0, 1], got {f}")
    return fr


def _fraction_key(f: float) -> str:
    """0.05 -> '5%', 0.125 -> '12.5%'."""
    return f"{100 * f:g}%"


def _binary_inputs(scores, is_mislabeled) -> tuple[torch.Tensor, torch.Tensor]:
    s = as_float64(scores, "scores").reshape(-1)
    t = torch.as_tensor(is_mislabeled).detach().reshape(-1)
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("is_mislabeled must be boolean (or 0/1): True = the label was flipped")
        t = t.bool()
    if s.shape != t.shape:
        raise ValueError(f"scores and is_mislabeled must have the same length, got {tuple(s.shape)} and {tuple(t.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN/inf: mislabel detection needs a finite score for every example")
    return s, t.to(s.device)


def recall_precision_at(scores: torch.Tensor, target: torch.Tensor, fraction: float) -> tuple[float, float]:
    """(recall, precision) when inspecting the top ceil(fraction * n) examples by score.

    Ties at the cut-off are counted by their expectation under a random order, so the value does not depend
    on the order of the inputs (and a DDP-gathered metric equals the single-process one).
    """
    n = scores.numel()
    n_pos = int(target.sum())
    k = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    threshold = torch.sort(scores, descending=True).values[k - 1]
    above = scores > threshold
    tie = scores == threshold
    hits = target[above].sum().item() + (k - int(above.sum())) * target[tie].sum().item() / int(tie.sum())
    recall = hits / n_pos if n_pos else float("nan")
    return recall, hits / k


def mislabel_detection(scores, is_mislabeled, top_fractions: Sequence[float] = (0.05, 0.1, 0.2)) -> dict[str, torch.Tensor]:
    """Functional form of `MislabelDetection`: one call with all examples."""
    s, t = _binary_inputs(scores, is_mislabeled)
    return _detection_dict(s, t, _check_fractions(top_fractions))


def _detection_dict(s: torch.Tensor, t: torch.Tensor, fractions: tuple[float, ...]) -> dict[str, torch.Tensor]:
    out = {"auroc": binary_auroc(s, t), "average_precision": binary_average_precision(s, t)}
    for f in fractions:
        r, p = recall_precision_at(s, t, f)
        out[f"recall@{_fraction_key(f)}"] = r
        out[f"precision@{_fraction_key(f)}"] = p
    out["num_mislabeled"] = float(t.sum())
    out["num_examples"] = float(t.numel())
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


class MislabelDetection(Metric):
    """Ranking quality of a suspicion score against the truth mask of flipped labels.

    `update(scores, is_mislabeled)`: scores (n,) with higher = more suspicious (e.g. self-influence),
    is_mislabeled (n,) bool (e.g. `flip_labels(...)[1]`). Call it once or per chunk of training examples;
    under DDP each rank updates with its own examples and the cat-states are gathered at `compute()`.

    `compute()` -> dict of float64 scalars: `auroc`, `average_precision` (exact, tie-aware, as scikit-learn's
    roc_auc_score / average_precision_score), and for each x in `top_fractions`, `recall@x%` (fraction of
    the flipped labels found among the top ceil(x n) scores) and `precision@x%` (fraction of those top
    examples that are flipped), plus `num_mislabeled`, `num_examples`. Ties at the cut-off count by their
    expectation, so the values do not depend on the order of the examples. NaN where undefined (no flipped
    labels, or no clean ones for AUROC).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_fractions: Sequence[float] = (0.05, 0.1, 0.2), **kwargs):
        super().__init__(**kwargs)
        self.top_fractions = _check_fractions(top_fractions)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores, is_mislabeled) -> None:
        s, t = _binary_inputs(scores, is_mislabeled)
        self.scores.append(s.to(self.device))
        self.targets.append(t.to(self.device, torch.uint8))  # uint8: every backend can gather it

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.scores, list) and not self.scores:
            raise ValueError("MislabelDetection.compute() called before any update(scores, is_mislabeled)")
        s = dim_zero_cat(self.scores).to(torch.float64)
        t = dim_zero_cat(self.targets).bool()
        return _detection_dict(s, t, self.top_fractions)

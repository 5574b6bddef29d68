"""Ground truth for attribution tests and benchmarks: exact leave-one-out retraining of a convex model.

An L2-regularized multinomial logistic regression trained to convergence (full-batch L-BFGS, float64)
has a unique optimum, so removing example i and retraining gives the true effect of i on every query.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .core.outputs import margin_from_logits


@dataclass
class ConvexProblem:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    num_classes: int
    l2: float = 1e-2


def make_logreg(num_features: int, num_classes: int) -> nn.Linear:
    return nn.Linear(num_features, num_classes).double()


def train_logreg(problem: ConvexProblem, mask: np.ndarray | None = None, init: nn.Linear | None = None,
                 max_iter: int = 500, tol: float = 1e-12) -> nn.Linear:
    """Minimize mean CE over the kept examples + l2/2 * ||W||^2 (bias unregularized) with L-BFGS in float64."""
    x, y = problem.x_train.double(), problem.y_train
    if mask is not None:
        keep = torch.from_numpy(np.asarray(mask, dtype=bool))
        x, y = x[keep], y[keep]
    model = make_logreg(x.shape[1], problem.num_classes)
    if init is not None:
        model.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 0.5 * problem.l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model


@torch.no_grad()
def query_margins(model: nn.Module, problem: ConvexProblem) -> torch.Tensor:
    return margin_from_logits(model(problem.x_query.double()), problem.y_query)


@torch.no_grad()
def query_losses(model: nn.Module, problem: ConvexProblem) -> torch.Tensor:
    return nn.functional.cross_entropy(model(problem.x_query.double()), problem.y_query, reduction="none")


def leave_one_out(problem: ConvexProblem, removals: np.ndarray, measure=query_margins) -> tuple[nn.Linear, np.ndarray]:
    """(full model, effects) with effects[j, q] = measure(full) - measure(without removals[j]).

    Positive effect = example removals[j] raises the query's measure (e.g. helps its margin).
    """
    full = train_logreg(problem)
    base = measure(full, problem)
    effects = np.zeros((len(removals), len(problem.y_query)))
    n = len(problem.y_train)
    for j, i in enumerate(removals):
        mask = np.ones(n, dtype=bool)
        mask[i] = False
        effects[j] = (base - measure(train_logreg(problem, mask, init=full), problem)).numpy()
    return full, effects


def mean_pearson(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean over columns (queries) of the Pearson correlation between predicted and actual effects."""
    rs = []
    for q in range(actual.shape[1]):
        a, p = actual[:, q], predicted[:, q]
        if a.std() == 0 or p.std() == 0:
            rs.append(0.0)
        else:
            rs.append(float(np.corrcoef(p, a)[0, 1]))
    return float(np.mean(rs))


def digits_problem(n_train: int = 300, n_query: int = 10, classes: tuple[int, ...] | None = None,
                   l2: float = 1e-2, seed: int = 0) -> ConvexProblem:
    """A convex digits problem: `classes=(3, 8)` for the binary task, None for all 10 classes."""
    from .data import load_digits_tensors

    x, y = load_digits_tensors(classes)
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, qu = perm[:n_train], perm[n_train:n_train + n_query]
    num_classes = 10 if classes is None else len(classes)
    return ConvexProblem(x[tr].double(), y[tr], x[qu].double(), y[qu], num_classes, l2)


def train_mlp(x: torch.Tensor, y: torch.Tensor, seed: int = 0, steps: int = 300, hidden: int = 32,
              num_classes: int = 10) -> nn.Module:
    """A small MLP trained full-batch with Adam: the model of the analysis tests and examples (seconds on a CPU)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model

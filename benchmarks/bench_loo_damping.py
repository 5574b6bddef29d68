"""TRAK against exact leave-one-out retraining on a convex model, as a function of the damping.

    .venv/bin/python benchmarks/bench_loo_damping.py

L2-regularized logistic regression (l2 = 1e-2, full-batch L-BFGS, float64) on digits: 300 training examples,
10 queries, 40 removals, k = 1024 >= number of parameters. Prints the mean over queries of the Pearson
correlation between TRAK scores and the actual margin change, for lambda = 0 and lambda = r * trace(K)/k.
"""
import shutil
import tempfile
import warnings

import numpy as np
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor
from lightning_attrib.testing import digits_problem, leave_one_out, mean_pearson

warnings.simplefilter("ignore")
SETTINGS = {"lambda=0": {"damping": 0.0}, **{f"{r}x": {"damping_ratio": r} for r in (1e-3, 1e-2, 0.1, 1.0, 10.0)}}


def main():
    work = tempfile.mkdtemp()
    print(f"{'task':10s} " + " ".join(f"{k:>9s}" for k in SETTINGS))
    for name, classes in (("binary", (3, 8)), ("10-class", None)):
        problem = digits_problem(n_train=300, n_query=10, classes=classes)
        removals = np.random.default_rng(1).choice(300, 40, replace=False)
        full, effects = leave_one_out(problem, removals)
        row = []
        for i, kwargs in enumerate(SETTINGS.values()):
            res = Attributor(full, TRAK(**kwargs), TensorDataset(problem.x_train, problem.y_train),
                             TensorDataset(problem.x_query, problem.y_query), f"{work}/{name}{i}", proj_dim=1024).run()
            row.append(mean_pearson(np.asarray(res.scores)[removals], effects))
        print(f"{name:10s} " + " ".join(f"{r:9.3f}" for r in row), flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

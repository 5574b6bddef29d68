"""Fit-end work vs training time at the defaults, post hoc vs with GradientCapture, and LDS of each.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_capture_fit_end.py [--data digits|synthetic]

An MLP 64-128-10 trained with Lightning (SGD momentum 0.9, wd 1e-4, lr 0.05, batch 128, 20 epochs; the same recipe
as bench_ensemble_lds.py, whose subset retrainings give the LDS ground truth). Runs, each a fresh fit:
  trak/post-hoc      CheckpointCapture() (default: 3 snapshots spread) + AttributionCallback("trak")
  tracin/post-hoc    CheckpointCapture() + AttributionCallback("tracin")           (TracIn-CP over 3 snapshots)
  tracin/captured    GradientCapture() + AttributionCallback("tracin")             (in-run, queries = validation set)
  tracin/captured/4  GradientCapture(every_n_steps=4) + AttributionCallback("tracin")
Training time = on_train_start -> on_train_end (capture overhead included); fit-end = on_train_end -> the end
of AttributionCallback.on_fit_end (featurize + fit + score + metrics).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_ensemble_lds import load, train  # noqa: E402

from lightning_attrib import AttributionCallback, CheckpointCapture, GradientCapture  # noqa: E402
from lightning_attrib.core.outputs import margin_from_logits  # noqa: E402
from lightning_attrib.evaluation.subsets import random_subset_masks  # noqa: E402
from lightning_attrib.metrics.lds import linear_datamodeling_score  # noqa: E402

warnings.filterwarnings("ignore")


class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


class Timer(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.t1 = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        self.t2 = time.perf_counter()


def run(name, callbacks, train_ds, val_ds, epochs, work):
    torch.manual_seed(0)
    timer = Timer()
    L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=work,
              callbacks=[*callbacks, timer]).fit(Lit(), DataLoader(train_ds, batch_size=128, shuffle=True),
                                                 DataLoader(val_ds, batch_size=256))
    attrib = next(c for c in callbacks if isinstance(c, AttributionCallback))
    return {"train_s": round(timer.t1 - timer.t0, 3), "fit_end_s": round(timer.t2 - timer.t1, 3),
            "fit_end_over_train": round((timer.t2 - timer.t1) / (timer.t1 - timer.t0), 3)}, attrib.result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    ap.add_argument("--subsets", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    (xt, yt), (xq, yq) = load(args.data)
    masks = random_subset_masks(len(xt), args.subsets, 0.5, seed=0)
    truth = []
    for j in range(args.subsets):
        keep = torch.from_numpy(masks[j])
        model, _ = train(xt[keep], yt[keep], seed=1000 + j, epochs=args.epochs)
        with torch.no_grad():
            truth.append(margin_from_logits(model(xq), yq).double().numpy())
    truth = np.stack(truth)
    train_ds, val_ds = TensorDataset(xt, yt), TensorDataset(xq, yq)
    work = Path(tempfile.mkdtemp())
    configs = {
        "trak/post-hoc": lambda d: [CheckpointCapture(dirpath=d / "snaps"), AttributionCallback("trak", out_dir=d / "a",
                                                                                                log_images=False)],
        "tracin/post-hoc": lambda d: [CheckpointCapture(dirpath=d / "snaps"),
                                      AttributionCallback("tracin", out_dir=d / "a", log_images=False)],
        "tracin/captured": lambda d: [GradientCapture(result_dir=d / "inrun"),
                                      AttributionCallback("tracin", out_dir=d / "a", log_images=False)],
        "tracin/captured/every4": lambda d: [GradientCapture(every_n_steps=4, result_dir=d / "inrun"),
                                             AttributionCallback("tracin", out_dir=d / "a", log_images=False)],
    }
    rows = {}
    for name, make in configs.items():
        d = work / name.replace("/", "_")
        row, res = run(name, make(d), train_ds, val_ds, args.epochs, d)
        lds = linear_datamodeling_score(np.asarray(res.scores), masks, truth)
        row.update(lds=round(float(lds["lds"]), 4), ci=[round(float(lds["ci_low"]), 3), round(float(lds["ci_high"]), 3)],
                   train_features=res.manifest.get("train_features", "post hoc"))
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps({"data": args.data, "n_train": len(xt), "n_query": len(xq), "epochs": args.epochs, "rows": rows}))


if __name__ == "__main__":
    main()

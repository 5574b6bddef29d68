"""Fit-end work vs training time at the defaults, post hoc vs with GradientCapture, and LDS of each.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_capture_fit_end.py
        [--data mnist5k|fashion|text|digits|synthetic] [--model mlp|cnn|text] [--subsets 100]
        [--configs plain,trak/post-hoc,trak/captured,...] [--repeats 3]

Data, models and training recipes are bench_ensemble_lds.py's (`load`, `build`, `RECIPES`): MNIST-5k MLP 784-256-10
(4,000 train / 500 queries, SGD momentum lr 0.05, batch 128, 20 epochs), Fashion-MNIST CNN conv16-conv32-fc10
(5,000 / 500, 10 epochs), a 2-layer text transformer (2,000 / 200, Adam, 15 epochs), digits / synthetic MLP
64-128-10. The queries are the validation set. The LDS ground truth is bench_ensemble_lds.py's cached subset
retrainings (`ground_truth`, benchmarks/_work/truth/...; computed here when missing; `--subsets 0` skips LDS).
Runs under Lightning, each a fresh fit (same seed), `--repeats R` times each, rotated (medians reported):
  plain              no callback: the training alone (train_over_plain = a run's training time / this one's)
  trak/post-hoc      CheckpointCapture() (default: 3 snapshots spread) + AttributionCallback("trak")
  trak/captured      GradientCapture(projector="tensorsketch") + CheckpointCapture()
                     + AttributionCallback("trak", train_features="capture")  (TRAK's train side from the capture)
  trak/captured/no-queries  the same with GradientCapture(..., query_dataset=None): no in-run query pass
  tracin/post-hoc    CheckpointCapture() + AttributionCallback("tracin")           (TracIn-CP over 3 snapshots)
  tracin/captured    GradientCapture() + AttributionCallback("tracin")             (in-run, queries = validation set)
  tracin/captured/every4  GradientCapture(every_n_steps=4) + AttributionCallback("tracin")
Training time = on_train_start -> on_train_end (capture overhead included); fit-end = on_train_end -> the end
of AttributionCallback.on_fit_end (featurize + fit + score + metrics).
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
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
from bench_ensemble_lds import DATA, DEFAULT_MODEL, RECIPES, build, ground_truth, load, recipe_for  # noqa: E402

from lightning_attrib import AttributionCallback, CheckpointCapture, GradientCapture  # noqa: E402
from lightning_attrib.metrics.lds import linear_datamodeling_score  # noqa: E402

warnings.filterwarnings("ignore")


class Lit(L.LightningModule):
    def __init__(self, data: str, model: str | None, recipe):
        super().__init__()
        self.net, self.recipe = build(data, model), recipe

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return self.recipe.make_optimizer(self.parameters())


class Timer(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.t1 = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        self.t2 = time.perf_counter()


def run(callbacks, train_ds, val_ds, args, recipe, work):
    torch.manual_seed(0)
    timer = Timer()
    L.Trainer(accelerator="cpu", max_epochs=recipe.epochs, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=work,
              callbacks=[*callbacks, timer]).fit(Lit(args.data, args.model, recipe),
                                                 DataLoader(train_ds, batch_size=recipe.batch, shuffle=True),
                                                 DataLoader(val_ds, batch_size=256))
    attrib = next((c for c in callbacks if isinstance(c, AttributionCallback)), None)
    if attrib is None:
        return {"train_s": round(timer.t1 - timer.t0, 3)}, None
    return {"train_s": round(timer.t1 - timer.t0, 3), "fit_end_s": round(timer.t2 - timer.t1, 3),
            "fit_end_over_train": round((timer.t2 - timer.t1) / (timer.t1 - timer.t0), 3)}, attrib.result


CONFIGS = {
    "plain": lambda d: [],   # the training alone (no callback): the reference for the capture overhead
    "trak/post-hoc": lambda d: [CheckpointCapture(dirpath=d / "snaps"),
                                AttributionCallback("trak", out_dir=d / "a", log_images=False)],
    # train_features= is being added to AttributionCallback; without it this raises TypeError (reported, skipped)
    "trak/captured": lambda d: [GradientCapture(projector="tensorsketch", result_dir=d / "inrun"),
                                CheckpointCapture(dirpath=d / "snaps"),
                                AttributionCallback("trak", out_dir=d / "a", log_images=False,
                                                    train_features="capture")],
    # the same without GradientCapture's in-run query pass (query_dataset=None): the capture cost TRAK needs
    "trak/captured/no-queries": lambda d: [GradientCapture(projector="tensorsketch", query_dataset=None),
                                           CheckpointCapture(dirpath=d / "snaps"),
                                           AttributionCallback("trak", out_dir=d / "a", log_images=False,
                                                               train_features="capture")],
    "tracin/post-hoc": lambda d: [CheckpointCapture(dirpath=d / "snaps"),
                                  AttributionCallback("tracin", out_dir=d / "a", log_images=False)],
    "tracin/captured": lambda d: [GradientCapture(result_dir=d / "inrun"),
                                  AttributionCallback("tracin", out_dir=d / "a", log_images=False)],
    "tracin/captured/every4": lambda d: [GradientCapture(every_n_steps=4, result_dir=d / "inrun"),
                                         AttributionCallback("tracin", out_dir=d / "a", log_images=False)],
}


def rss_gb() -> float:
    """This process's resident memory now (Linux /proc), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return float("nan")


def paired_difference(a: np.ndarray, b: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean over queries of per-query LDS a - b, with a 95% percentile bootstrap CI resampling queries (paired)."""
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    boot = d[np.random.default_rng(seed).integers(0, len(d), (n_bootstrap, len(d)))].mean(1)
    return {"mean": round(float(d.mean()), 4), "ci": [round(float(np.quantile(boot, 0.025)), 4),
                                                      round(float(np.quantile(boot, 0.975)), 4)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=DATA, default="digits")
    ap.add_argument("--model", choices=sorted(RECIPES), default=None, help="default: per data set")
    ap.add_argument("--subsets", type=int, default=40, help="ground-truth subsets for LDS (0: no LDS)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the model's recipe")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=1, help="fits per configuration (rotated); medians reported")
    args = ap.parse_args()
    (xt, yt), (xq, yq) = load(args.data)
    recipe = recipe_for(args.data, args.model, args.epochs)
    if args.subsets:
        masks, truth = ground_truth(args.data, args.model, recipe, xt, yt, xq, yq, args.subsets)
    train_ds, val_ds = TensorDataset(xt, yt), TensorDataset(xq, yq)
    work = Path(tempfile.mkdtemp())
    names = [n for n in args.configs.split(",") if n]
    runs: dict[str, list[dict]] = {}
    per_query: dict[str, np.ndarray] = {}
    for rep in range(args.repeats):   # configurations rotated: machine load spreads over all of them
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            d = work / f"{name.replace('/', '_')}_{rep}"
            try:
                callbacks = CONFIGS[name](d)
            except TypeError as err:   # an argument this tree's callbacks do not take yet
                if rep == 0:
                    print(f"{name}: not available in this tree ({err})", flush=True)
                continue
            row, res = run(callbacks, train_ds, val_ds, args, recipe, d)
            if res is not None:
                row["train_features"] = res.manifest.get("train_features", "post hoc")
                row["stages_s"] = res.manifest.get("timings", {})   # featurize / fit / score in the fit-end work
                if args.subsets:
                    lds = linear_datamodeling_score(np.asarray(res.scores), masks, truth)
                    per_query.setdefault(name, np.asarray(lds["per_query"], dtype=np.float64))
                    row.update(lds=round(float(lds["lds"]), 4),
                               ci=[round(float(lds["ci_low"]), 3), round(float(lds["ci_high"]), 3)])
            del callbacks, res
            gc.collect()   # a fit's Trainer / capture buffers are in reference cycles: free them before the next fit
            row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            row["rss_after_gb"] = rss_gb()   # growing over repeats = memory a finished fit kept
            runs.setdefault(name, []).append(row)
            print(name, json.dumps(row), flush=True)
            shutil.rmtree(d, ignore_errors=True)
    rows = {}
    for name, rs in runs.items():   # medians over the repeats; LDS and the rest from the first
        rows[name] = {**rs[0], **{k: round(float(np.median([r[k] for r in rs])), 3)
                                  for k in ("train_s", "fit_end_s", "fit_end_over_train") if k in rs[0]},
                      "repeats": len(rs)}
        if "plain" in runs and name != "plain":
            rows[name]["train_over_plain"] = round(rows[name]["train_s"] / rows["plain"]["train_s"], 3)
        if name != "trak/post-hoc" and name.startswith("trak/") and {name, "trak/post-hoc"} <= per_query.keys():
            rows[name]["lds_minus_post_hoc"] = paired_difference(per_query[name], per_query["trak/post-hoc"])
        print("median", name, json.dumps(rows[name]), flush=True)
    print(json.dumps({"data": args.data, "model": args.model or DEFAULT_MODEL[args.data], "n_train": len(xt),
                      "n_query": len(xq), "epochs": recipe.epochs, "subsets": args.subsets, "rows": rows}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

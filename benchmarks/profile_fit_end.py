"""Where the fit-end time goes at the defaults: CheckpointCapture() + AttributionCallback("trak") on a tiny MLP.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/profile_fit_end.py [--data digits|synthetic] [--repeat 3]
        [--profile] [--top 40] [--attrib-kwargs '{"batch_size": 256}'] [--threads 2]

Same recipe as bench_capture_fit_end.py (MLP 64-128-10, SGD momentum, batch 128, 20 epochs; digits 1,200 train /
200 queries, or generated data 2,000 / 200). Each repeat is a fresh fit into a fresh directory. Prints per repeat:
preflight (on_fit_start), training (on_train_start -> on_train_end), fit-end (on_train_end -> end of on_fit_end) and
the fit-end split by stage (wall clock of the pipeline's stages, wrapped by name), the ratio fit-end / training in
wall clock and in process CPU time (the 2 cores are shared: CPU time is the steadier of the two), and the medians.
`--profile` adds a cProfile of the last repeat's fit-end (cumulative process CPU time).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_capture_fit_end import Lit  # noqa: E402  (the digits / synthetic MLP 64-128-10 and its recipe)
from bench_ensemble_lds import RECIPES, load  # noqa: E402

from lightning_attrib import AttributionCallback, CheckpointCapture  # noqa: E402

warnings.filterwarnings("ignore")
STAGES: dict[str, float] = defaultdict(float)


class Timer(L.Callback):
    def __init__(self, profiler=None):
        self.profiler = profiler

    def on_train_start(self, trainer, pl_module):
        self.preflight_s = STAGES.pop("preflight (on_fit_start)", 0.0)
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module):
        self.t1, self.c1 = time.perf_counter(), time.process_time()
        STAGES.clear()
        if self.profiler:
            self.profiler.enable()

    def on_fit_end(self, trainer, pl_module):
        if self.profiler:
            self.profiler.disable()
        self.t2, self.c2 = time.perf_counter(), time.process_time()


def timed(owner, name, label=None):
    """Wrap owner.name so its wall time is summed under `label` (nested stages are reported as they are); names
    this version of the package lacks are skipped (the script serves the tree before and after a refactor)."""
    fn = getattr(owner, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            STAGES[label or name] += time.perf_counter() - t
    setattr(owner, name, wrapper)


def instrument():
    import importlib

    from lightning_attrib.callbacks import attribution as cb
    from lightning_attrib.core import pipeline
    from lightning_attrib.core.methods import trak
    from lightning_attrib.reporting import predictions

    A = pipeline.Attributor
    # before the split of Attributor (one class) and after it (core/features.py, core/scorer.py)
    owners = [A]
    for mod, cls in (("lightning_attrib.core.features", "SnapshotFeaturizer"), ("lightning_attrib.core.scorer", "Scorer")):
        try:
            owners.append(getattr(importlib.import_module(mod), cls))
        except (ImportError, AttributeError):
            pass
    for owner in owners:   # the class in brackets: after the split, Attributor's methods delegate (nested times)
        for name, label in (("_check_finished_shards", "check finished shards"),
                            ("_featurize_rows", "featurize rows (train+query)"),
                            ("_featurize_snapshot", "featurize snapshot (total)"), ("featurize", "featurize snapshot"),
                            ("_train_statistics", "kernel (train statistics)"),
                            ("train_statistics", "kernel (train statistics)"),
                            ("_self_influence", "self-influence"), ("self_influence", "self-influence"),
                            ("_score_my_queries", "scoring"), ("score_queries", "scoring")):
            timed(owner, name, f"{label} [{owner.__name__}]")
    timed(A, "_check_snapshots_readable", "check snapshots readable")
    timed(A, "_acquire_lock", "lock + stale staging")
    timed(A, "_open_store", "open store")
    timed(pipeline.Snapshot, "load", "snapshot torch.load")
    timed(pipeline, "weights_fingerprint", "weights sha256")
    timed(trak.TRAK, "fit", "TRAK.fit (inverse)")
    timed(A, "_excluded_rows", "excluded rows")
    timed(A, "_write_results", "stage + publish")
    timed(pipeline, "load_results", "load_results (after publish)")
    timed(A, "run", "Attributor.run (total)")
    timed(cb, "Attributor", "Attributor.__init__")
    timed(predictions, "predict", "predict (train+query, for loss baseline/tables)")
    timed(cb.AttributionCallback, "_evaluate_and_report", "metrics + reporting (total)")
    timed(cb, "captured_tracin", "captured_tracin check")
    timed(cb.AttributionCallback, "on_fit_start", "preflight (on_fit_start)")


def one_run(train_ds, val_ds, work, epochs, profiler=None, attrib_kwargs=None):
    torch.manual_seed(0)
    timer = Timer(profiler)
    cbs = [CheckpointCapture(dirpath=work / "snaps"),
           AttributionCallback("trak", out_dir=work / "a", log_images=False, **(attrib_kwargs or {}))]
    L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=work,
              callbacks=[*cbs, timer]).fit(Lit("digits", "mlp", RECIPES["mlp"]), DataLoader(train_ds, batch_size=128, shuffle=True),
                                           DataLoader(val_ds, batch_size=256))
    train_s, fit_end_s = timer.t1 - timer.t0, timer.t2 - timer.t1
    return {"preflight_s": round(timer.preflight_s, 3), "train_s": round(train_s, 3), "fit_end_s": round(fit_end_s, 3),
            "fit_end_over_train": round(fit_end_s / train_s, 3),
            "cpu_train_s": round(timer.c1 - timer.c0, 3), "cpu_fit_end_s": round(timer.c2 - timer.c1, 3),
            "cpu_ratio": round((timer.c2 - timer.c1) / (timer.c1 - timer.c0), 3),
            "stages": {k: round(v, 4) for k, v in sorted(STAGES.items(), key=lambda kv: -kv[1])},
            "manifest_timings": cbs[1].result.manifest.get("timings")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--attrib-kwargs", type=json.loads, default={}, help='e.g. \'{"batch_size": 256}\'')
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: OMP_NUM_THREADS)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (xt, yt), (xq, yq) = load(args.data)
    train_ds, val_ds = TensorDataset(xt, yt), TensorDataset(xq, yq)
    instrument()
    work = Path(tempfile.mkdtemp())
    rows = []
    for r in range(args.repeat):
        # CPU time per function (the cores are shared: wall time would mostly measure the other jobs)
        prof = cProfile.Profile(time.process_time) if args.profile and r == args.repeat - 1 else None
        # preflight is timed separately (its own stage entry is cleared at on_train_end): keep it
        row = one_run(train_ds, val_ds, work / f"r{r}", args.epochs, prof, args.attrib_kwargs)
        rows.append(row)
        print(json.dumps({"data": args.data, "repeat": r, **row}), flush=True)
        if prof is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.top)
            print(s.getvalue())
    def median(key):
        return sorted(r[key] for r in rows)[len(rows) // 2]
    print(json.dumps({"data": args.data, "attrib_kwargs": args.attrib_kwargs, "threads": torch.get_num_threads(),
                      "n_train": len(xt), "median_ratio": median("fit_end_over_train"),
                      "median_cpu_ratio": median("cpu_ratio"), "ratios": [r["fit_end_over_train"] for r in rows],
                      "cpu_ratios": [r["cpu_ratio"] for r in rows], "train_s": [r["train_s"] for r in rows],
                      "fit_end_s": [r["fit_end_s"] for r in rows]}))


if __name__ == "__main__":
    main()

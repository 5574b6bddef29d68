"""The default (float32 products) fit-end against the float64 reference, and featurization CPU by batch size.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/check_fit_end_numerics.py [--data digits|synthetic]
        [--batch-sizes 64,128,256,512]

MLP 64-128-10 trained as in bench_ensemble_lds.py (20 epochs, snapshots after epochs 7, 14, 20), TRAK k = 2048 on
the three snapshots through `Attributor`. Prints (1) the manifest timings of score_dtype="float32" (default) and
"float64", the float32 scores' and self-influence's max |error| relative to the float64 result's max, and the
smallest per-query Spearman correlation; (2) the featurization stage's process CPU time per batch size (min of 3).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_ensemble_lds import load, train  # noqa: E402

from lightning_attrib.core import Attributor, pipeline  # noqa: E402
from lightning_attrib.core.methods import make_method  # noqa: E402

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    ap.add_argument("--batch-sizes", default="64,128,256,512")
    args = ap.parse_args()
    (xt, yt), (xq, yq) = load(args.data)
    model, snaps = train(xt, yt, seed=0, epochs=20, snapshot_epochs=(7, 14, 20))
    train_ds, query_ds = TensorDataset(xt, yt), TensorDataset(xq, yq)

    res = {}
    for dtype in ("float32", "float64"):
        r = Attributor(model, make_method("trak"), train_ds, query_ds, tempfile.mkdtemp(), score_dtype=dtype).run(snaps)
        res[dtype] = (np.asarray(r.scores, np.float64), np.asarray(r.self_influence, np.float64), r.manifest)
    (s32, i32, m32), (s64, i64, m64) = res["float32"], res["float64"]
    print(json.dumps({
        "data": args.data, "n_train": len(xt), "kernel_form": m32["kernel_form"],
        "timings_float32": m32["timings"], "timings_float64": m64["timings"],
        "scores_max_rel_err": float(np.abs(s32 - s64).max() / np.abs(s64).max()),
        "self_influence_max_rel_err": float(np.abs(i32 - i64).max() / np.abs(i64).max()),
        "min_query_spearman": float(min(spearmanr(s32[:, q], s64[:, q])[0] for q in range(s64.shape[1]))),
    }), flush=True)

    featurize = pipeline.Attributor.__dict__.get("_featurize_snapshot")
    if featurize is None:   # after the Attributor split, featurization is SnapshotFeaturizer.featurize
        from lightning_attrib.core.features import SnapshotFeaturizer as owner
        name = "featurize"
    else:
        owner, name = pipeline.Attributor, "_featurize_snapshot"
    original, spent = getattr(owner, name), [0.0]

    def timed(*a, **k):
        t = time.process_time()
        try:
            return original(*a, **k)
        finally:
            spent[0] += time.process_time() - t
    setattr(owner, name, timed)
    row = {}
    for bs in (int(v) for v in args.batch_sizes.split(",")):
        best = float("inf")
        for _ in range(3):
            spent[0] = 0.0
            Attributor(model, make_method("trak"), train_ds, query_ds, tempfile.mkdtemp(), batch_size=bs).run(snaps)
            best = min(best, spent[0])
        row[bs] = round(best, 3)
    print(json.dumps({"data": args.data, "featurize_cpu_s_by_batch_size": row}))


if __name__ == "__main__":
    main()

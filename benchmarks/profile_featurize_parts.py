"""What one post-hoc featurization pass costs, part by part (the fit-end's largest stage after the numerics).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/profile_featurize_parts.py [--data digits|synthetic]

MLP 64-128-10 trained as in bench_capture_fit_end.py; the train + query rows (1,400 for digits, 2,200 generated)
go through each part alone at batch sizes 64 (the default) and 256, minimum process CPU time of 5 passes:
  loader      DataLoader(Subset(TensorDataset)) iteration (per-example __getitem__ + collate)
  slices      the same batches by slicing the tensors (what a TensorDataset fast path would cost)
  sketch      tensor-sketch features (k = 2048) of every batch (one batched forward + backward through the hooks)
  q_forward   TRAK's Q by `output.loss_weight` (a second forward per batch)
  fingerprint BatchFingerprint of every batch
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_ensemble_lds import load, train  # noqa: E402

from lightning_attrib.core.io import BatchFingerprint  # noqa: E402
from lightning_attrib.core.sketch import make_projector  # noqa: E402
from lightning_attrib.core.tasks import resolve_output  # noqa: E402


def cpu(fn, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return round(best, 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    args = ap.parse_args()
    (xt, yt), (xq, yq) = load(args.data)
    model, _ = train(xt, yt, seed=0, epochs=20)
    x, y = torch.cat([xt, xq]), torch.cat([yt, yq])
    ds = TensorDataset(x, y)
    output = resolve_output(None, default="margin", module=model, dataset=ds)
    proj = make_projector("tensorsketch", model, output, [n for n, _ in model.named_parameters()], 2048, 0)
    model.eval()
    out = {"data": args.data, "rows": len(x)}
    for bs in (64, 256):
        batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]

        def loader():
            for lo in range(0, len(x), 512):   # shards of 512 rows, as the store's
                for _ in DataLoader(Subset(ds, range(lo, min(len(x), lo + 512))), batch_size=bs):
                    pass

        def fingerprint():
            f = BatchFingerprint()
            for b in batches:
                f.update(b)
            f.hexdigest()

        out[f"bs{bs}"] = {
            "loader": cpu(loader),
            "slices": cpu(lambda: [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]),
            "sketch": cpu(lambda: [proj(b) for b in batches]),
            "q_forward": cpu(lambda: [output.loss_weight(model, b) for b in batches]),
            "fingerprint": cpu(fingerprint),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

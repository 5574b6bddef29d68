"""Cost of the trust checks (issue 14): a fresh run and a rerun into the same out_dir (everything reused after the
checksum and data-fingerprint checks), digits MLP, 1500 train x 200 queries, tensorsketch k=2048.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_trust_overhead.py
(run once with PYTHONPATH pointing at the tree to measure; compare trees on the same machine, back to back)
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor
from lightning_attrib.data import load_digits_tensors


def main() -> None:
    torch.set_num_threads(1)
    x, y = load_digits_tensors(None)
    train, query = TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:1700], y[1500:1700])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    out = Path(tempfile.mkdtemp()) / "run"
    times = {}
    for label in ("fresh", "rerun"):
        t0 = time.perf_counter()
        Attributor(model, TRAK(), train, query, out, proj_dim=2048, shard_size=256).run()
        times[label + "_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(times))


if __name__ == "__main__":
    main()

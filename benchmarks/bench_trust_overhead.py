"""Cost of the trust checks (issue 14): a fresh run and a rerun into the same out_dir (everything reused after the
checksum and data-fingerprint checks), minimum of 5, digits MLP, 1500 train x 200 queries, tensorsketch k=2048.

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
    times = {"fresh_s": [], "rerun_s": []}
    for repeat in range(5):  # the minimum of 5: the box is shared
        out = Path(tempfile.mkdtemp()) / "run"
        for label in ("fresh_s", "rerun_s"):
            t0 = time.perf_counter()
            Attributor(model, TRAK(), train, query, out, proj_dim=2048, shard_size=256).run()
            times[label].append(time.perf_counter() - t0)
    print(json.dumps({k: round(min(v), 3) for k, v in times.items()}))


if __name__ == "__main__":
    main()

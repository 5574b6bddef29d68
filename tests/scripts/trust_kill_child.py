"""Child process of the kill test (tests/test_trust_kill.py) and the soak benchmark (benchmarks/bench_kill_resume.py):
run attribution into OUT_DIR and SIGKILL itself at a chosen point.

    python tests/scripts/trust_kill_child.py OUT_DIR DATA_SEED STAGE N [THREADS]

STAGE / N: "featurize" the N-th file the feature store writes (ids, loss weights, features, records);
"kernel" the N-th shard read while reducing the kernel; "scoring" the N-th score block; "publishing" the N-th
file renamed from the staging directory into OUT_DIR (the manifest is the last); "none" runs to the end.
"""
from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

N_TRAIN, N_QUERY = 96, 12
KWARGS = dict(proj_dim=16, projector="rademacher", shard_size=8, batch_size=8, query_chunk=4)
STAGES = ("featurize", "kernel", "scoring", "publishing")
# kill points per stage when the run replaces an older result of other data: featurize writes 3 files per shard
# (loss weights, features, record) for 12 train + 2 query shards; the kernel reads 12 train shards; scoring adds
# 12 x 3 blocks; publishing renames 5 files (manifest last)
STAGE_POINTS = {"featurize": 3 * (N_TRAIN // 8 + 2), "kernel": N_TRAIN // 8, "scoring": (N_TRAIN // 8) * (N_QUERY // 4),
                "publishing": 5}


def problem(data_seed: int):
    """(module, train, query) of the kill test; `data_seed` changes the data (an "older" result uses another)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(data_seed)
    x, y = torch.randn(N_TRAIN + N_QUERY, 6, generator=g), torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=g)
    return module, TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


def run(out_dir, data_seed: int):
    from lightning_attrib.core import TRAK, Attributor

    module, train, query = problem(data_seed)
    return Attributor(module, TRAK(), train, query, out_dir, **KWARGS).run()


def _kill_at(stage: str, n: int) -> None:
    """Patch the pipeline so that the process SIGKILLs itself at the n-th event of `stage`."""
    from lightning_attrib.core import io, pipeline, scoring, store

    count = {"n": 0}

    def tick():
        count["n"] += 1
        if count["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            tick()
            return out
        return wrapper

    if stage == "featurize":
        store.atomic_save_npy = counted(io.atomic_save_npy)
        store.atomic_write_json = counted(io.atomic_write_json)
    elif stage == "kernel":
        original = store.FeatureStore.iter_shards

        def iter_shards(self, *args, **kwargs):
            for item in original(self, *args, **kwargs):
                yield item
                if getattr(self, "_in_kernel", False):
                    tick()
        store.FeatureStore.iter_shards = iter_shards
        stats = pipeline.Attributor._train_statistics

        def train_statistics(self, st, snaps):
            st._in_kernel = True
            try:
                return stats(self, st, snaps)
            finally:
                st._in_kernel = False
        pipeline.Attributor._train_statistics = train_statistics
    elif stage == "scoring":
        scoring.FullScoresSink.add = counted(scoring.FullScoresSink.add)
    elif stage == "publishing":
        real = os.replace

        def replace(src, dst):
            real(src, dst)
            if ".staging-" in str(src) and ".staging-" not in str(dst):
                tick()
        os.replace = replace
    elif stage != "none":
        raise SystemExit(f"unknown stage {stage!r}")


if __name__ == "__main__":
    out, seed, stage, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    _kill_at(stage, n)
    run(out, seed)

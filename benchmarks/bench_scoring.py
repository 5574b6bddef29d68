"""Scoring throughput and memory of the store-streamed scorer vs a plain matmul (issue #8).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_scoring.py --n-train 20000 60000 --k 4096 --n-query 1000

Synthetic float32 features (standard normal, seeded) are written with `FeatureStore` in the layout the
pipeline uses (`shard_size` rows per .npz, default 512 like `Attributor`). Then, each in a FRESH
subprocess so that `ru_maxrss` (peak resident set) belongs to that step alone:

  * scorer   - `Attributor._score_my_queries` (the exact code `Attributor.run` scores with) with a `TRAK()`
               fitted on a synthetic SPD kernel (G^T G, G (2048, k) normal) and random loss weights Q:
               reads the query rows, transforms them (float64 @ (K + lambda I)^-1), then streams the train
               shards: `np.load` of the .npz, float64 cast, (512, k) @ (k, n_query) float64 matmul, Q scaling,
               float32 write into the memmapped part file `.parts/scores-rank0000.npy`.
  * read     - the same train-shard reads alone (`FeatureStore.read_shard`), and with the float64 cast.
  * mm32/64  - plain `torch.matmul(Phi, X.T)` with Phi (n_train, k), X (n_query, k) already in memory
               (float32 / float64), filled from the same generator; only the matmul is timed.

Throughput = 2 * n_train * k * n_query / time (the scorer's extra query transform, 2 * n_query * k^2,
is not counted as useful work). Times are the best of `--repeats`; wall and process-CPU time are both
given (the machine is shared; with one torch thread CPU time is close to the compute). Peak RSS is the
subprocess's `ru_maxrss`, and "base" its RSS right before the timed part (python + torch + inputs).
A numerical check compares a few scorer rows with a direct float64 computation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SNAP = "final"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def shard_features(seed: int, shard: int, rows: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    return torch.randn(rows, k, generator=g)


def query_features(seed: int, n_query: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7 + 99991)
    return torch.randn(n_query, k, generator=g)


def open_store(root: Path, k: int, shard_size: int, create: bool):
    from lightning_attrib.core import FeatureStore
    return FeatureStore(root, {"bench": "synthetic", "k": k}, shard_size, create=create)


# -- workers (each runs in its own process) ------------------------------------------------------------
def w_write(a) -> dict:
    store = open_store(Path(a.root), a.k, a.shard_size, True)
    store.register_snapshot(SNAP, "synthetic")
    store.create(SNAP, "train", np.arange(a.n_train))
    store.create(SNAP, "query", np.arange(a.n_query))
    t0 = time.perf_counter()
    for s in range(store.num_shards(a.n_train)):
        lo, hi = store.shard_range(s, a.n_train)
        store.write_shard(SNAP, "train", s, shard_features(a.seed, s, hi - lo, a.k).numpy(), np.ones(hi - lo, np.float32))
    q = query_features(a.seed, a.n_query, a.k)
    for s in range(store.num_shards(a.n_query)):
        lo, hi = store.shard_range(s, a.n_query)
        store.write_shard(SNAP, "query", s, q[lo:hi].numpy(), np.ones(hi - lo, np.float32))
    return {"write_s": time.perf_counter() - t0}


def _best(fn, repeats: int) -> tuple[float, float]:
    best_w, best_c = float("inf"), float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_w, best_c = min(best_w, time.perf_counter() - w0), min(best_c, time.process_time() - c0)
    return best_w, best_c


def w_scorer(a) -> dict:
    from torch import nn
    from torch.utils.data import TensorDataset

    from lightning_attrib.core import TRAK, Attributor, Snapshot
    from lightning_attrib.core.methods.base import SnapshotInfo, TrainStatistics

    out_dir = Path(a.root) / "attr_out"
    store = open_store(Path(a.root), a.k, a.shard_size, False)
    att = Attributor(nn.Linear(1, 1), TRAK(), TensorDataset(torch.zeros(a.n_train, 1)),
                     TensorDataset(torch.zeros(a.n_query, 1)), out_dir, shard_size=a.shard_size,
                     query_chunk=a.query_chunk)
    g = torch.Generator().manual_seed(a.seed + 5)
    G = torch.randn(2048, a.k, generator=g)
    kernel = (G.T @ G).double()
    del G
    q = torch.rand(a.n_train, generator=g, dtype=torch.float64) + 0.5
    method = att.method
    t0 = time.perf_counter()
    method.fit(TrainStatistics([SnapshotInfo(SNAP)], a.n_train, a.k, kernels=[kernel], loss_weight=q))
    fit_s = time.perf_counter() - t0
    del kernel
    snaps = [Snapshot(SNAP, state_dict={})]
    weights = method.train_weights()
    base = rss_mb()
    wall, cpu = _best(lambda: att._score_my_queries(store, snaps, weights), a.repeats)
    peak = peak_mb()
    # numerical check of a few rows (after the peak was taken)
    part = np.load(att._part_path(0), mmap_mode="r")
    rows = np.array([0, 1, a.n_train // 2, a.n_train - 1])
    Q = method.transform(0, query_features(a.seed, a.n_query, a.k).double())
    err = 0.0
    for r in rows.tolist():
        s = r // a.shard_size
        f = shard_features(a.seed, s, store.shard_range(s, a.n_train)[1] - s * a.shard_size, a.k)[r - s * a.shard_size]
        ref = (f.double() @ Q.T) * q[r]
        err = max(err, float((torch.from_numpy(np.asarray(part[r])).double() - ref).abs().max() / ref.abs().max()))
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak, "base_mb": base, "fit_s": fit_s, "max_rel_err": err}


def w_read(a) -> dict:
    store = open_store(Path(a.root), a.k, a.shard_size, False)
    shards = range(store.num_shards(a.n_train))

    def read():
        for s in shards:
            store.read_shard(SNAP, "train", s)

    def read_cast():
        for s in shards:
            torch.from_numpy(store.read_shard(SNAP, "train", s)[0]).to(torch.float64)

    rw, rc = _best(read, a.repeats)
    cw, cc = _best(read_cast, a.repeats)
    return {"read_wall_s": rw, "read_cpu_s": rc, "read_cast_wall_s": cw, "read_cast_cpu_s": cc, "peak_mb": peak_mb()}


def w_matmul(a) -> dict:
    dtype = torch.float32 if a.worker == "mm32" else torch.float64
    phi = torch.empty(a.n_train, a.k, dtype=dtype)
    for s in range((a.n_train + a.shard_size - 1) // a.shard_size):
        lo, hi = s * a.shard_size, min(a.n_train, (s + 1) * a.shard_size)
        phi[lo:hi] = shard_features(a.seed, s, hi - lo, a.k)
    x = query_features(a.seed, a.n_query, a.k).to(dtype)
    base = rss_mb()
    out = {}

    def mm():
        out["y"] = None  # free the previous result before the next repeat
        out["y"] = torch.matmul(phi, x.T)

    wall, cpu = _best(mm, a.repeats)
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak_mb(), "base_mb": base}


WORKERS = {"write": w_write, "scorer": w_scorer, "read": w_read, "mm32": w_matmul, "mm64": w_matmul}


def run_worker(name: str, a, root: Path, n_train: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--root", str(root), "--n-train", str(n_train),
           "--k", str(a.k), "--n-query", str(a.n_query), "--shard-size", str(a.shard_size),
           "--query-chunk", str(a.query_chunk), "--repeats", str(a.repeats), "--seed", str(a.seed),
           "--threads", str(a.threads)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"worker {name} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  [{name:6s} n_train={n_train}] {json.dumps({k: round(v, 4) for k, v in out.items()})} "
          f"(process {time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, nargs="+", default=[20000, 60000])
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n-query", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--query-chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the synthetic stores go (deleted afterwards)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        a.n_train = a.n_train[0]
        print(json.dumps(WORKERS[a.worker](a)))
        return

    print(f"torch {torch.__version__}, {a.threads} thread(s), k={a.k}, n_query={a.n_query}, "
          f"shard_size={a.shard_size}, repeats={a.repeats}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="bench_scoring_", dir=a.workdir))
    rows = []
    try:
        for n in a.n_train:
            root = base / f"n{n}"
            r = {"n_train": n, "k": a.k, "n_query": a.n_query}
            r["write"] = run_worker("write", a, root, n)
            for name in ("scorer", "read", "mm32", "mm64"):
                r[name] = run_worker(name, a, root, n)
            rows.append(r)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print("\n| n_train | k | n_query | path | wall s | GFLOP/s (wall) | GFLOP/s (CPU) | peak RSS MiB | base RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flops = 2.0 * r["n_train"] * r["k"] * r["n_query"]
        for name, label in (("scorer", "scorer (`_score_my_queries`)"), ("mm32", "torch.matmul float32"),
                            ("mm64", "torch.matmul float64")):
            x = r[name]
            print(f"| {r['n_train']} | {r['k']} | {r['n_query']} | {label} | {x['wall_s']:.2f} | "
                  f"{flops / x['wall_s'] / 1e9:.1f} | {flops / x['cpu_s'] / 1e9:.1f} | {x['peak_mb']:.0f} | "
                  f"{x['base_mb']:.0f} |")
    print()
    for r in rows:
        s, m32, m64, rd = r["scorer"], r["mm32"], r["mm64"], r["read"]
        print(f"n_train={r['n_train']}: scorer / matmul32 throughput = {m32['wall_s'] / s['wall_s']:.2f} (wall), "
              f"{m32['cpu_s'] / s['cpu_s']:.2f} (CPU); scorer / matmul64 = {m64['wall_s'] / s['wall_s']:.2f} (wall), "
              f"{m64['cpu_s'] / s['cpu_s']:.2f} (CPU); shard reads {rd['read_wall_s']:.2f} s "
              f"(+ float64 cast {rd['read_cast_wall_s']:.2f} s); fit {s['fit_s']:.1f} s; "
              f"store write {r['write']['write_s']:.1f} s; max rel err {s['max_rel_err']:.1e}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

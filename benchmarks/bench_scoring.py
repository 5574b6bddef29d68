"""Scoring throughput and memory of the store-streamed scorer vs a plain matmul (issue #8).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_scoring.py --n-train 20000 60000 --k 4096 --n-query 1000

Synthetic float32 features (standard normal, seeded) are written with `FeatureStore` in the layout the
pipeline uses (`shard_size` rows per `shard-XXXXXX.npy`, default 512 like `Attributor`). Then, each in a FRESH
subprocess so that the peak resident set belongs to that step alone:

  * scorer32 - `Attributor._score_my_queries` (the exact code `Attributor.run` scores with), `score_dtype="float32"`
               (the default), with a `TRAK()` fitted on a synthetic SPD kernel (G^T G, G (2048, k) normal) and random
               loss weights Q: reads the query rows, transforms them in float64 (@ (K + lambda I)^-1), casts them to
               float32 once, then streams the train shards (read by a prefetch thread one shard ahead), (512, k) @
               (k, n_query) float32 GEMM, Q scaling, write into the memmapped part file `.parts/scores-rank0000.npy`.
  * scorer64 - the same with `score_dtype="float64"` (the shards cast to float64, float64 GEMM).
  * topk     - the same as scorer32 with `top_k=--top-k`: a running top-k of proponents and opponents per query
               (torch.topk over [best k, new block]), no n_train x n_query anywhere; `.parts/topk-rank0000.npz`.
  * read     - the train-shard reads alone: into memory (`read_features(mmap=False)`, what the scorer's prefetch
               thread does) and memory-mapped (`mmap=True`, touched by a sum so the pages are really read).
  * mm32/64  - plain `torch.matmul(Phi, X.T)` with Phi (n_train, k), X (n_query, k) already in memory
               (float32 / float64), filled from the same generator; only the matmul is timed.

Throughput = 2 * n_train * k * n_query / time (the scorer's extra query transform, 2 * n_query * k^2 in float64,
is not counted as useful work). Times are the best of `--repeats`; wall and process-CPU time are both
given (the machine is shared; with one torch thread CPU time is close to the compute). RSS: "base" is the
subprocess's RSS right before the timed part (python + torch + inputs + the fitted k x k inverse), "peak (timed
part)" its VmHWM during the timed part alone (the window is reset through /proc/self/clear_refs), "peak
(process)" over the whole subprocess (for the scorers that includes fitting TRAK's k x k float64 inverse).
Numerical checks: a few full-matrix rows against a direct float64 computation, and the top-k of a few queries
against the top-k of their directly computed float64 score columns.
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
    """Peak resident set (VmHWM) since the process started or since the last `reset_peak()`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak() -> float:
    """Start a new peak-RSS window (Linux: "5" > /proc/self/clear_refs); returns the peak of the window before."""
    before = peak_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before


def timed_with_peak(fn, repeats: int) -> dict:
    """Best wall / CPU of `fn` over `repeats`, the RSS before it, the peak RSS during it and of the whole process."""
    process_peak = reset_peak()
    base = rss_mb()
    wall, cpu = _best(fn, repeats)
    peak = peak_mb()
    return {"wall_s": wall, "cpu_s": cpu, "base_mb": base, "peak_mb": peak, "process_peak_mb": max(process_peak, peak)}


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


def _fitted_attributor(a, **kw):
    """An `Attributor` over the synthetic store with a TRAK fitted on a synthetic kernel; (att, method, q, fit_s)."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from lightning_attrib.core import TRAK, Attributor
    from lightning_attrib.core.methods.base import SnapshotInfo, TrainStatistics

    # a stand-in model and (x, y) data: the stores are synthetic, but the Attributor reads a batch to pick its task
    data = [TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long)) for n in (a.n_train, a.n_query)]
    att = Attributor(nn.Linear(1, 2), TRAK(), data[0], data[1], Path(a.root) / "attr_out", shard_size=a.shard_size,
                     query_chunk=a.query_chunk, **kw)
    g = torch.Generator().manual_seed(a.seed + 5)
    G = torch.randn(2048, a.k, generator=g)
    kernel = (G.T @ G).double()
    del G
    q = torch.rand(a.n_train, generator=g, dtype=torch.float64) + 0.5
    t0 = time.perf_counter()
    att.method.fit(TrainStatistics([SnapshotInfo(SNAP)], a.n_train, a.k, kernels=[kernel], loss_weight=q))
    return att, att.method, q, time.perf_counter() - t0


def _reference_columns(a, method, q, queries: list[int]) -> torch.Tensor:
    """(n_train, len(queries)) float64 scores computed directly from regenerated features."""
    tq = method.transform(0, query_features(a.seed, a.n_query, a.k)[queries].double()).T
    out = torch.empty(a.n_train, len(queries), dtype=torch.float64)
    for s in range((a.n_train + a.shard_size - 1) // a.shard_size):
        lo, hi = s * a.shard_size, min(a.n_train, (s + 1) * a.shard_size)
        out[lo:hi] = shard_features(a.seed, s, hi - lo, a.k).double() @ tq
    return out * q[:, None]


NOTHING_EXCLUDED = {"train": [], "query": []}   # no non-finite rows in synthetic features


def w_scorer(a) -> dict:
    from lightning_attrib.core import Snapshot

    att, method, q, fit_s = _fitted_attributor(a, score_dtype="float64" if a.worker == "scorer64" else "float32")
    store = open_store(Path(a.root), a.k, a.shard_size, False)
    snaps = [Snapshot(SNAP, state_dict={})]
    weights = method.train_weights()
    timed = timed_with_peak(lambda: att._score_my_queries(store, snaps, weights, NOTHING_EXCLUDED), a.repeats)
    # numerical check of a few rows (after the peak was taken)
    part = np.load(att._parts().scores_path(0), mmap_mode="r")
    rows = np.array([0, 1, a.n_train // 2, a.n_train - 1])
    Q = method.transform(0, query_features(a.seed, a.n_query, a.k).double())
    err = 0.0
    for r in rows.tolist():
        s = r // a.shard_size
        f = shard_features(a.seed, s, store.shard_range(s, a.n_train)[1] - s * a.shard_size, a.k)[r - s * a.shard_size]
        ref = (f.double() @ Q.T) * q[r]
        err = max(err, float((torch.from_numpy(np.asarray(part[r])).double() - ref).abs().max() / ref.abs().max()))
    return {**timed, "fit_s": fit_s, "max_rel_err": err}


def w_topk(a) -> dict:
    from lightning_attrib.core import Snapshot

    att, method, q, fit_s = _fitted_attributor(a, top_k=a.top_k)
    store = open_store(Path(a.root), a.k, a.shard_size, False)
    snaps = [Snapshot(SNAP, state_dict={})]
    weights = method.train_weights()
    timed = timed_with_peak(lambda: att._score_my_queries(store, snaps, weights, NOTHING_EXCLUDED), a.repeats)
    part = np.load(att._parts().topk_path(0))
    queries = [0, a.n_query // 2, a.n_query - 1]
    ref = _reference_columns(a, method, q, queries)
    same = total = 0
    err = 0.0
    for j, qi in enumerate(queries):
        for side, largest in (("proponents", True), ("opponents", False)):
            vals, rows = torch.topk(ref[:, j], a.top_k, largest=largest)
            same += int((torch.from_numpy(part[f"topk_{side}"][qi]) == rows).sum())
            total += a.top_k
            err = max(err, float((torch.from_numpy(part[f"topk_{side}_scores"][qi]).double() - vals).abs().max()
                                 / ref[:, j].abs().max()))
    return {**timed, "fit_s": fit_s, "topk_index_agreement": same / total, "topk_max_rel_err": err}


def w_read(a) -> dict:
    store = open_store(Path(a.root), a.k, a.shard_size, False)
    shards = range(store.num_shards(a.n_train))

    def read():
        for s in shards:
            store.read_features(SNAP, "train", s, mmap=False)

    def read_mmap():
        for s in shards:
            float(store.read_features(SNAP, "train", s).sum())  # touch every page

    rw, rc = _best(read, a.repeats)
    mw, mc = _best(read_mmap, a.repeats)
    return {"read_wall_s": rw, "read_cpu_s": rc, "mmap_sum_wall_s": mw, "mmap_sum_cpu_s": mc, "peak_mb": peak_mb()}


def w_matmul(a) -> dict:
    dtype = torch.float32 if a.worker == "mm32" else torch.float64
    phi = torch.empty(a.n_train, a.k, dtype=dtype)
    for s in range((a.n_train + a.shard_size - 1) // a.shard_size):
        lo, hi = s * a.shard_size, min(a.n_train, (s + 1) * a.shard_size)
        phi[lo:hi] = shard_features(a.seed, s, hi - lo, a.k)
    x = query_features(a.seed, a.n_query, a.k).to(dtype)
    out = {}

    def mm():
        out["y"] = None  # free the previous result before the next repeat
        out["y"] = torch.matmul(phi, x.T)

    return timed_with_peak(mm, a.repeats)


WORKERS = {"write": w_write, "scorer32": w_scorer, "scorer64": w_scorer, "topk": w_topk, "read": w_read,
           "mm32": w_matmul, "mm64": w_matmul}
PATHS = (("scorer32", "scorer float32 (default)"), ("scorer64", "scorer float64"), ("topk", "scorer top-k"),
         ("mm32", "torch.matmul float32"), ("mm64", "torch.matmul float64"))


def run_worker(name: str, a, root: Path, n_train: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--root", str(root), "--n-train", str(n_train),
           "--k", str(a.k), "--n-query", str(a.n_query), "--shard-size", str(a.shard_size),
           "--query-chunk", str(a.query_chunk), "--repeats", str(a.repeats), "--seed", str(a.seed),
           "--threads", str(a.threads), "--top-k", str(a.top_k)]
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
    p.add_argument("--top-k", type=int, default=10, help="k of the top-k path (proponents and opponents per query)")
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
            for name in ("scorer32", "scorer64", "topk", "read", "mm32", "mm64"):
                r[name] = run_worker(name, a, root, n)
            rows.append(r)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print("\n| n_train | k | n_query | path | wall s | CPU s | GFLOP/s (wall) | GFLOP/s (CPU) | vs matmul32 (CPU) "
          "| base RSS MiB | peak RSS MiB (timed part) | peak RSS MiB (process) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flops = 2.0 * r["n_train"] * r["k"] * r["n_query"]
        for name, label in PATHS:
            x = r[name]
            print(f"| {r['n_train']} | {r['k']} | {r['n_query']} | {label} | {x['wall_s']:.2f} | {x['cpu_s']:.2f} | "
                  f"{flops / x['wall_s'] / 1e9:.1f} | {flops / x['cpu_s'] / 1e9:.1f} | "
                  f"{r['mm32']['cpu_s'] / x['cpu_s']:.2f} | {x['base_mb']:.0f} | {x['peak_mb']:.0f} | "
                  f"{x['process_peak_mb']:.0f} |")
    print()
    for r in rows:
        s32, s64, tk, m32, rd = r["scorer32"], r["scorer64"], r["topk"], r["mm32"], r["read"]
        print(f"n_train={r['n_train']}: vs matmul32 (wall / CPU): scorer32 {m32['wall_s'] / s32['wall_s']:.2f} / "
              f"{m32['cpu_s'] / s32['cpu_s']:.2f}, scorer64 {m32['wall_s'] / s64['wall_s']:.2f} / "
              f"{m32['cpu_s'] / s64['cpu_s']:.2f}, top-{a.top_k} {m32['wall_s'] / tk['wall_s']:.2f} / "
              f"{m32['cpu_s'] / tk['cpu_s']:.2f}; shard reads {rd['read_wall_s']:.2f} s "
              f"(mmap + sum {rd['mmap_sum_wall_s']:.2f} s); fit {s32['fit_s']:.1f} s; "
              f"store write {r['write']['write_s']:.1f} s; max rel err float32 {s32['max_rel_err']:.1e}, "
              f"float64 {s64['max_rel_err']:.1e}; top-k index agreement {tk['topk_index_agreement']:.3f}, "
              f"score rel err {tk['topk_max_rel_err']:.1e}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

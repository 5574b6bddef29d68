"""Scaling of the full `Attributor` with n_train (issue #8): Fashion-MNIST 1k -> 60k, time and peak memory.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_scaling.py                    # n 1k 5k 20k 60k, k 2048
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_scaling.py --ks 2048 4096 --json scaling.json

For every (k, n_train) a FRESH subprocess (so that the peak resident set, `ru_maxrss`, belongs to that size
alone) does:

  1. loads the first n_train Fashion-MNIST training images and the first `--n-query` t10k images
     (`lightning_attrib.data.load_fashion_mnist(limit=...)`, which decodes only those bytes);
  2. trains the model (`--model cnn`: bench_featurize's CNN, 20,490 params; or `mlp` 784-256-256-10) for ONE
     epoch on those n_train images (Adam 1e-3, batch 64, seeded), timed;
  3. runs `Attributor(model, TRAK(), train, queries, out_dir, proj_dim=k, projector="factorized").run()`
     with one snapshot (the trained weights) and reports its own stage timings (`Attributor.timings`:
     featurize = train + query features into the store; fit = kernel accumulation over the shards + TRAK's
     damped inverse; score = self-influence + the streamed score matrix), the total wall time of `run()`
     (which also writes the result files), and the process CPU time of each stage (the machine is shared:
     CPU time is what the work itself cost, wall time also contains waiting for the other jobs);
  4. reports the peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, also read by the parent through
     `RUSAGE_CHILDREN` for the CPU-time cross-check), the RSS right before `run()` ("base": python, torch,
     data, model), the on-disk size of the feature store (`out_dir/features`) and of the result files.

All with ONE torch thread (`torch.set_num_threads(1)`; `--threads` to change) and `OMP_WAIT_POLICY=PASSIVE`,
for steadiness on a shared machine. Each store is deleted after its size is measured.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from bench_scoring import rss_mb  # noqa: E402  (current RSS from /proc, shared with the scoring benchmark)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def du_mb(path: Path) -> tuple[float, int]:
    """(MiB on disk by file sizes, number of files) under path."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return sum(p.stat().st_size for p in files) / 2**20, len(files)


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "lightning_attrib/core"], cwd=ROOT, capture_output=True,
                               text=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
        return head + (f" + uncommitted edits in {', '.join(dirty)}" if dirty else "")
    except OSError:
        return "unknown"


class StageCPU:
    """Process-CPU seconds per stage, by wrapping the instance's methods (a missing method is simply not timed)."""

    def __init__(self):
        self.cpu: dict[str, float] = {}

    def wrap(self, obj, name: str, stage: str) -> None:
        fn = getattr(obj, name, None)
        if not callable(fn):
            return

        def timed(*a, **kw):
            c0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - c0

        setattr(obj, name, timed)


# -- worker (one process per size) ------------------------------------------------------------------------
def worker(a) -> dict:
    from torch import nn
    from torch.utils.data import TensorDataset

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_featurize import make_cnn, make_mlp

    from lightning_attrib.core import TRAK, Attributor
    from lightning_attrib.data import load_fashion_mnist

    n = a.n_train[0]
    k = a.ks[0]
    t0 = time.perf_counter()
    x, y = load_fashion_mnist("train", limit=n)
    xq, yq = load_fashion_mnist("test", limit=a.n_query)
    x, xq = x.flatten(1), xq.flatten(1)  # both models take (B, 784)
    if len(x) < n:
        raise ValueError(f"only {len(x)} training images available, asked for {n}")
    load_s = time.perf_counter() - t0

    torch.manual_seed(a.seed)
    model = make_cnn() if a.model == "cnn" else make_mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(a.seed)
    model.train()
    w0, c0 = time.perf_counter(), time.process_time()
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, a.batch_size):
        idx = perm[i:i + a.batch_size]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    epoch_wall, epoch_cpu = time.perf_counter() - w0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        query_acc = float((model(xq).argmax(1) == yq).float().mean())

    out_dir = Path(a.root)
    att = Attributor(model, TRAK(), TensorDataset(x, y), TensorDataset(xq, yq), out_dir, proj_dim=k,
                     projector="factorized", seed=a.seed, batch_size=a.batch_size)
    stages = StageCPU()
    stages.wrap(att, "_featurize_snapshot", "featurize")
    stages.wrap(att, "_train_statistics", "fit")
    stages.wrap(att.method, "fit", "fit")
    stages.wrap(att, "_self_influence", "score")
    stages.wrap(att, "_score_my_queries", "score")
    base = rss_mb()
    w0, c0 = time.perf_counter(), time.process_time()
    result = att.run()
    total_wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = peak_mb()
    scores = np.load(out_dir / "scores.npy", mmap_mode="r")
    assert scores.shape == (n, a.n_query), scores.shape
    finite = bool(np.isfinite(scores[: min(n, 2048)]).all())
    store_mb, store_files = du_mb(out_dir / "features")
    split_mb = {split: sum(p.stat().st_size for p in (out_dir / "features").rglob("*")
                           if p.is_file() and split in p.relative_to(out_dir).parts) / 2**20
                for split in ("train", "query")}
    exts = sorted({p.name.split(".", 1)[-1] for p in (out_dir / "features").rglob("shard-*") if p.is_file()})
    results_mb = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()) / 2**20
    del result, scores
    return {
        "n_train": n, "k": k, "n_query": a.n_query, "model": a.model,
        "num_params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
        "load_s": load_s, "epoch_wall_s": epoch_wall, "epoch_cpu_s": epoch_cpu, "query_acc": query_acc,
        **{f"{s}_wall_s": att.timings.get(f"{s}_s", float("nan")) for s in ("featurize", "fit", "score")},
        **{f"{s}_cpu_s": stages.cpu.get(s, float("nan")) for s in ("featurize", "fit", "score")},
        "total_wall_s": total_wall, "total_cpu_s": total_cpu, "peak_rss_mb": peak, "base_rss_mb": base,
        "store_mb": store_mb, "store_train_mb": split_mb["train"],
        "store_query_mb": split_mb["query"], "store_files": store_files, "shard_ext": exts, "results_mb": results_mb,
        "scores_finite": finite,
    }


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_worker(a, n: int, k: int, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--root", str(root), "--n-train", str(n), "--ks", str(k),
           "--n-query", str(a.n_query), "--model", a.model, "--batch-size", str(a.batch_size), "--seed", str(a.seed),
           "--threads", str(a.threads)]
    c0, t0 = children_cpu(), time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"worker n_train={n} k={k} failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    out["process_cpu_s"] = children_cpu() - c0  # the whole child (imports, data, training, attribution)
    out["children_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over children so far
    print(f"  [n_train={n} k={k}] " + json.dumps({key: (round(v, 3) if isinstance(v, float) else v)
                                                   for key, v in out.items()}), flush=True)
    return out


def print_tables(rows: list[dict]) -> None:
    print("\n| n_train | k | featurize s | fit s | score s | total s (wall) | total s (CPU) | s / 1k train (wall) "
          "| s / 1k train (CPU) | peak RSS MiB | base RSS MiB | store MiB | 1 epoch s (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_k = 1000.0 / r["n_train"]
        print(f"| {r['n_train']} | {r['k']} | {r['featurize_wall_s']:.2f} ({r['featurize_cpu_s']:.2f}) | "
              f"{r['fit_wall_s']:.2f} ({r['fit_cpu_s']:.2f}) | {r['score_wall_s']:.2f} ({r['score_cpu_s']:.2f}) | "
              f"{r['total_wall_s']:.2f} | {r['total_cpu_s']:.2f} | {r['total_wall_s'] * per_k:.3f} | "
              f"{r['total_cpu_s'] * per_k:.3f} | {r['peak_rss_mb']:.0f} | {r['base_rss_mb']:.0f} | "
              f"{r['store_mb']:.1f} | {r['epoch_wall_s']:.2f} / {r['epoch_cpu_s']:.2f} |")
    print("\n(stage cells: wall s (CPU s))")
    print("\n| n_train | k | featurize / epoch (CPU) | featurize CPU s / 1k | fit CPU s / 1k | score CPU s / 1k "
          "| store MiB (train + query) | train store MiB / 1k | results MiB | query acc after 1 epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_k = 1000.0 / r["n_train"]
        print(f"| {r['n_train']} | {r['k']} | {r['featurize_cpu_s'] / r['epoch_cpu_s']:.2f}x | "
              f"{r['featurize_cpu_s'] * per_k:.3f} | {r['fit_cpu_s'] * per_k:.3f} | {r['score_cpu_s'] * per_k:.3f} | "
              f"{r['store_train_mb']:.1f} + {r['store_query_mb']:.1f} | {r['store_train_mb'] * per_k:.2f} | "
              f"{r['results_mb']:.1f} | {r['query_acc']:.3f} |")
    print(f"\nshard files: {sorted({e for r in rows for e in r['shard_ext']})}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, nargs="+", default=[1000, 5000, 20000, 60000])
    p.add_argument("--ks", type=int, nargs="+", default=[2048])
    p.add_argument("--n-query", type=int, default=1000)
    p.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    p.add_argument("--batch-size", type=int, default=64, help="training and featurization batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the stores go (each deleted after its size is measured)")
    p.add_argument("--json", default=None, help="write all rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a)))
        return

    print(f"torch {torch.__version__}, {a.threads} torch thread(s), model {a.model}, n_query {a.n_query}, "
          f"ks {a.ks}, n_train {a.n_train}, batch {a.batch_size}; code: {git_state()}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="bench_scaling_", dir=a.workdir))
    rows = []
    try:
        for k in a.ks:
            for n in a.n_train:
                root = base / f"k{k}_n{n}"
                rows.append(run_worker(a, n, k, root))
                shutil.rmtree(root, ignore_errors=True)
                if a.json:  # keep what is done so far
                    Path(a.json).write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_tables(rows)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

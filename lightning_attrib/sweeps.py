"""LDS / datamodels ground truth from subset retraining, run as Hydra jobs (one job = one subset).

`train_subset(cfg)` is the `subset` app: it draws subset `lds.index` (seeded, reproducible on any launcher), trains
the experiment's model on it, and writes the query outputs to `lds.dir/truth/subset-XXXXX.npz`. A finished subset
is skipped, so a sweep can be resumed or split across launchers (basic, joblib, submitit). `evaluate(...)` turns the
truth store and an attribution result into LDS (and datamodels).
"""
from __future__ import annotations

import io
import os
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .core.batches import move_to
from .core.io import atomic_save_npy, atomic_write_bytes, atomic_write_json, derive_seed
from .core.outputs import resolve_output
from .evaluation.subsets import random_subset_masks

DATAMODEL_CV_FOLDS = 5
DATAMODEL_MIN_HELDOUT = 5  # fewer held-out subsets make their Spearman correlation meaningless
# Warnings every subset retraining raises, about nothing the user can change (no validation loop on purpose;
# a deprecation inside Lightning's own pytree use).
REPEATED_LIBRARY_WARNINGS = (r".*`validation_step` but have no `val_dataloader`.*",
                             r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def truth_path(lds_dir: str | os.PathLike, index: int) -> Path:
    return Path(lds_dir) / "truth" / f"subset-{index:05d}.npz"


@torch.no_grad()
def query_outputs(module: torch.nn.Module, dataset, collate_fn=None, output="margin", batch_size: int = 256) -> np.ndarray:
    """The attributed output function (margin by default) on every query example, in dataset order."""
    fn = resolve_output(output)
    module.eval()
    outs = [fn(module, move_to(b, next(module.parameters()).device)).double().cpu()
            for b in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)]
    return torch.cat(outs).numpy()


def retraining_fingerprint(cfg) -> str:
    """SHA-1 of what a subset retraining's outputs depend on (data, model, trainer, seed, lds alpha/seed/output),
    so a sweep never mixes subsets trained under other settings. Output paths are left out."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    trainer = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k != "default_root_dir"}
    what = {"data": OmegaConf.to_container(cfg.data, resolve=True), "model": OmegaConf.to_container(cfg.model,
            resolve=True), "trainer": trainer, "seed": int(cfg.seed),
            "lds": {k: OmegaConf.to_container(cfg.lds, resolve=True)[k] for k in ("alpha", "seed", "output")}}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def train_subset(cfg) -> dict:
    """Train on subset `cfg.lds.index` and store its mask and query outputs (skips a finished subset)."""
    import lightning as L
    from hydra.utils import instantiate

    index, lds = int(cfg.lds.index), cfg.lds
    out = truth_path(lds.dir, index)
    fingerprint = retraining_fingerprint(cfg)
    if out.exists():
        with np.load(out) as z:
            stored = str(z["fingerprint"]) if "fingerprint" in z.files else ""
        if stored != fingerprint:
            raise ValueError(f"{out} was trained with other data/model/trainer/subset settings than this sweep's: "
                             f"use another lds.dir, or delete {Path(lds.dir) / 'truth'} to retrain")
        return {"skipped": str(out)}
    L.seed_everything(derive_seed(cfg.seed, "lds-subset-training", index) % 2**32, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    base = datamodule.train_dataloader()
    n_train = len(base.dataset)
    mask = random_subset_masks(n_train, 1, float(lds.alpha), int(lds.seed), start=index)[0]
    train = DataLoader(Subset(base.dataset, np.flatnonzero(mask).tolist()), batch_size=base.batch_size, shuffle=True,
                       collate_fn=base.collate_fn,
                       generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "lds-subset-order", index)))
    val = datamodule.val_dataloader()
    model = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():  # the same library warnings in every one of M retrainings: not worth M lines
        for pattern in REPEATED_LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        trainer.fit(model, train)
    outputs = query_outputs(model, val.dataset, val.collate_fn, lds.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, mask=mask, outputs=outputs, index=index, seed=int(lds.seed), alpha=float(lds.alpha),
             fingerprint=fingerprint)
    atomic_write_bytes(out, buf.getvalue())
    return {"written": str(out)}



def run_subset_sweep(cmd: list[str], lds_dir: str | os.PathLike, num_subsets: int, poll_s: float = 0.5) -> Path:
    """Run the subset multirun `cmd` as a child process with its output in `lds_dir/sweep.log`, showing ONE
    progress bar over the subsets (finished truth files, so any launcher counts); raise with the log's tail if
    the sweep fails. Returns the log path."""
    from tqdm.auto import tqdm

    lds_dir = Path(lds_dir)
    lds_dir.mkdir(parents=True, exist_ok=True)
    log_path = lds_dir / "sweep.log"

    def finished() -> int:
        return sum(truth_path(lds_dir, i).exists() for i in range(num_subsets))

    with open(log_path, "ab") as log, tqdm(total=num_subsets, desc="LDS subsets", unit="subset",
                                          initial=finished(), dynamic_ncols=True) as bar:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(poll_s)
            bar.update(finished() - bar.n)
        bar.update(finished() - bar.n)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"the subset sweep failed (exit code {proc.returncode}); last lines of {log_path}:\n{tail}")
    return log_path


def load_truth(lds_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, masks (M, n_train), outputs (M, n_query)) of every finished subset, by subset index."""
    files = sorted((Path(lds_dir) / "truth").glob("subset-*.npz"))
    if not files:
        raise FileNotFoundError(f"no finished subsets in {Path(lds_dir) / 'truth'}: run the subset sweep first")
    idx, masks, outs, prints = [], [], [], set()
    for f in files:
        with np.load(f) as z:
            idx.append(int(z["index"]))
            masks.append(z["mask"])
            outs.append(z["outputs"])
            prints.add(str(z["fingerprint"]) if "fingerprint" in z.files else "")
    if len(prints) > 1 or len({m.shape for m in masks}) > 1 or len({o.shape for o in outs}) > 1:
        raise ValueError(f"the subsets in {Path(lds_dir) / 'truth'} were trained under different settings (data, "
                         "model, trainer or subset draws): an LDS needs one setting; use one lds.dir per experiment")
    return np.array(idx), np.stack(masks), np.stack(outs)


def evaluate(lds_dir: str | os.PathLike, result_dir: str | os.PathLike | None, datamodels: bool = True,
             heldout_fraction: float = 0.2, seed: int = 0) -> dict:
    """LDS of the attribution scores (if given) and of datamodels fitted on the other subsets; writes lds.json."""
    from .core.results import load_results
    from .metrics import LinearDatamodelingScore

    indices, masks, outputs = load_truth(lds_dir)
    report: dict = {"num_subsets": int(len(indices)), "n_train": int(masks.shape[1]), "n_query": int(outputs.shape[1])}
    if result_dir is not None:
        res = load_results(result_dir)
        if res.scores.shape != (masks.shape[1], outputs.shape[1]):
            raise ValueError(f"scores {res.scores.shape} do not match the subsets' (n_train, n_query) = "
                             f"{(masks.shape[1], outputs.shape[1])}: attribute the same train and query sets")
        metric = LinearDatamodelingScore()
        metric.update(torch.as_tensor(np.array(res.scores)), torch.as_tensor(masks), torch.as_tensor(outputs))
        values = metric.compute()
        report["method"] = res.manifest.get("method")
        report["lds"] = float(values["lds"])
        report["lds_ci"] = [float(values["ci_low"]), float(values["ci_high"])]
        report["lds_per_query"] = [float(v) for v in values["per_query"]]
        report["scores"] = str(result_dir)
    if datamodels:
        report.update(_heldout_datamodels(lds_dir, masks, outputs, heldout_fraction, seed))
    atomic_write_json(Path(lds_dir) / "lds.json", report)
    return report


def min_subsets_for_datamodels(heldout_fraction: float) -> int:
    """The fewest subsets for which `evaluate` fits datamodels: 2 x cv folds left after the held-out ones."""
    m = 2 * DATAMODEL_CV_FOLDS
    while m - _num_heldout(m, heldout_fraction) < 2 * DATAMODEL_CV_FOLDS:
        m += 1
    return m


def _num_heldout(num_subsets: int, heldout_fraction: float) -> int:
    return max(DATAMODEL_MIN_HELDOUT, int(round(heldout_fraction * num_subsets)))


def _heldout_datamodels(lds_dir, masks: np.ndarray, outputs: np.ndarray, heldout_fraction: float, seed: int) -> dict:
    """Datamodels fitted on most subsets, their LDS on the held-out rest; with too few subsets (or a failed fit)
    a warning and a `datamodels_skipped` reason instead: the LDS of the scores is reported either way."""
    from .evaluation.datamodels import fit_datamodels

    m, need = len(masks), min_subsets_for_datamodels(heldout_fraction)
    if m < need:
        reason = (f"{m} subsets are too few to fit datamodels ({2 * DATAMODEL_CV_FOLDS} for {DATAMODEL_CV_FOLDS}-fold "
                  f"cross-validation plus {_num_heldout(need, heldout_fraction)} held out: >= {need}): run more "
                  "subsets (lds.num_subsets) for them")
        warnings.warn(f"datamodels skipped: {reason}", stacklevel=3)
        return {"datamodels_skipped": reason}
    order = np.random.default_rng(derive_seed(seed, "datamodels-heldout")).permutation(m)
    n_held = _num_heldout(m, heldout_fraction)
    held, fit = order[:n_held], order[n_held:]
    try:
        dm = fit_datamodels(masks[fit], outputs[fit], cv=DATAMODEL_CV_FOLDS)
        with warnings.catch_warnings():  # all-zero datamodels (L1 with few subsets): counted in the report instead
            warnings.simplefilter("ignore", UserWarning)
            values = dm.lds(masks[held], outputs[held])
    except (ValueError, np.linalg.LinAlgError) as err:
        warnings.warn(f"datamodels skipped: fitting them failed ({err})", stacklevel=3)
        return {"datamodels_skipped": f"fit failed: {err}"}
    undefined = int(np.isnan(values["per_query"].numpy()).sum())
    if undefined:
        warnings.warn(f"datamodels: {undefined} of {outputs.shape[1]} queries got constant held-out predictions "
                      f"(an all-zero L1 fit from {len(fit)} subsets) and are left out of their held-out LDS; more "
                      "subsets give denser datamodels", stacklevel=3)
    atomic_save_npy(Path(lds_dir) / "datamodels_weights.npy", dm.weights.astype(np.float32))
    return {"datamodels_lds_heldout": float(values["lds"]), "datamodels_fit_subsets": int(len(fit)),
            "datamodels_undefined_queries": undefined}


def scatter_rows(result_dir, lds_dir, queries=(0, 1, 2)) -> list[list[float]]:
    """(query, predicted, actual) rows for a W&B scatter plot of a few queries."""
    from .core.results import load_results

    _, masks, outputs = load_truth(lds_dir)
    scores = np.asarray(load_results(result_dir).scores)
    rows = []
    for q in queries:
        if q < outputs.shape[1]:
            pred = masks.astype(np.float64) @ scores[:, q]
            rows += [[int(q), float(p), float(a)] for p, a in zip(pred, outputs[:, q])]
    return rows

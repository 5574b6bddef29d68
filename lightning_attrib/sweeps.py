"""LDS / datamodels ground truth from subset retraining, run as Hydra jobs (one job = one subset).

`train_subset(cfg)` is the `subset` app: it draws subset `lds.index` (seeded, reproducible on any launcher), trains
the experiment's model on it, and writes the query outputs to `lds.dir/truth/subset-XXXXX.npz`. A finished subset
is skipped, so a sweep can be resumed or split across launchers (basic, joblib, submitit). `evaluate(...)` turns the
truth store and an attribution result into LDS (and datamodels).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .core.batches import move_to
from .core.outputs import resolve_output
from .core.results import save_json
from .evaluation.subsets import random_subset_masks


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


def train_subset(cfg) -> dict:
    """Train on subset `cfg.lds.index` and store its mask and query outputs (skips a finished subset)."""
    import lightning as L
    from hydra.utils import instantiate

    index, lds = int(cfg.lds.index), cfg.lds
    out = truth_path(lds.dir, index)
    if out.exists():
        return {"skipped": str(out)}
    L.seed_everything(int(cfg.seed) + 1 + index, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    base = datamodule.train_dataloader()
    n_train = len(base.dataset)
    mask = random_subset_masks(n_train, 1, float(lds.alpha), int(lds.seed), start=index)[0]
    train = DataLoader(Subset(base.dataset, np.flatnonzero(mask).tolist()), batch_size=base.batch_size, shuffle=True,
                       collate_fn=base.collate_fn, generator=torch.Generator().manual_seed(int(cfg.seed) + index))
    val = datamodule.val_dataloader()
    model = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train)
    outputs = query_outputs(model, val.dataset, val.collate_fn, lds.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, mask=mask, outputs=outputs, index=index, seed=int(lds.seed), alpha=float(lds.alpha))
    os.replace(tmp, out)
    return {"written": str(out)}


def load_truth(lds_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, masks (M, n_train), outputs (M, n_query)) of every finished subset, by subset index."""
    files = sorted((Path(lds_dir) / "truth").glob("subset-*.npz"))
    if not files:
        raise FileNotFoundError(f"no finished subsets in {Path(lds_dir) / 'truth'}: run the subset sweep first")
    idx, masks, outs = [], [], []
    for f in files:
        with np.load(f) as z:
            idx.append(int(z["index"]))
            masks.append(z["mask"])
            outs.append(z["outputs"])
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
    if datamodels and len(indices) >= 10:
        from .evaluation.datamodels import fit_datamodels

        order = np.random.default_rng(seed).permutation(len(indices))
        n_held = max(2, int(round(heldout_fraction * len(indices))))
        held, fit = order[:n_held], order[n_held:]
        dm = fit_datamodels(masks[fit], outputs[fit])
        values = dm.lds(masks[held], outputs[held])
        report["datamodels_lds_heldout"] = float(values["lds"])
        report["datamodels_fit_subsets"] = int(len(fit))
        np.save(Path(lds_dir) / "datamodels_weights.npy", dm.weights.astype(np.float32))
    save_json(Path(lds_dir) / "lds.json", report)
    return report


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

"""W&B tables for the analyses: leakage pairs side by side, and a ModelDiff report per component."""
from __future__ import annotations


import numpy as np

from .images import example_display


def _img(wandb, dataset, index, to_image=None):
    """The example as a W&B image when it is image-shaped, else as text; "" without a dataset."""
    if dataset is None:
        return ""
    cell = example_display(dataset, int(index), to_image)
    return wandb.Image(cell) if isinstance(cell, np.ndarray) else str(cell)


def leakage_table(report, train_ds, query_ds, k: int = 50, to_image=None):
    """Suspected train-test duplicate pairs, both images side by side, ranked by leakage score."""
    import wandb

    table = wandb.Table(columns=["rank", "query_id", "query_image", "train_id", "train_image", "attribution_score",
                                 "input_distance", "feature_cosine", "leakage_score", "flagged"])
    for r, p in enumerate(report.pairs[:k]):
        table.add_data(r + 1, p.query_id, _img(wandb, query_ds, p.query_index, to_image), p.train_id,
                       _img(wandb, train_ds, p.train_index, to_image), p.score, p.input_distance, p.feature_cosine,
                       p.leakage_score, p.flagged)
    return table


def log_modeldiff(run, md, train_ds=None, query_ds=None, k: int = 16, to_image=None) -> None:
    """One table of top training examples and one of most-affected queries per component and direction."""
    import wandb

    train_pos = {int(t): i for i, t in enumerate(md.train_ids)}
    query_pos = {int(q): i for i, q in enumerate(md.query_ids)}
    payload = {}
    for side in (md.a_minus_b, md.b_minus_a):
        for c in range(side.n_components):
            t_ids, loads = side.top_train(c, k)
            train_table = wandb.Table(columns=["rank", "train_id", "image", "loading"])
            for r, (t, v) in enumerate(zip(t_ids, loads)):
                train_table.add_data(r + 1, int(t), _img(wandb, train_ds, train_pos[int(t)], to_image), float(v))
            q_ids, proj = side.top_queries(c, k)
            query_table = wandb.Table(columns=["rank", "query_id", "image", "projection"])
            for r, (q, v) in enumerate(zip(q_ids, proj)):
                query_table.add_data(r + 1, int(q), _img(wandb, query_ds, query_pos[int(q)], to_image), float(v))
            key = f"modeldiff/{side.name}/component_{c}"
            payload[f"{key}/top_train"] = train_table
            payload[f"{key}/top_queries"] = query_table
            payload[f"{key}/explained_variance_ratio"] = float(side.explained_variance_ratio[c])
    run.log(payload)
    run.summary["modeldiff/settings"] = md.settings

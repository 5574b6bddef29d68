"""Reporters: what an attribution run logs, to W&B (rich) or to any other Lightning logger (scalars)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.results import AttributionResult


class LoggerReporter:
    """Scalars through every logger the Trainer has (CSV, TensorBoard, MLflow, ...)."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log_scalars(self, metrics: dict[str, float], step: int | None) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    def report(self, result: AttributionResult, metrics: dict[str, float], step: int | None = None, **_: Any) -> None:
        self.log_scalars(metrics, step)


class WandbReporter(LoggerReporter):
    """Scalars, a suspects table, a per-query gallery of proponents/opponents, a histogram and an artifact."""

    def __init__(self, wandb_logger, loggers: list):
        super().__init__(loggers)
        self.wandb_logger = wandb_logger

    def report(self, result: AttributionResult, metrics: dict[str, float], step: int | None = None, *, train_ds=None,
               query_ds=None, train_pred=None, query_pred=None, truth=None, to_image=None, to_display=None,
               log_images=True, num_suspects=50, num_gallery_queries=8, gallery_k=5, leakage=None,
               **_: Any) -> None:
        import wandb

        run = self.wandb_logger.experiment
        self.log_scalars(metrics, step)
        payload: dict[str, Any] = {"attrib/self_influence_hist": wandb.Histogram(np.asarray(result.self_influence))}
        run.summary["attrib/method"] = result.manifest.get("method")
        run.summary["attrib/output"] = result.manifest.get("output")
        run.summary["attrib/damping"] = result.manifest.get("damping")
        run.summary["attrib/out_dir"] = str(result.out_dir)
        if train_ds is not None:
            payload["attrib/suspects"] = self._suspects_table(result, train_ds, train_pred, truth, to_image,
                                                              log_images, num_suspects, to_display)
        if train_ds is not None and query_ds is not None:
            payload["attrib/query_gallery"] = self._gallery_table(result, train_ds, query_ds, query_pred, to_image,
                                                                  log_images, num_gallery_queries, gallery_k, to_display)
        if leakage is not None:
            from .analyses import leakage_table

            payload["attrib/leakage_pairs"] = leakage_table(leakage, train_ds, query_ds, to_image=to_image)
        run.log(payload)
        artifact = wandb.Artifact(f"attribution-{run.id}", type="attribution",
                                  metadata={k: v for k, v in result.manifest.items() if k != "timings"})
        for name in result.files:  # the full matrix, or the top-k files of a top-k result
            artifact.add_file(str(result.out_dir / name))
        run.log_artifact(artifact)

    def _suspects_table(self, result, train_ds, pred, truth, to_image, log_images, k, to_display=None):
        import wandb

        show = _Cells(wandb, to_image, to_display, log_images)
        order = np.argsort(-result.self_influence, kind="stable")[:k]
        ids, values = result.suspects(k)
        show.decide(train_ds, order[:1])
        cols = ["rank", "train_id", show.column, "given_label", "predicted_label", "self_influence"]
        cols += ["flipped"] if truth is not None else []
        table = wandb.Table(columns=cols)
        for rank, (pos, value) in enumerate(zip(order, values)):
            row = [rank + 1, int(ids[rank]), show(train_ds, pos), _label(pred, "label", pos),
                   _label(pred, "predicted", pos), float(value)]
            table.add_data(*(row + ([bool(truth[pos])] if truth is not None else [])))
        return table

    def _gallery_table(self, result, train_ds, query_ds, query_pred, to_image, log_images, n_queries, k,
                       to_display=None):
        import wandb

        show = _Cells(wandb, to_image, to_display, log_images)
        k = min(k, result.top_k or k, len(result.train_ids))  # a top-k result answers for up to its k
        show.decide(query_ds, [0])
        cols = ["query_id", f"query_{show.column}", "label", "predicted"]
        cols += [f"proponent_{i + 1}" for i in range(k)] + ["proponent_ids", "proponent_scores"]
        cols += [f"opponent_{i + 1}" for i in range(k)] + ["opponent_ids", "opponent_scores"]
        table = wandb.Table(columns=cols)
        pos_of = {int(t): i for i, t in enumerate(result.train_ids)}
        for q in range(min(n_queries, result.n_query)):
            row = [int(result.query_ids[q]), show(query_ds, q), _label(query_pred, "label", q),
                   _label(query_pred, "predicted", q)]
            for ids, scores in (result.top_proponents(q, k), result.top_opponents(q, k)):
                cells = [show(train_ds, pos_of[int(t)]) for t in ids]
                row += cells + [show.blank] * (k - len(cells))
                row += [str([int(t) for t in ids]), str([round(float(s), 6) for s in scores])]
            table.add_data(*row)
        return table


def _label(pred, field: str, pos: int) -> str:
    """A table cell for a given label / prediction: text, never None ("n/a" without a built-in task)."""
    return "n/a (custom output_fn)" if pred is None else str(getattr(pred, field)[int(pos)])


class _Cells:
    """Example cells of one table: W&B images when the examples are image-shaped (and images are on), else text."""

    def __init__(self, wandb, to_image, to_display, log_images: bool):
        self.wandb, self.to_image, self.to_display, self.log_images = wandb, to_image, to_display, log_images
        self.images, self.column, self.blank = False, "input", ""

    def decide(self, dataset, positions) -> None:
        from .images import example_display

        first = example_display(dataset, int(positions[0]), self.to_image, self.to_display) if len(positions) else ""
        self.images = self.log_images and isinstance(first, np.ndarray)
        self.column = "image" if self.images else "input"
        self.blank = None if self.images else ""

    def __call__(self, dataset, pos):
        from .images import default_to_display, example_display, example_input

        cell = example_display(dataset, int(pos), self.to_image, self.to_display)
        if self.images:
            return self.wandb.Image(cell) if isinstance(cell, np.ndarray) else None
        return default_to_display(example_input(dataset[int(pos)])) if isinstance(cell, np.ndarray) else str(cell)


def make_reporter(trainer) -> LoggerReporter:
    """W&B reporter when a WandbLogger is attached, else scalars to whatever loggers there are."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = list(trainer.loggers)
    wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    return WandbReporter(wandb_logger, loggers) if wandb_logger is not None else LoggerReporter(loggers)

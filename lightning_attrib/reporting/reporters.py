"""Reporters: what an attribution run logs, to W&B (rich) or to any other Lightning logger (scalars)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.results import AttributionResult
from .images import example_image


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
               query_ds=None, train_pred=None, query_pred=None, truth=None, to_image=None, log_images=True,
               num_suspects=50, num_gallery_queries=8, gallery_k=5, leakage=None, **_: Any) -> None:
        import wandb

        run = self.wandb_logger.experiment
        self.log_scalars(metrics, step)
        payload: dict[str, Any] = {"attrib/self_influence_hist": wandb.Histogram(np.asarray(result.self_influence))}
        run.summary["attrib/method"] = result.manifest.get("method")
        run.summary["attrib/damping"] = result.manifest.get("damping")
        run.summary["attrib/out_dir"] = str(result.out_dir)
        if train_ds is not None:
            payload["attrib/suspects"] = self._suspects_table(result, train_ds, train_pred, truth, to_image,
                                                              log_images, num_suspects)
        if train_ds is not None and query_ds is not None:
            payload["attrib/query_gallery"] = self._gallery_table(result, train_ds, query_ds, query_pred, to_image,
                                                                  log_images, num_gallery_queries, gallery_k)
        if leakage is not None:
            from .analyses import leakage_table

            payload["attrib/leakage_pairs"] = leakage_table(leakage, train_ds, query_ds, to_image=to_image)
        run.log(payload)
        artifact = wandb.Artifact(f"attribution-{run.id}", type="attribution",
                                  metadata={k: v for k, v in result.manifest.items() if k != "timings"})
        for name in result.files:  # the full matrix, or the top-k files of a top-k result
            artifact.add_file(str(result.out_dir / name))
        run.log_artifact(artifact)

    @staticmethod
    def _image(wandb, dataset, index, to_image, log_images):
        if not log_images:
            return None
        img = example_image(dataset, index, to_image)
        return wandb.Image(img) if img is not None else None

    def _suspects_table(self, result, train_ds, pred, truth, to_image, log_images, k):
        import wandb

        cols = ["rank", "train_id", "image", "given_label", "predicted_label", "self_influence", "flipped"]
        table = wandb.Table(columns=cols)
        ids, values = result.suspects(k)
        for rank, (pos, value) in enumerate(zip(np.argsort(-result.self_influence, kind="stable")[:k], values)):
            table.add_data(rank + 1, int(ids[rank]), self._image(wandb, train_ds, pos, to_image, log_images),
                           int(pred.label[pos]) if pred is not None else None,
                           int(pred.predicted[pos]) if pred is not None else None,
                           float(value), bool(truth[pos]) if truth is not None else None)
        return table

    def _gallery_table(self, result, train_ds, query_ds, query_pred, to_image, log_images, n_queries, k):
        import wandb

        k = min(k, result.top_k or k)  # a top-k result answers for up to its k
        cols = ["query_id", "query_image", "label", "predicted"]
        cols += [f"proponent_{i + 1}" for i in range(k)] + ["proponent_scores"]
        cols += [f"opponent_{i + 1}" for i in range(k)] + ["opponent_scores"]
        table = wandb.Table(columns=cols)
        pos_of = {int(t): i for i, t in enumerate(result.train_ids)}
        for q in range(min(n_queries, result.n_query)):
            row = [int(result.query_ids[q]), self._image(wandb, query_ds, q, to_image, log_images),
                   int(query_pred.label[q]) if query_pred is not None else None,
                   int(query_pred.predicted[q]) if query_pred is not None else None]
            for ids, scores in (result.top_proponents(q, k), result.top_opponents(q, k)):
                imgs = [self._image(wandb, train_ds, pos_of[int(t)], to_image, log_images) for t in ids]
                row += imgs + [None] * (k - len(imgs)) + [[round(float(s), 6) for s in scores]]
            table.add_data(*row)
        return table


def make_reporter(trainer) -> LoggerReporter:
    """W&B reporter when a WandbLogger is attached, else scalars to whatever loggers there are."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = list(trainer.loggers)
    wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    return WandbReporter(wandb_logger, loggers) if wandb_logger is not None else LoggerReporter(loggers)

"""Evaluation metrics for attribution scores as torchmetrics `Metric`s (DDP sync by state declaration).

- `MislabelDetection`: AUROC / AP / recall@x% / precision@x% of a suspicion score against flipped labels.
- `LinearDatamodelingScore` (+ functional `linear_datamodeling_score`): Spearman between summed scores
  and retrained outputs over random subsets, mean over queries, bootstrap CI.
- `Brittleness`: agreement of predicted vs verified support-set sizes
  (see `lightning_attrib.evaluation.brittleness` for the search that produces them).
"""
from ._stats import average_ranks, bootstrap_mean_ci, pearson_columns, spearman_columns
from .brittleness import Brittleness
from .lds import LinearDatamodelingScore, linear_datamodeling_score
from .mislabel import MislabelDetection, mislabel_detection

__all__ = [
    "Brittleness", "LinearDatamodelingScore", "MislabelDetection", "average_ranks", "bootstrap_mean_ci",
    "linear_datamodeling_score", "mislabel_detection", "pearson_columns", "spearman_columns",
]

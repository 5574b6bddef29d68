"""Ground-truth evaluation of attribution scores by retraining (plain torch/numpy, no Trainer needed).

- `subsets`: seeded random training subsets (`SubsetMasks`), saved with their seed; `retrain_outputs`.
- `datamodels`: per-query L1 linear datamodels fitted on (mask, output) pairs (`fit_datamodels`).
- `brittleness`: predicted-then-verified smallest set of top proponents whose removal flips a prediction.
- `counterfactual`: predicted vs actual output change when a chosen training subset is removed.
Scores everywhere are (n_train, n_query), positive = the training example helps (raises) the query's output.
"""
from .brittleness import (NOT_FOUND, SupportSize, power_of_two_grid, predict_support_size, predicted_margins,
                          proponent_order, support_size, support_sizes)
from .counterfactual import CounterfactualResult, counterfactual_correlation, predicted_removal_effect
from .datamodels import Datamodels, fit_datamodels
from .subsets import SubsetMasks, random_subset_masks, retrain_outputs

__all__ = [
    "CounterfactualResult", "Datamodels", "NOT_FOUND", "SubsetMasks", "SupportSize", "counterfactual_correlation",
    "fit_datamodels", "power_of_two_grid", "predict_support_size", "predicted_margins", "predicted_removal_effect",
    "proponent_order", "random_subset_masks", "retrain_outputs", "support_size", "support_sizes",
]

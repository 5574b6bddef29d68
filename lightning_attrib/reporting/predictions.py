"""Per-example given labels, predictions and losses at the final weights, through the attributed task: the loss
baseline of the mislabel metrics and the report tables use them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core.batches import move_to
from ..core.tasks import MultiClass, TaskOutput, model_prediction


@dataclass
class Predictions:
    label: list        # given label, displayable (class index, 0/1 vector, target value, token count)
    predicted: list    # the model's prediction, displayable (argmax class, value, tokens right)
    loss: np.ndarray   # per-example training loss of the task (cross-entropy, squared error, token sum)


@torch.no_grad()
def predict(module: torch.nn.Module, dataset, collate_fn, device, batch_size: int = 256,
            output: TaskOutput | None = None) -> Predictions:
    """Run the module over `dataset` in order; `output` (default: multi-class) says how to read and score it."""
    output = output or TaskOutput("loss", MultiClass())
    was_training = module.training
    module.eval()
    labels, preds, losses = [], [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
            batch = move_to(batch, device)
            pred, target = model_prediction(module, batch)
            task = output.resolve(module, batch)
            given, shown = task.display(pred.float(), target)
            labels += given
            preds += shown
            losses.append(task.loss(pred.float(), target).float().cpu())
    finally:
        module.train(was_training)
    return Predictions(labels, preds, torch.cat(losses).numpy())

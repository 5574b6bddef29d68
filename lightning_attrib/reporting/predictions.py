"""Per-example predictions, labels and losses at the final weights: the loss baseline and the tables use them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..core.batches import move_to, unpack_batch


@dataclass
class Predictions:
    label: np.ndarray      # given label
    predicted: np.ndarray  # argmax class
    loss: np.ndarray       # per-example cross-entropy


@torch.no_grad()
def predict(module: torch.nn.Module, dataset, collate_fn, device, batch_size: int = 256) -> Predictions:
    was_training = module.training
    module.eval()
    labels, preds, losses = [], [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
            x, y = unpack_batch(move_to(batch, device))
            logits = module(x)
            labels.append(y.cpu())
            preds.append(logits.argmax(-1).cpu())
            losses.append(F.cross_entropy(logits.float(), y.long(), reduction="none").cpu())
    finally:
        module.train(was_training)
    return Predictions(torch.cat(labels).numpy(), torch.cat(preds).numpy(), torch.cat(losses).numpy())

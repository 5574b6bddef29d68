"""W&B tables for data that is not images: text/value cells, given label and prediction from the task, proponent ids,
no empty (None) cells; the attribution settings in the W&B config."""
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, i):
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch, i):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_wandb_tables_and_config_for_tabular_regression(tmp_path, wandb_dirs):
    from lightning.pytorch.loggers import WandbLogger

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    y = x[:, 0] - x[:, 1] + 0.1 * torch.randn(60, generator=g)
    corrupted = np.zeros(50, dtype=bool)
    corrupted[:5] = True
    y[:5] += 3.0
    train, val = TensorDataset(x[:50], y[:50]), TensorDataset(x[50:], y[50:])
    logger = WandbLogger(project="attrib-test", save_dir=str(tmp_path), offline=True)
    cb = AttributionCallback(proj_dim=16, out_dir=tmp_path / "attrib", mislabeled=corrupted, num_suspects=8,
                             num_gallery_queries=3, gallery_k=2)
    L.seed_everything(0)
    L.Trainer(accelerator="cpu", max_epochs=3, logger=logger, callbacks=[cb], enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(
        Regressor(), DataLoader(train, batch_size=10), DataLoader(val, batch_size=10))
    config = dict(logger.experiment.config)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    assert config["attribution"]["method"] == "trak" and config["attribution"]["proj_dim"] == 16
    assert config["attribution"]["output"] == "regression-margin"
    tables = run_dir / "files" / "media" / "table" / "attrib"
    suspects = json.loads(next(tables.glob("suspects_*.json")).read_text())
    assert suspects["columns"] == ["rank", "train_id", "input", "given_label", "predicted_label", "self_influence",
                                   "flipped"]
    assert all(cell is not None for row in suspects["data"] for cell in row)
    order = np.argsort(-cb.result.self_influence, kind="stable")[:8]
    for row, pos in zip(suspects["data"], order):
        assert row[1] == int(pos)
        assert float(row[3]) == round(float(y[pos]), 4)  # the given target value
        assert row[2].startswith("[") and float(row[2][1:].split(",")[0]) == round(float(x[pos, 0]), 3)
    gallery = json.loads(next(tables.glob("query_gallery_*.json")).read_text())
    assert all(cell is not None for row in gallery["data"] for cell in row)
    col = gallery["columns"].index("proponent_ids")
    for q, row in enumerate(gallery["data"]):
        assert json.loads(row[col]) == [int(t) for t in cb.result.top_proponents(q, 2)[0]]

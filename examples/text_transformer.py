"""A text classifier as users write them, attributed with zero configuration.

nn.Embedding + stock nn.TransformerEncoder (with a padding mask) + LayerNorm; dict batches
{"input_ids", "attention_mask", "labels"}; forward(input_ids, attention_mask) -> logits. 10% of the training labels
are flipped; the script prints how well self-influence finds them (AUROC) next to the loss baseline.

    python examples/text_transformer.py        # about 1 min on 2 CPU cores

The data: sentences of random filler words with 2-4 words of one sentiment and 0-1 of the other; the label says
which kind is in the majority.
"""
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_attrib import AttributionCallback, CheckpointCapture
from lightning_attrib.data import flip_labels

VOCAB, PAD, POS_WORDS, NEG_WORDS = 60, 0, range(1, 6), range(6, 11)


def make_sentences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels): lengths 8..20, padded with PAD; label 1 if positive words dominate."""
    g = torch.Generator().manual_seed(seed)
    ids, mask, labels = torch.full((n, 20), PAD), torch.zeros(n, 20), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(8, 21, (1,), generator=g))
        words = torch.randint(11, VOCAB, (length,), generator=g)
        major, minor = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g))
        n_pos, n_neg = (major, minor) if torch.rand(1, generator=g) < 0.5 else (minor, major)
        slots = torch.randperm(length, generator=g)[:n_pos + n_neg]
        words[slots[:n_pos]] = torch.randint(1, 6, (n_pos,), generator=g)
        words[slots[n_pos:]] = torch.randint(6, 11, (len(slots) - n_pos,), generator=g)
        ids[i, :length], mask[i, :length], labels[i] = words, 1.0, int(n_pos > n_neg)
    return ids, mask, labels


class Sentences(Dataset):
    def __init__(self, ids, mask, labels):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TextClassifier(L.LightningModule):
    def __init__(self, d_model: int = 32, lr: float = 1e-3):
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(VOCAB, d_model, padding_idx=PAD)
        self.pos = nn.Parameter(0.02 * torch.randn(20, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1)   # stock: nested tensors / fast path left on
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        h = self.norm((h * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val/acc", (logits.argmax(-1) == batch["labels"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(out_dir: str = "example_out/text", epochs: int = 25) -> dict:
    L.seed_everything(0)
    ids, mask, labels = make_sentences(500, seed=0)
    noisy, flipped = flip_labels(labels.numpy(), 0.1, 2, seed=0)
    train = Sentences(ids, mask, torch.as_tensor(noisy))
    val = Sentences(*make_sentences(100, seed=1))
    attrib = AttributionCallback(proj_dim=1024, out_dir=out_dir, mislabeled=flipped)  # zero configuration
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CheckpointCapture(dirpath=f"{out_dir}/snapshots", every_n_epochs=epochs // 5), attrib])
    t0 = time.perf_counter()
    trainer.fit(TextClassifier(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=100))
    return report("text transformer (dict batches, padding mask)", attrib, time.perf_counter() - t0)


def report(setup: str, attrib: AttributionCallback, total_s: float) -> dict:
    """Print self-influence AUROC next to the loss baseline, and training vs attribution time."""
    m, timings = attrib.metrics, attrib.result.manifest["timings"]
    attribution_s = sum(timings.values()) + (attrib.preflight_report.seconds if attrib.preflight_report else 0.0)
    row = {"setup": setup, "output": attrib.result.manifest["output"],
           "self_influence_auroc": m.get("attrib/mislabel/self_influence/auroc"),
           "loss_baseline_auroc": m.get("attrib/mislabel/loss_baseline/auroc"),
           "train_s": total_s - attribution_s, "attribution_s": attribution_s}
    print(f"[{setup}] output {row['output']!r}: self-influence AUROC {row['self_influence_auroc']:.3f} vs loss "
          f"baseline {row['loss_baseline_auroc']:.3f}; training {row['train_s']:.1f} s, attribution "
          f"{row['attribution_s']:.1f} s")
    return row


if __name__ == "__main__":
    main()

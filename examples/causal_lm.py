"""A small causal language model, attributed with zero configuration; then a generated continuation is attributed
to the training documents.

Dict batches {"input_ids", "labels"} with labels == input_ids (HuggingFace convention: the model shifts) select the
causal-LM task: the attributed output is the per-sequence sum of token margins, -100 ignored. The documents come from
four "topics" (each its own Markov chain over a 32-token vocabulary); 10% of the training documents are corrupted
(uniformly random tokens). The script prints self-influence AUROC for the corrupted documents next to the loss
baseline, then generates continuations of held-out prompts and checks that their top proponents are training
documents of the prompt's topic (base rate 25%).

    python examples/causal_lm.py        # about 40 s on 2 CPU cores
"""
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_attrib import AttributionCallback, CheckpointCapture
from lightning_attrib.core import TRAK, Attributor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_transformer import report  # noqa: E402

VOCAB, LENGTH, TOPICS = 32, 24, 4


def topic_chains(seed: int = 0) -> torch.Tensor:
    """(TOPICS, VOCAB, VOCAB) transition matrices: each token has 3 likely successors, different per topic."""
    g = torch.Generator().manual_seed(seed)
    chains = torch.full((TOPICS, VOCAB, VOCAB), 0.02 / VOCAB)
    for t in range(TOPICS):
        for v in range(VOCAB):
            chains[t, v, torch.randperm(VOCAB, generator=g)[:3]] += 0.98 / 3
    return chains / chains.sum(-1, keepdim=True)


def sample_docs(chains, n: int, seed: int, length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    topics = torch.arange(n) % TOPICS
    docs = torch.zeros(n, length, dtype=torch.long)
    docs[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for i in range(1, length):
        docs[:, i] = torch.multinomial(chains[topics, docs[:, i - 1]], 1, generator=g).squeeze(1)
    return docs, topics


class Docs(Dataset):
    def __init__(self, ids, labels=None):
        self.ids, self.labels = ids, ids if labels is None else labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class TinyGPT(L.LightningModule):
    def __init__(self, d_model: int = 48, lr: float = 3e-3):
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(LENGTH, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=96, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=1)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=input_ids.device)
        h = self.blocks(self.embed(input_ids) + self.pos[:t], mask=causal, is_causal=True)
        return self.head(self.norm(h))

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        self.log("val/loss", F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1)))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int) -> torch.Tensor:
        ids = prompt
        for _ in range(steps):
            ids = torch.cat([ids, self(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids


def main(out_dir: str = "example_out/causal_lm", epochs: int = 15) -> dict:
    L.seed_everything(0)
    chains = topic_chains()
    docs, topics = sample_docs(chains, 400, seed=0)
    rng = np.random.default_rng(0)
    corrupted = np.zeros(len(docs), dtype=bool)
    corrupted[rng.choice(len(docs), 40, replace=False)] = True
    docs[corrupted] = torch.randint(0, VOCAB, (40, LENGTH), generator=torch.Generator().manual_seed(1))
    train, val = Docs(docs), Docs(sample_docs(chains, 80, seed=2)[0])
    attrib = AttributionCallback(proj_dim=1024, out_dir=out_dir, mislabeled=corrupted)  # zero configuration
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CheckpointCapture(dirpath=f"{out_dir}/snapshots", every_n_epochs=epochs // 3), attrib])
    model = TinyGPT()
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=80))
    row = report("causal LM (dict batches, labels = input_ids)", attrib, time.perf_counter() - t0)

    # attribute generated continuations of held-out prompts (8 prompt tokens, 16 generated; only these count)
    model.eval()
    prompts, prompt_topics = sample_docs(chains, 20, seed=3, length=8)
    generated = model.generate(prompts, LENGTH - 8)
    labels = generated.clone()
    labels[:, :8] = -100
    t1 = time.perf_counter()
    res = Attributor(model, TRAK(), train, Docs(generated, labels), f"{out_dir}/continuations", proj_dim=1024).run()
    same = np.mean([(topics[res.top_proponents(q, 10)[0]] == prompt_topics[q]).float().mean().item()
                    for q in range(len(generated))])
    print(f"[causal LM] generated continuations: {same:.0%} of their top-10 proponents share the prompt's topic "
          f"(base rate 25%); attribution of 20 continuations {time.perf_counter() - t1:.1f} s")
    row["continuation_topic_match"] = same
    return row


if __name__ == "__main__":
    main()

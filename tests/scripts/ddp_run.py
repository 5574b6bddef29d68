"""Runs attribution on N CPU ranks for the DDP tests (inside pytest, strategy="ddp" would re-launch pytest itself).

  attribute mode: score saved snapshots with `lightning_attrib.attribute` (Fabric launches the ranks)
  fit mode:       `Trainer(strategy=..., devices=N).fit` with CheckpointCapture + AttributionCallback attached
"""
import argparse
import os
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback, CheckpointCapture, attribute
from lightning_attrib.data import load_digits_tensors
from lightning_attrib.models import LitClassifier

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def datasets(n_train, n_query):
    x, y = load_digits_tensors()
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[1500:1500 + n_query], y[1500:1500 + n_query])


class CrashAfter:
    """Progress hook that kills one rank after it finished `after` train shards (simulated node failure)."""

    def __init__(self, rank, after):
        self.rank, self.after = rank, after

    def __call__(self, stage, done, total):
        if "/train" in stage and done == self.after and torch.distributed.get_rank() == self.rank:
            os._exit(17)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["attribute", "fit"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--snapshots")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--n-train", type=int, default=203)
    ap.add_argument("--n-query", type=int, default=11)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--proj-dim", type=int, default=64)
    ap.add_argument("--crash-rank", type=int)
    ap.add_argument("--crash-after", type=int, default=2)
    ap.add_argument("--top-k", type=int)
    args = ap.parse_args()
    train, query = datasets(args.n_train, args.n_query)
    if args.mode == "attribute":
        kw = {}
        if args.crash_rank is not None:
            kw["progress"] = CrashAfter(args.crash_rank, args.crash_after)
        if args.top_k is not None:
            kw["top_k"] = args.top_k
        model = LitClassifier(arch="mlp", hidden=16)
        attribute(model, train, query, args.out, snapshots=args.snapshots, devices=args.devices, strategy=args.strategy,
                  proj_dim=args.proj_dim, shard_size=args.shard_size, batch_size=8, **kw)
    else:
        L.seed_everything(0)
        trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy, max_epochs=2,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=args.out,
                            callbacks=[CheckpointCapture(dirpath=f"{args.out}/snaps", every_n_epochs=1),
                                       AttributionCallback(proj_dim=args.proj_dim, out_dir=f"{args.out}/attrib",
                                                           shard_size=args.shard_size)])
        trainer.fit(LitClassifier(arch="mlp", hidden=16, lr=0.05), DataLoader(train, batch_size=32, shuffle=True),
                    DataLoader(query, batch_size=8))
        if trainer.is_global_zero:
            from lightning_attrib import load_results

            res = load_results(f"{args.out}/attrib")
            print(f"RESULT rows={res.scores.shape[0]} cols={res.scores.shape[1]} world={res.manifest['world_size']}")


if __name__ == "__main__":
    main()

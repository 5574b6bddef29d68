"""1 rank vs 2 DDP ranks (CPU, gloo) on the digits demo: featurization time and the largest score difference.

    .venv/bin/python benchmarks/bench_ddp.py

Trains the demo model (10% flipped labels, MLP, 3 snapshots), then attributes the same snapshots with
`lightning_attrib.attribute` on 1 rank and on 2 ranks (`strategy="ddp"`, Fabric re-launches this script).
Featurization time is the manifest's `featurize_s` (rank 0's wall clock around featurization, barriers included).
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lightning_attrib import CheckpointCapture, attribute, load_results
from lightning_attrib.data import DigitsDataModule
from lightning_attrib.models import LitClassifier

WORK = Path(__file__).parent / "_work" / "ddp"


def main():
    torch.set_num_threads(1)  # one thread per rank: 2 ranks use the 2 cores, 1 rank uses one
    dm = DigitsDataModule(n_train=1200, n_val=300, noise=0.1, seed=0)
    mode = sys.argv[1] if len(sys.argv) > 1 else "all"
    if mode == "all":
        shutil.rmtree(WORK, ignore_errors=True)
        L.seed_everything(0)
        L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  callbacks=[CheckpointCapture(dirpath=WORK / "snaps", every_n_epochs=5)]).fit(LitClassifier(), datamodule=dm)
        for devices in (1, 2):
            t0 = time.perf_counter()
            rc = os.system(f"{sys.executable} {__file__} {devices}")
            assert rc == 0
            print(f"devices={devices}: process wall {time.perf_counter() - t0:.1f}s", flush=True)
        one, two = load_results(WORK / "r1"), load_results(WORK / "r2")
        s1, s2 = np.asarray(one.scores), np.asarray(two.scores)
        rel = float(np.abs(s1 - s2).max() / np.abs(s1).max())
        rel_si = float(np.abs(one.self_influence - two.self_influence).max() / np.abs(one.self_influence).max())
        f1, f2 = one.manifest["timings"]["featurize_s"], two.manifest["timings"]["featurize_s"]
        report = {"featurize_s_1rank": f1, "featurize_s_2ranks": f2, "ratio_2_over_1": f2 / f1,
                  "max_rel_diff_scores": rel, "max_rel_diff_self_influence": rel_si,
                  "timings_1rank": one.manifest["timings"], "timings_2ranks": two.manifest["timings"]}
        print(json.dumps(report, indent=2))
        (WORK / "report.json").write_text(json.dumps(report, indent=2))
    else:
        devices = int(mode)
        attribute(LitClassifier(), dm.train_set, dm.val_set, WORK / f"r{devices}", snapshots=WORK / "snaps",
                  devices=devices, strategy="ddp" if devices > 1 else "auto", proj_dim=1024)


if __name__ == "__main__":
    main()

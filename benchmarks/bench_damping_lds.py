"""TRAK's damping ratio vs LDS on MNIST-5k logistic regression (reuses bench_lds_mnist's cached ground truth).

    .venv/bin/python benchmarks/bench_damping_lds.py [--model lr|mlp]
"""
import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_lds_mnist import WORK, build, ground_truth, load_mnist5k, train  # noqa: E402

from lightning_attrib.core import TRAK, Attributor, Snapshot  # noqa: E402
from lightning_attrib.metrics.lds import linear_datamodeling_score  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lr")
    args = ap.parse_args()
    train_xy, query_xy = load_mnist5k(4000, 200)
    masks, truth = ground_truth(args.model, train_xy, query_xy, 50, 20)
    model, _ = train(args.model, *train_xy, seed=0, epochs=20)
    for ratio in (0.01, 0.1, 1.0, 10.0, 100.0):
        out = WORK / f"damp_{args.model}_{ratio}"
        shutil.rmtree(out, ignore_errors=True)
        res = Attributor(build(args.model), TRAK(damping_ratio=ratio), TensorDataset(*train_xy), TensorDataset(*query_xy),
                         out, proj_dim=2048, batch_size=128, shard_size=1024).run([Snapshot("m", state_dict=model.state_dict())])
        lds = linear_datamodeling_score(np.array(res.scores), masks, truth)
        print(f"[{args.model}] TRAK-1 damping_ratio={ratio:>6}: LDS {float(lds['lds']):.3f}", flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

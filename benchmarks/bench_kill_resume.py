"""Soak test of issue 14: SIGKILL an attribution run at random points, check what a reader sees, resume, compare.

Each trial: an older complete result (data seed 1) sits in out_dir; a child process (tests/scripts/trust_kill_child.py)
recomputes it for other data (seed 2) and kills itself with SIGKILL at a random event of a random stage (featurize,
kernel, scoring, publishing); `load_results` must then return the complete old result or raise (a "mixed" or wrong
result is a failure); the run is resumed in this process and must equal an uninterrupted run bit for bit.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_kill_resume.py --trials 20 --seed 0
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.scripts.trust_kill_child import STAGE_POINTS, STAGES, run  # noqa: E402
from tests.test_trust_kill import kill_child, observed_state, same  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)  # stale locks taken over, changed shards recomputed
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="bench_kill_"))
    t0 = time.perf_counter()
    old, new = run(base / "old", 1), run(base / "new", 2)
    states, killed, mixed, wrong, rows = Counter(), 0, 0, 0, []
    for trial in range(args.trials):
        stage = rng.choice(STAGES)
        n = rng.randint(1, STAGE_POINTS[stage])
        out = base / f"trial{trial}"
        run(out, 1)
        code, _ = kill_child(out, 2, stage, n)
        killed += code == -9
        state = observed_state(out, old, new)
        states[state] += 1
        mixed += state == "MIXED"
        resumed = run(out, 2)
        ok = same(resumed, new)
        wrong += not ok
        rows.append({"trial": trial, "stage": stage, "event": n, "killed": code == -9, "reader_saw": state,
                     "resumed_bit_identical": ok})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out)
    summary = {"trials": args.trials, "killed": killed, "reader_saw": dict(states), "mixed": mixed,
               "wrong_after_resume": wrong, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

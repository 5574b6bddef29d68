"""Kill test (issue 14): a run SIGKILLed at each stage (featurize, kernel, scoring, publishing) over an older result,
then resumed, gives results bit-identical to an uninterrupted run; `load_results` in between returns the complete
old result or raises, never a mix."""
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_attrib.core import load_results
from tests.scripts.trust_kill_child import run

CHILD = Path(__file__).parent / "scripts" / "trust_kill_child.py"
ROOT = Path(__file__).parents[1]


def kill_child(out_dir, data_seed, stage, n):
    """Run the child until it kills itself at the n-th event of `stage`; its return code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(CHILD), str(out_dir), str(data_seed), stage, str(n),
                           str(torch.get_num_threads())], env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def same(result, reference) -> bool:
    return (np.array_equal(np.asarray(result.scores), np.asarray(reference.scores))
            and np.array_equal(result.self_influence, reference.self_influence, equal_nan=True)
            and np.array_equal(result.train_ids, reference.train_ids)
            and result.manifest["n_train"] == reference.manifest["n_train"])


def observed_state(out_dir, old, new) -> str:
    """What a reader sees: "old", "new", "error" (refused), or "MIXED" (wrong: must never happen)."""
    try:
        res = load_results(out_dir)
    except (FileNotFoundError, ValueError):
        return "error"
    if same(res, old):
        return "old"
    if same(res, new):
        return "new"
    return "MIXED"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    base = tmp_path_factory.mktemp("refs")
    return run(base / "old", 1), run(base / "new", 2)


@pytest.mark.parametrize("stage, n", [("featurize", 9), ("kernel", 3), ("scoring", 5), ("publishing", 2)])
def test_sigkill_then_resume_is_bit_identical_and_never_mixed(tmp_path, references, stage, n):
    old, new = references
    out = tmp_path / "run"
    run(out, 1)  # an older complete result in the same out_dir
    code, err = kill_child(out, 2, stage, n)
    assert code == -signal.SIGKILL, err[-2000:]
    state = observed_state(out, old, new)
    # before publishing the older result stands untouched; once publishing began a reader is refused
    assert state == ("old" if stage != "publishing" else "error"), state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # stale lock taken over, changed data recomputed
        resumed = run(out, 2)
    assert same(resumed, new)
    assert same(load_results(out), new)
    assert not list(out.glob(".staging-*")) and not (out / ".lock").exists()

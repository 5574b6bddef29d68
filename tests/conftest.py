import os
import warnings

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core box spinning made small solves 100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # a loaded 2-core CI box runs tiny models far faster on one thread
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture
def wandb_dirs(tmp_path, monkeypatch):
    """Point every W&B directory at a temp dir and force offline mode."""
    d = tmp_path / "wandb_home"
    d.mkdir()
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return d

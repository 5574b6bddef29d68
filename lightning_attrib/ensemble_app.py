"""The `lightning-attrib ensemble` app: train one model per seed (a Hydra multirun of the `train` app), merge
their attribution results into one (`core.ensemble.ensemble`), then compute the metrics and report them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

# overrides the members must not inherit: they are set per member or belong to this app
_NOT_FORWARDED = ("ensemble.", "hydra", "seed", "data.seed", "attribution.seed", "ensemble_dir", "out_dir")


def member_dirs(cfg: DictConfig) -> list[str]:
    """The members' result dirs: `ensemble.results` if given, else those of a seed sweep run now."""
    e = cfg.ensemble
    if e.results:
        return [str(r) for r in e.results]
    from hydra.core.hydra_config import HydraConfig

    seeds = [int(e.first_seed) + i for i in range(int(e.seeds))]
    if len(seeds) < 1:
        raise ValueError(f"ensemble.seeds must be >= 1, got {e.seeds}")
    forwarded = [o for o in HydraConfig.get().overrides.task if not o.split("=")[0].lstrip("+~").startswith(_NOT_FORWARDED)]
    # every member sees the same data (data.seed pinned), trains with its own seed and draws its own projection
    pinned = [f"data.seed={int(cfg.seed)}"] if "seed" in (cfg.get("data") or {}) else []
    cmd = [sys.executable, "-m", "lightning_attrib", "train", "-m", *forwarded, f"seed={','.join(map(str, seeds))}",
           *pinned, "attribution.seed=${seed}", f"hydra.sweep.dir={e.dir}", "hydra.sweep.subdir=seed${seed}",
           *list(e.launcher_overrides)]
    if e.launcher != "basic":
        cmd.insert(5, f"hydra/launcher={e.launcher}")
    print("lightning-attrib ensemble: seed sweep:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return [str(Path(e.dir) / f"seed{s}" / "attrib") for s in seeds]


def run(cfg: DictConfig) -> dict:
    from .core.ensemble import ensemble

    dirs = member_dirs(cfg)
    res = ensemble(dirs, cfg.ensemble_dir)
    metrics = report(cfg, res)
    print(f"lightning-attrib ensemble: {res.manifest['method']} over {len(dirs)} models written to "
          f"{Path(cfg.ensemble_dir).resolve()}", *(f"  {k:<50s} {v:.4f}" for k, v in sorted(metrics.items())),
          sep="\n", flush=True)
    return {"result_dir": str(cfg.ensemble_dir), "members": dirs, "metrics": metrics}


def report(cfg: DictConfig, res) -> dict[str, float]:
    """Mislabel-detection metrics of the merged self-influence (when the data module knows the flipped labels),
    through the configured logger: W&B gets the full report (tables, histogram, artifact), others the scalars."""
    import torch

    train_ds = query_ds = truth = None
    if cfg.get("data"):
        from hydra.utils import instantiate

        dm = instantiate(cfg.data)  # the members' data: they ran with data.seed = this seed
        dm.prepare_data()
        dm.setup("fit")
        train_ds, query_ds = dm.train_dataloader().dataset, dm.val_dataloader().dataset
        truth = getattr(dm, "train_flipped", None)
    metrics: dict[str, float] = {"attrib/ensemble/num_models": float(res.manifest["ensemble"]["num_models"])}
    if truth is not None and len(truth) == len(res.train_ids) and not res.manifest.get("constant_self_influence"):
        from .metrics import MislabelDetection

        metric = MislabelDetection()
        metric.update(torch.as_tensor(res.self_influence, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.bool))
        metrics.update({f"attrib/mislabel/self_influence/{k}": float(v) for k, v in metric.compute().items()})
    if cfg.get("logger"):
        from hydra.utils import instantiate

        from .reporting import LoggerReporter, WandbReporter

        logger = instantiate(cfg.logger)
        is_wandb = type(logger).__name__ == "WandbLogger"
        reporter = WandbReporter(logger, [logger]) if is_wandb else LoggerReporter([logger])
        reporter.report(res, metrics, train_ds=train_ds, query_ds=query_ds, truth=truth)
        logger.finalize("success")
    return metrics

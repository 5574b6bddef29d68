"""`lightning-attrib [APP] [hydra overrides]`: Hydra apps `train` (default), `attribute`, `subset`, `lds`, `modeldiff`, `leakage`.

Configs ship inside the package (`lightning_attrib/conf`, also reachable as `configs/` in the repository);
add your own with Hydra's `--config-dir DIR`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_PATH = "conf"


def train(cfg: DictConfig) -> dict:
    """Fit the configured model with the configured callbacks; print where attribution results landed."""
    import lightning as L
    from hydra.utils import instantiate

    from .callbacks import AttributionCallback

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    trainer.fit(model, datamodule=datamodule)
    attribution = next((c for c in callbacks if isinstance(c, AttributionCallback)), None)
    summary = {"out_dir": str(cfg.out_dir)}
    if trainer.is_global_zero and attribution is not None and attribution.result is not None:
        summary.update(_print_summary(cfg, trainer, datamodule, attribution))
    return summary


def _print_summary(cfg, trainer, datamodule, attribution) -> dict:

    res = attribution.result
    damping = res.manifest.get("damping")
    damping = ", ".join(f"{d:.4g}" for d in damping) if isinstance(damping, list) else damping
    lines = ["", "=" * 72, f"lightning-attrib: {res.manifest['method']} on {res.manifest['n_train']} training x "
             f"{res.manifest['n_query']} query examples",
             f"damping used: {damping} ({res.manifest.get('damping_rule', 'see manifest.json')})"]
    for key, val in sorted(attribution.metrics.items()):
        lines.append(f"  {key:<55s} {val:.4f}")
    flipped = getattr(datamodule, "train_flipped", None)
    ids, values = res.suspects(int(cfg.get("print_suspects", 10)))
    lines.append(f"Top {len(ids)} self-influence suspects (train id, score{', flipped' if flipped is not None else ''}):")
    for i, v in zip(ids, values):
        lines.append(f"  {int(i):6d}  {v:.4g}" + (f"  {'FLIPPED' if flipped[int(i)] else ''}" if flipped is not None else ""))
    lines.append(f"Results:  {Path(res.out_dir).resolve()}  (load with lightning_attrib.load_results)")
    wandb_dir = None
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            wandb_dir = str(Path(lg.experiment.dir).parent)
            lines.append(f"W&B run:  {wandb_dir}  (offline: `wandb sync {wandb_dir}` to upload)")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
    return {"metrics": attribution.metrics, "wandb_dir": wandb_dir, "result_dir": str(res.out_dir)}


def attribute(cfg: DictConfig) -> dict:
    """Score saved snapshots (no training) on `devices` ranks."""
    from hydra.utils import instantiate

    from .standalone import attribute as run_attribute

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model)
    a = cfg.attribution
    res = run_attribute(model, datamodule.train_dataloader().dataset, datamodule.val_dataloader().dataset,
                        cfg.attrib_dir, snapshots=cfg.snapshots, method=a.method,
                        method_kwargs=OmegaConf.to_container(a.method_kwargs, resolve=True), accelerator=cfg.accelerator,
                        devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes, proj_dim=a.proj_dim,
                        projector=a.projector, seed=a.seed, batch_size=a.batch_size)
    print(f"lightning-attrib attribute: {res.manifest['method']} scores {tuple(res.scores.shape)} written to "
          f"{Path(cfg.attrib_dir).resolve()} (world size {res.manifest['world_size']})", flush=True)
    return {"result_dir": str(cfg.attrib_dir)}


def subset(cfg: DictConfig) -> dict:
    """Train on one random subset (an LDS ground-truth job); run many with `-m lds.index='range(0,M)'`."""
    from .sweeps import train_subset

    return train_subset(cfg)


def lds(cfg: DictConfig) -> dict:
    """One command for LDS: full-data attribution, a Hydra multirun of subset retrainings, evaluation."""
    import subprocess

    from hydra.core.hydra_config import HydraConfig

    from .sweeps import evaluate

    result_dir = cfg.lds.scores
    if result_dir is None:
        train(cfg)
        result_dir = str(Path(cfg.out_dir) / "attrib")
    forwarded = [o for o in HydraConfig.get().overrides.task if not o.split("=")[0].lstrip("+~").startswith(("lds.", "hydra"))]
    cmd = [sys.executable, "-m", "lightning_attrib", "subset", "-m", *forwarded, f"lds.dir={cfg.lds.dir}",
           f"lds.index=range(0,{int(cfg.lds.num_subsets)})", f"lds.alpha={cfg.lds.alpha}", f"lds.seed={cfg.lds.seed}",
           f"lds.output={cfg.lds.output}", *list(cfg.lds.launcher_overrides)]
    if cfg.lds.launcher != "basic":
        cmd.insert(5, f"hydra/launcher={cfg.lds.launcher}")
    print("lightning-attrib lds: subset sweep:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    report = evaluate(cfg.lds.dir, result_dir, datamodels=cfg.lds.datamodels, heldout_fraction=cfg.lds.heldout_fraction)
    print(f"lightning-attrib lds: {report.get('method')} LDS = {report.get('lds', float('nan')):.4f} "
          f"(95% CI {report.get('lds_ci')}) over {report['num_subsets']} subsets; datamodels held-out LDS = "
          f"{report.get('datamodels_lds_heldout', float('nan')):.4f}. Written to {Path(cfg.lds.dir) / 'lds.json'}",
          flush=True)
    _log_lds(cfg, report, result_dir)
    return report


def _log_lds(cfg: DictConfig, report: dict, result_dir: str) -> None:
    """LDS scalars (+ a predicted-vs-actual scatter on W&B) through the configured logger, if any."""
    if not cfg.get("lds_logger"):
        return
    from hydra.utils import instantiate

    from .sweeps import scatter_rows

    logger = instantiate(cfg.lds_logger)
    logger.log_metrics({k: v for k, v in {"lds/lds": report.get("lds"), "lds/datamodels_heldout":
                        report.get("datamodels_lds_heldout")}.items() if v is not None})
    if type(logger).__name__ == "WandbLogger":
        import wandb

        table = wandb.Table(columns=["query", "predicted", "actual"], data=scatter_rows(result_dir, cfg.lds.dir))
        logger.experiment.log({"lds/scatter": wandb.plot.scatter(table, "predicted", "actual", title="LDS: predicted vs actual")})
    logger.save()
    logger.finalize("success")


def _datasets(cfg: DictConfig):
    """(train, query) datasets of the configured data module, or (None, None) when no `data` is configured."""
    if not cfg.get("data"):
        return None, None
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.train_dataloader().dataset, datamodule.val_dataloader().dataset


def _wandb_run(cfg: DictConfig):
    if not cfg.get("logger"):
        return None
    from hydra.utils import instantiate

    logger = instantiate(cfg.logger)
    return logger.experiment if type(logger).__name__ == "WandbLogger" else None


def modeldiff(cfg: DictConfig) -> dict:
    """Compare two recipes' attribution results (ModelDiff): directions one uses and the other does not."""
    from .analysis import modeldiff as run_modeldiff

    md = run_modeldiff(cfg.a, cfg.b, n_components=cfg.n_components, projection=cfg.projection)
    out = md.save(Path(cfg.out_dir) / "modeldiff", k=cfg.top_k)
    print(md.report(k=min(10, cfg.top_k)), f"\nModelDiff written to {out}", sep="\n", flush=True)
    run = _wandb_run(cfg)
    if run is not None:
        from .reporting.analyses import log_modeldiff

        train_ds, query_ds = _datasets(cfg)
        log_modeldiff(run, md, train_ds, query_ds, k=cfg.top_k)
        print(f"W&B run: {Path(run.dir).parent}", flush=True)
        run.finish()
    return {"out": str(out)}


def leakage(cfg: DictConfig) -> dict:
    """Rank suspected train-test duplicate pairs of a saved attribution result."""
    from .analysis import detect_leakage, load_store_features
    from .core.results import load_results

    res = load_results(cfg.result)
    train_ds, query_ds = _datasets(cfg)
    report = detect_leakage(res, train_ds, query_ds, *load_store_features(res), top_k=cfg.top_k)
    path = report.save(Path(cfg.out_dir) / "leakage.json")
    print(report.table(20), f"Leakage report written to {path}", sep="\n", flush=True)
    run = _wandb_run(cfg)
    if run is not None:
        from .reporting.analyses import leakage_table

        run.log({"leakage/pairs": leakage_table(report, train_ds, query_ds, k=cfg.top_k), "leakage/flags": report.flags})
        run.finish()
    return {"flags": report.flags, "out": str(path)}


def ensemble(cfg: DictConfig) -> dict:
    """Train one model per seed (a Hydra multirun) and merge their results into one ensemble result."""
    from .ensemble_app import run

    return run(cfg)


APPS = {"train": train, "attribute": attribute, "subset": subset, "lds": lds, "modeldiff": modeldiff,
        "leakage": leakage, "ensemble": ensemble}


def main(argv: list[str] | None = None) -> None:
    """Dispatch `lightning-attrib APP overrides...` to the Hydra app APP (default `train`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    app = args.pop(0) if args and args[0] in APPS else "train"
    if args and args[0] in ("-h", "--help") and len(args) == 1:
        print(f"usage: lightning-attrib [{'|'.join(APPS)}] [hydra overrides...]\napps:\n" +
              "\n".join(f"  {k:<10s} {v.__doc__.splitlines()[0]}" for k, v in APPS.items()) + "\n")
    sys.argv = [f"lightning-attrib {app}"] + args
    hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=app)(APPS[app])()

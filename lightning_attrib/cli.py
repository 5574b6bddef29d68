"""`lightning-attrib [APP] [hydra overrides]`: Hydra apps `train` (default), `attribute`, `subset`, `lds`, `modeldiff`, `leakage`.

Configs ship inside the package (`lightning_attrib/conf`, also reachable as `configs/` in the repository);
add your own with Hydra's `--config-dir DIR`; `_target_`s resolve from the working directory too.
The `attribution` config group reaches the API through one mapping, `attribution_kwargs` (an unknown key is an
error before training); runs log their resolved config as hyperparameters; each log line is printed once.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_PATH = "conf"
APP_ENV = "LIGHTNING_ATTRIB_APP"  # the app of this command, for the DDP ranks Lightning re-launches
# `attribution.*` keys that configure snapshot capture during training (CheckpointCapture), not the scoring.
CAPTURE_KEYS = ("snapshot_every_n_epochs", "keep_snapshots")


def attribution_kwargs(attribution: DictConfig, api: str = "callback") -> dict:
    """The `attribution` config group as keyword arguments of the API an app calls (`api="callback"`:
    `AttributionCallback`, the train app; `"attribute"`: `lightning_attrib.attribute`, the attribute app): every key
    but the capture keys, by name, resolved. A key that API does not take is an error that names it."""
    from .callbacks import AttributionCallback
    from .core.pipeline import Attributor
    from .standalone import attribute

    targets = {"callback": [AttributionCallback], "attribute": [attribute, Attributor]}[api]
    known = set().union(*(inspect.signature(t).parameters for t in targets))
    kwargs = {k: v for k, v in OmegaConf.to_container(attribution, resolve=True).items() if k not in CAPTURE_KEYS}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        name = "AttributionCallback" if api == "callback" else "lightning_attrib.attribute"
        raise ValueError(f"attribution.{unknown[0]} is not a setting of {name} (its settings here: "
                         f"{sorted(known & set(kwargs))}; capture settings: {list(CAPTURE_KEYS)}): remove it or fix "
                         "its spelling")
    return kwargs


def instantiate_callbacks(cfg: DictConfig) -> list:
    """The configured callbacks; an `AttributionCallback` among them gets every `attribution.*` setting
    (`attribution_kwargs`), so no key of the group can be left out. A callback config that sets one of them to
    another value itself is an error (which one would win is not obvious)."""
    from hydra.utils import get_class, instantiate

    from .callbacks import AttributionCallback

    callbacks = []
    for name, c in (cfg.get("callbacks") or {}).items():
        settings = {}
        if cfg.get("attribution") and "_target_" in c and issubclass(get_class(c._target_), AttributionCallback):
            settings = attribution_kwargs(cfg.attribution)
            own = OmegaConf.to_container(c, resolve=True)
            for key, value in settings.items():
                if key in own and own[key] != value:
                    raise ValueError(f"callbacks.{name}.{key}={own[key]!r} contradicts attribution.{key}={value!r}: "
                                     f"set attribution.{key} only")
        callbacks.append(instantiate(c, **settings))
    return callbacks


def _quiet_logs() -> None:
    """Each log line once: Lightning adds its own stderr handler to the `lightning` logger and also propagates to
    the root logger that Hydra configured; the root's handlers (console + the job's log file) are enough."""
    import lightning  # noqa: F401  (its import adds the handler)

    if logging.getLogger().handlers:
        own = logging.getLogger("lightning")
        for handler in list(own.handlers):
            own.removeHandler(handler)


def _app(fn):
    """An app as Hydra runs it: one log line per record, `_target_`s importable from the working directory."""

    @functools.wraps(fn)
    def run(cfg: DictConfig):
        _quiet_logs()
        return fn(cfg)

    return run


def _working_directory_on_path() -> None:
    """A user's `_target_: my_module.MyModel` resolves from the directory the command runs in (as with `python -m`),
    without PYTHONPATH=.; the console script alone would not look there."""
    cwd = os.getcwd()
    if all(os.path.abspath(p or ".") != cwd for p in sys.path):
        sys.path.insert(0, cwd)


def train(cfg: DictConfig) -> dict:
    """Fit the configured model with the configured callbacks; print where attribution results landed."""
    import lightning as L
    from hydra.utils import instantiate

    from .callbacks import AttributionCallback

    callbacks = instantiate_callbacks(cfg)  # a wrong attribution.* key fails here, before training
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    _log_config(trainer, cfg, datamodule)
    trainer.fit(model, datamodule=datamodule)
    attribution = next((c for c in callbacks if isinstance(c, AttributionCallback)), None)
    summary = {"out_dir": str(cfg.out_dir)}
    wandb_dirs = []
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
            wandb_dirs.append(str(Path(lg.experiment.dir).parent))
            summary.setdefault("wandb_dir", wandb_dirs[-1])
            # flushed now (its own summary printed before ours, so ours ends the output); a later run of this
            # process (the lds app's) is a run of its own
            lg.experiment.finish()
    if trainer.is_global_zero and attribution is not None and attribution.result is not None:
        summary.update(_print_summary(cfg, datamodule, attribution, wandb_dirs))
    return summary


def _log_config(trainer, cfg: DictConfig, datamodule) -> None:
    """The resolved config (attribution settings included) as every logger's hyperparameters. The data module's
    own hparams are not merged in as well (they are `data` here): Lightning refuses keys that the module and the
    data module both have with different values (e.g. `image_shape`)."""
    if not trainer.loggers:
        return
    config = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams(config)
    if hasattr(datamodule, "_log_hyperparams"):
        datamodule._log_hyperparams = False


def _print_summary(cfg, datamodule, attribution, wandb_dirs: list[str]) -> dict:
    """The run's closing lines: method, damping, metrics, top suspects, where the result and the W&B run are."""

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
    for wandb_dir in wandb_dirs:
        lines.append(f"W&B run:  {wandb_dir}  (offline: `wandb sync {wandb_dir}` to upload)")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
    return {"metrics": attribution.metrics, "wandb_dir": wandb_dirs[0] if wandb_dirs else None,
            "result_dir": str(res.out_dir)}


def attribute(cfg: DictConfig) -> dict:
    """Score saved snapshots (no training) on `devices` ranks."""
    from hydra.utils import instantiate

    from .standalone import attribute as run_attribute

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    kwargs = attribution_kwargs(cfg.attribution, api="attribute")
    model = instantiate(cfg.model)
    res = run_attribute(model, datamodule.train_dataloader().dataset, datamodule.val_dataloader().dataset,
                        cfg.attrib_dir, snapshots=cfg.snapshots, accelerator=cfg.accelerator, devices=cfg.devices,
                        strategy=cfg.strategy, num_nodes=cfg.num_nodes, **kwargs)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return {"result_dir": str(cfg.attrib_dir)}
    shape = (f"scores {tuple(res.scores.shape)}" if res.top_k is None else
             f"top {res.top_k} proponents/opponents of {res.n_query} queries")
    print(f"lightning-attrib attribute: {res.manifest['method']} {shape} written to "
          f"{Path(cfg.attrib_dir).resolve()} (world size {res.manifest['world_size']})", flush=True)
    return {"result_dir": str(cfg.attrib_dir)}


def subset(cfg: DictConfig) -> dict:
    """Train on one random subset (an LDS ground-truth job); run many with `-m lds.index='range(0,M)'`."""
    from .sweeps import train_subset

    return train_subset(cfg)


def lds(cfg: DictConfig) -> dict:
    """One command for LDS: full-data attribution, a Hydra multirun of subset retrainings, evaluation."""
    from .sweeps import evaluate, run_subset_sweep

    group = _share_wandb_group(cfg)
    result_dir = cfg.lds.scores
    if result_dir is None:
        train(cfg)
        result_dir = str(Path(cfg.out_dir) / "attrib")
    _check_scores_fit_the_data(cfg, result_dir)  # before the retrainings: nothing may fail after them
    cmd = _subset_sweep_command(cfg)
    print(f"lightning-attrib lds: retraining on {int(cfg.lds.num_subsets)} subsets (log: "
          f"{Path(cfg.lds.dir) / 'sweep.log'}):\n  {' '.join(cmd)}", flush=True)
    run_subset_sweep(cmd, cfg.lds.dir, int(cfg.lds.num_subsets))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate(cfg.lds.dir, result_dir, datamodels=cfg.lds.datamodels,
                          heldout_fraction=cfg.lds.heldout_fraction)
    for w in caught:
        print(f"lightning-attrib lds: warning: {w.message}", flush=True)
    lo, hi = report.get("lds_ci", [float("nan")] * 2)
    dm = (f"datamodels held-out LDS = {report['datamodels_lds_heldout']:.4f}" if "datamodels_lds_heldout" in report
          else "datamodels skipped" + (" (warning above)" if "datamodels_skipped" in report else ""))
    print(f"lightning-attrib lds: {report.get('method')} LDS = {report.get('lds', float('nan')):.4f} "
          f"(95% CI [{lo:.4f}, {hi:.4f}]) over {report['num_subsets']} subsets; {dm}. "
          f"Written to {Path(cfg.lds.dir) / 'lds.json'}", flush=True)
    try:
        _log_lds(cfg, report, result_dir, group)
    except Exception as err:  # the LDS is computed and written: a logger failure must not turn it into an error
        print(f"lightning-attrib lds: warning: logging the LDS failed ({type(err).__name__}: {err}); the report is "
              f"in {Path(cfg.lds.dir) / 'lds.json'}", flush=True)
    return report


def _is_wandb(logger_cfg) -> bool:
    return bool(logger_cfg) and str(logger_cfg.get("_target_", "")).endswith("WandbLogger")


def _share_wandb_group(cfg: DictConfig) -> str | None:
    """With a W&B logger, the attribution run and the LDS run share one group (the configured `logger.group`,
    else `lds-<run dir>`); returns it."""
    if not _is_wandb(cfg.get("logger")):
        return None
    with open_dict(cfg):
        if not cfg.logger.get("group"):
            out = Path(str(cfg.out_dir))
            cfg.logger.group = f"lds-{out.parent.name}-{out.name}"
    return str(cfg.logger.group)


def _check_scores_fit_the_data(cfg: DictConfig, result_dir: str) -> None:
    """The scores must be a full (n_train, n_query) matrix of the configured data, or the LDS cannot be computed."""
    from hydra.utils import instantiate

    from .core.results import load_results

    res = load_results(result_dir)
    if res.top_k is not None:
        raise ValueError(f"{result_dir} keeps only the top {res.top_k} scores per query; the LDS needs the full "
                         "score matrix: run with attribution.top_k=null")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    shape = (len(datamodule.train_dataloader().dataset), len(datamodule.val_dataloader().dataset))
    if tuple(res.scores.shape) != shape:
        raise ValueError(f"the scores in {result_dir} are {tuple(res.scores.shape)} but the configured data has "
                         f"(n_train, n_query) = {shape}: give lds.scores a result of the same data")


def _subset_sweep_command(cfg: DictConfig) -> list[str]:
    """`python -m lightning_attrib subset -m ...` with this run's overrides and config dir (no logger: the
    retrainings log nothing)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    skip = ("lds.", "lds_logger", "logger", "hydra")
    forwarded = [o for o in hc.overrides.task if not o.split("=")[0].lstrip("+~").startswith(skip)]
    config_dirs = [src.path.split("://", 1)[-1] for src in hc.runtime.config_sources
                   if src.provider == "command-line" and src.schema == "file"]
    cmd = [sys.executable, "-m", "lightning_attrib", "subset", "-m",
           *(arg for d in config_dirs for arg in ("--config-dir", d)), *forwarded, f"lds.dir={cfg.lds.dir}",
           f"lds.index=range(0,{int(cfg.lds.num_subsets)})", f"lds.alpha={cfg.lds.alpha}", f"lds.seed={cfg.lds.seed}",
           f"lds.output={cfg.lds.output}", *list(cfg.lds.launcher_overrides)]
    if cfg.lds.launcher != "basic":
        cmd.insert(5, f"hydra/launcher={cfg.lds.launcher}")
    return cmd


def _log_lds(cfg: DictConfig, report: dict, result_dir: str, group: str | None) -> None:
    """LDS, its CI (and datamodels' held-out LDS) through `lds_logger`, else the experiment's logger; on W&B a run
    in the attribution run's project and group, with a predicted-vs-actual scatter."""
    from hydra.utils import instantiate

    from .sweeps import scatter_rows

    logger_cfg = cfg.get("lds_logger") or cfg.get("logger")
    if not logger_cfg:
        return
    wandb = _is_wandb(logger_cfg)
    extra = {}
    if wandb:
        extra = {"job_type": "lds", "group": logger_cfg.get("group") or group}
        extra["name"] = logger_cfg.get("name") or (f"{extra['group']}-lds" if extra["group"] else None)
    logger = instantiate(logger_cfg, **{k: v for k, v in extra.items() if v})
    values = {"lds/lds": report.get("lds"), "lds/ci_low": (report.get("lds_ci") or [None])[0],
              "lds/ci_high": (report.get("lds_ci") or [None, None])[1], "lds/num_subsets": report["num_subsets"],
              "lds/datamodels_heldout": report.get("datamodels_lds_heldout")}
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    logger.log_metrics({k: float(v) for k, v in values.items() if v is not None})
    if wandb and "lds" in report:
        import wandb as wb

        table = wb.Table(columns=["query", "predicted", "actual"], data=scatter_rows(result_dir, cfg.lds.dir))
        logger.experiment.log({"lds/scatter": wb.plot.scatter(table, "predicted", "actual",
                                                              title="LDS: predicted vs actual")})
        print(f"lightning-attrib lds: W&B run {Path(logger.experiment.dir).parent} (project "
              f"{logger_cfg.get('project')}, group {extra['group']})", flush=True)
    logger.save()
    logger.finalize("success")
    if wandb:
        logger.experiment.finish()


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
    if type(logger).__name__ != "WandbLogger":
        return None
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the run's config: this app's settings
    return logger.experiment


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
    if args and args[0] in APPS:
        app = args.pop(0)
    elif os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(APP_ENV) in APPS:
        app = os.environ[APP_ENV]  # a DDP rank Lightning started by re-running this command without the app name
    else:
        app = "train"
    if args and args[0] in ("-h", "--help") and len(args) == 1:
        print(f"usage: lightning-attrib [{'|'.join(APPS)}] [hydra overrides...]\napps:\n" +
              "\n".join(f"  {k:<10s} {v.__doc__.splitlines()[0]}" for k, v in APPS.items()) + "\n")
    # Hydra parses sys.argv[1:] as overrides; Lightning's DDP launcher re-runs sys.argv (or `-m` the main module)
    # for the other ranks, which then find the app name in APP_ENV.
    sys.argv = [sys.argv[0] if sys.argv else "lightning-attrib"] + args
    os.environ[APP_ENV] = app
    _working_directory_on_path()
    hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=app)(_app(APPS[app]))()

"""Train SAPD: ``python -m sapd.train [experiment=r50] [key=value ...]``.

With no arguments it trains the embedded default (a small backbone from scratch on the built-in
synthetic COCO-format set, on the CPU) and prints the COCO table of the best checkpoint.
``train(cfg)`` does the work and is what the tests call; ``main`` is the thin Hydra shell.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from sapd.module import SAPDLitModule
from sapd.paths import CONFIG_DIR
from sapd.utils import config_to_dict, format_coco_table, instantiate_group, resolve_precision, set_threads

log = logging.getLogger("sapd.train")


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> SAPDLitModule:
    """The detector of ``cfg.model`` wrapped with the optimiser of ``cfg.optim``."""
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    optim = cfg.optim
    module = SAPDLitModule(
        net=net,
        optimizer=instantiate(optim.optimizer),
        scheduler=dict(optim.scheduler),
        batch_size=int(cfg.data.batch_size),
        base_batch_size=int(optim.base_batch_size),
        no_decay_norm_bias=bool(optim.get("no_decay_norm_bias", False)),
        label_to_cat_id=list(datamodule.label_to_cat_id),
        class_names=list(datamodule.class_names),
        channels_last=bool(cfg.get("channels_last", False)),
    )
    module.run_config = config_to_dict(cfg)
    return module


SUMMARY_FILE = "summary.json"
# Model keys a run summary records: the architecture and the switches that ablations vary.
REPORTED_MODEL_KEYS = (
    "_target_",
    "soft_weight",
    "soft_select",
    "eta",
    "topk",
    "epsilon",
    "valid_region",
    "soft_weight_norm",
    "normaliser",
    "unselected",
    "ignore_epsilon",
)


def _overrides() -> list[str]:
    """The command-line overrides of this Hydra job (sweep parameters included); [] outside Hydra."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def run_summary(
    cfg: DictConfig,
    table: dict[str, float],
    minutes: float,
    fit_seconds: float,
    fit_steps: int,
    global_step: int,
) -> dict[str, Any]:
    """What :mod:`sapd.report` tabulates: the run's overrides, seed, model switches, COCO table, times."""
    model = cfg.get("model", {})
    switches = {k: model.get(k) for k in REPORTED_MODEL_KEYS if k in model}
    return {
        "overrides": _overrides(),
        "task_name": cfg.get("task_name"),
        "group": cfg.get("group"),
        "seed": cfg.get("seed"),
        "model": switches,
        "max_epochs": cfg.trainer.get("max_epochs"),
        "limit_train_batches": cfg.trainer.get("limit_train_batches"),
        "global_step": int(global_step),
        "metrics": {k: float(v) for k, v in table.items()},
        "minutes": round(minutes, 3),
        "seconds_per_step": round(fit_seconds / fit_steps, 4) if fit_steps else None,
    }


def write_summary(summary: dict[str, Any], output_dir: Path) -> Path:
    """Writes ``summary.json`` into the run folder (read back by ``python -m sapd.report``)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fits the model of ``cfg`` on its data, then evaluates the best checkpoint.

    Returns:
        the final metrics (``val/map`` etc.) and the objects built (datamodule, module, trainer).
    """
    start = time.time()
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    set_threads(cfg.get("num_threads"))

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)

    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # nothing to monitor the learning rate into (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), str(cfg.trainer.get("accelerator", "auto")))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision)
    for lg in loggers:
        lg.log_hyperparams(module.run_config)

    fit_start, start_step = time.time(), trainer.global_step
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds, fit_steps = time.time() - fit_start, trainer.global_step - start_step
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    best_cb = next((c for c in checkpoints if c.monitor and c.best_model_path), None)
    best = best_cb.best_model_path if best_cb is not None else ""
    last = next((c.best_model_path for c in checkpoints if not c.monitor and c.best_model_path), "")
    # The weights in memory are the best checkpoint's when the last validation (after the last step)
    # scored the best: then its table stands and validating again would repeat the same pass.
    best_is_current = (
        best_cb is not None
        and getattr(module, "last_coco_step", None) == trainer.global_step
        and float(best_cb.best_model_score) == module.last_coco_table.get("map")
    )
    if cfg.get("validate_best", True) and not trainer.fast_dev_run and not best_is_current:
        results = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        if results:
            metrics.update({k: float(v) for k, v in results[0].items()})
    table = getattr(module, "last_coco_table", None)
    minutes = (time.time() - start) / 60
    if table and trainer.is_global_zero:
        print("\n" + format_coco_table(table, title=f"COCO bbox, {cfg.data.get('name', 'val')} ({minutes:.1f} min)"))
    if trainer.is_global_zero:
        if best:
            print(f"best checkpoint: {best}")
        if last:
            print(f"last checkpoint (resume with ckpt_path=...): {last}")
        print(f"logs and outputs: {cfg.paths.output_dir}")
    if trainer.is_global_zero and not trainer.fast_dev_run:
        summary = run_summary(cfg, table or {}, minutes, fit_seconds, fit_steps, trainer.global_step)
        write_summary(summary, Path(cfg.paths.output_dir))
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()
    objects = {"datamodule": datamodule, "module": module, "trainer": trainer, "best_ckpt": best}
    return metrics, objects


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()

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

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig

from sapd import diagnostics
from sapd.app import hydra_app
from sapd.build import build_backbone, build_module
from sapd.callbacks import InterruptCheckpoint, LearningCheck, PhaseSwitch
from sapd.checkpoint import check_checkpoint_file, check_resume, saved_step
from sapd.checkpoint_io import AtomicCheckpointIO
from sapd.checks import check_config
from sapd.errors import ConfigError
from sapd.evaluation import Evaluation
from sapd.logging_setup import configure_logging
from sapd.models.settings import reported_keys
from sapd.module import NonFiniteLossError
from sapd.provenance import data_identity, source_commit
from sapd.run_folder import SUMMARY_FILE, claim_run_folder
from sapd.utils import format_coco_table, instantiate_group, resolve_precision, set_threads
from sapd.wandb_logger import WANDB_ID_FILE, resume_wandb_config

log = logging.getLogger("sapd.train")

# Criterion keys a run summary records (flat, beside the model's ``_target_``): the switches ablations vary.
REPORTED_CRITERION_KEYS = reported_keys()


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
    data_counts: dict[str, Any] | None = None,
    phase_switch_epoch: int | None = None,
    instance_counts: dict[str, int] | None = None,
    device: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What :mod:`sapd.report` tabulates: the run's overrides, seed, model switches, COCO table, times,
    ``data_counts`` (``COCODataModule.data_counts()``: per split, the images, boxes and annotations
    read, dropped or skipped; {} when the data module has none), the ``phase_switch_epoch`` used and
    ``instance_counts`` (training instances seen, and those that owned no anchor point) and ``device``
    (:func:`device_figures`), the ``commit`` it ran from and its ``data`` (:mod:`sapd.provenance`)."""
    model = cfg.get("model", {})
    criterion = model.get("criterion") or {}
    # commit and data: sapd.report pairs seeds, and pools runs into a row, only at one commit and data set
    switches = {"_target_": model.get("_target_")} if "_target_" in model else {}
    switches.update({k: criterion.get(k) for k in REPORTED_CRITERION_KEYS if k in criterion})
    return {
        "overrides": _overrides(),
        "task_name": cfg.get("task_name"),
        "group": cfg.get("group"),
        "seed": cfg.get("seed"),
        "model": switches,
        "commit": source_commit(),
        "data": data_identity(cfg),
        "max_epochs": cfg.trainer.get("max_epochs"),
        "limit_train_batches": cfg.trainer.get("limit_train_batches"),
        "global_step": int(global_step),
        "metrics": {k: float(v) for k, v in table.items()},
        "minutes": round(minutes, 3),
        "seconds_per_step": round(fit_seconds / fit_steps, 4) if fit_steps else None,
        "phase_switch_epoch": phase_switch_epoch,
        "data_counts": dict(data_counts or {}),
        "instance_counts": dict(instance_counts or {}),
        "device": dict(device or {}),
    }


def device_figures(device: torch.device) -> dict[str, Any]:
    """Where the run trained: the device type, and on CUDA the GPU's name and the peak memory that
    PyTorch's allocator held (GiB, ``torch.cuda.max_memory_allocated``) since the process started."""
    out: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        out["name"] = torch.cuda.get_device_name(device)
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def write_summary(summary: dict[str, Any], output_dir: Path) -> Path:
    """Writes ``summary.json`` into the run folder (read back by ``python -m sapd.report``)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fits the model of ``cfg`` on its data, then evaluates the best checkpoint.

    The run folder (``paths.output_dir``) is held for the run (:func:`sapd.run_folder.claim_run_folder`):
    one in use by another training, or holding a run that ``ckpt_path`` does not resume, is refused
    before any data is read. Ctrl-C saves ``last.ckpt`` at the end of the batch and ends the run with
    ``SystemExit(130)`` after one line (:class:`sapd.callbacks.InterruptCheckpoint`).

    Returns:
        the final metrics (``val/map`` etc.) and the objects built (datamodule, module, trainer).
    """
    start = time.time()
    check_config(cfg)  # a wrong value costs a second, not a data-set scan
    # always on (callbacks=none too): a run that learns nothing stops before a best checkpoint is kept
    try:
        learning_check = LearningCheck(**(cfg.get("learning_check") or {}))
    except TypeError as exc:  # an unknown key (+learning_check.x=...)
        raise ConfigError(f"learning_check: {exc}; its key is max_skipped_fraction") from None
    if cfg.get("ckpt_path") and cfg.get("train", True):
        check_checkpoint_file(cfg.ckpt_path)  # missing, 0-byte or truncated: one line, before any data
        check_resume(cfg, cfg.ckpt_path)  # a checkpoint of another model: one line, before any data
    # a folder in use, or holding a run this one does not resume: one line, nothing overwritten
    with claim_run_folder(cfg.paths.output_dir, cfg.get("ckpt_path")):
        return _fit_and_report(cfg, start, learning_check)


def best_is_current(best_cb: ModelCheckpoint | None, evaluation: Evaluation | None, trainer: L.Trainer) -> bool:
    """Whether the weights in memory are the best checkpoint's, scored: the latest validation ran after the
    last step (its :class:`~sapd.evaluation.Evaluation` is of ``trainer.global_step``), scored the monitored
    value, and the checkpoint the callback kept as best was saved at that same step
    (:func:`sapd.checkpoint.saved_step`). Then its table stands, and validating the best checkpoint again
    would repeat the same pass. The steps are compared, not the scores: an earlier checkpoint that scored
    the same as the latest validation stays the best one."""
    if best_cb is None or evaluation is None or not best_cb.best_model_path:
        return False
    key = str(best_cb.monitor).removeprefix(f"{evaluation.stage}/")
    return (
        evaluation.stage == "val"
        and evaluation.step == trainer.global_step
        and key in evaluation.table
        and saved_step(best_cb.best_model_path) == trainer.global_step
    )


def _fit_and_report(
    cfg: DictConfig, start: float, learning_check: LearningCheck
) -> tuple[dict[str, float], dict[str, Any]]:
    """The run in the claimed folder: data and module, callbacks, loggers and trainer, the fit, the score of the
    best checkpoint (on stdout), then ``summary.json`` and the run's report."""
    datamodule, module = _data_and_module(cfg)
    output_dir = Path(cfg.paths.output_dir)
    callbacks, loggers, interrupt = _callbacks_and_loggers(cfg, output_dir, learning_check)
    trainer = _make_trainer(cfg, callbacks, loggers)
    _record_run(trainer, module, loggers, output_dir)
    fit_seconds, fit_steps = _fit(cfg, trainer, module, datamodule, interrupt)
    device = device_figures(trainer.strategy.root_device)  # before validation: the training peak
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best, last, evaluation = _score_best(cfg, trainer, module, datamodule, callbacks, metrics)
    table = evaluation.table if evaluation is not None else {}
    minutes = (time.time() - start) / 60
    _announce(cfg, trainer, table, minutes, best, last)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        counts = datamodule.data_counts() if hasattr(datamodule, "data_counts") else None
        switch = next((c.switch_epoch_in_use for c in callbacks if isinstance(c, PhaseSwitch)), None)
        summary = run_summary(
            cfg,
            table,
            minutes,
            fit_seconds,
            fit_steps,
            trainer.global_step,
            counts,
            switch,
            getattr(module, "instance_counts", None),
            device,
        )
        write_summary(summary, output_dir)
        if (cfg.get("report") or {}).get("enabled", True):
            _write_run_report(cfg, module, datamodule, loggers, output_dir)
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()
    objects = {"datamodule": datamodule, "module": module, "trainer": trainer, "best_ckpt": best}
    return metrics, objects


def _data_and_module(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The seeded data module, set up for fitting, and the module built for its classes."""
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    set_threads(cfg.get("num_threads"))
    # before the data: pretrained weights that cannot be fetched or read are refused in a second,
    # not after a data-set scan (the backbone is the model's first part built: the same weights)
    backbone = build_backbone(cfg)

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if cfg.get("ckpt_path") and cfg.get("train", True):  # of other classes: one line, before the model
        check_resume(cfg, cfg.ckpt_path, list(datamodule.label_to_cat_id))
    module = build_module(
        cfg,
        label_to_cat_id=list(datamodule.label_to_cat_id),
        class_names=list(datamodule.class_names),
        backbone=backbone,
    )
    return datamodule, module


def _callbacks_and_loggers(
    cfg: DictConfig, output_dir: Path, learning_check: LearningCheck
) -> tuple[list[L.Callback], list[Logger], InterruptCheckpoint]:
    """The configured callbacks with the learning check and the Ctrl-C checkpoint (returned on its own too),
    and the configured loggers with a CSV logger whenever the run's report reads ``metrics.csv``."""
    report_cfg = cfg.get("report") or {}
    callbacks = [*instantiate_group(cfg.get("callbacks")), learning_check]
    # a run resumed from a checkpoint (ckpt_path=...) continues the wandb run that wrote it
    loggers = instantiate_group(resume_wandb_config(cfg.get("logger"), cfg.get("ckpt_path")))
    if report_cfg.get("enabled", True) and not any(isinstance(lg, CSVLogger) for lg in loggers):
        # the report's training curves read metrics.csv: it is recorded whatever the logger
        loggers.append(CSVLogger(save_dir=str(output_dir), name="csv"))
    if not loggers:  # nothing to monitor the learning rate into (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    # Ctrl-C saves last.ckpt at the next batch boundary and stops the run (exit status 130)
    interrupt = InterruptCheckpoint(output_dir / "checkpoints" / "last.ckpt")
    callbacks.append(interrupt)
    return callbacks, loggers, interrupt


def _make_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Logger]) -> L.Trainer:
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), str(cfg.trainer.get("accelerator", "auto")))
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        precision=precision,
        plugins=[AtomicCheckpointIO()],  # last.ckpt is whole or the previous one stays
    )


def _record_run(trainer: L.Trainer, module: L.LightningModule, loggers: list[Logger], output_dir: Path) -> None:
    """The run's config to every logger; the wandb run id into the module (so into every checkpoint) and
    into the run folder, for a resume."""
    for lg in loggers:
        lg.log_hyperparams(module.run_config)
        if isinstance(lg, WandbLogger) and lg.version:
            module.wandb_run_id = str(lg.version)  # into every checkpoint, for a resume
            if trainer.is_global_zero:
                output_dir.mkdir(parents=True, exist_ok=True)
                (output_dir / WANDB_ID_FILE).write_text(module.wandb_run_id + "\n")


def _fit(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    interrupt: InterruptCheckpoint,
) -> tuple[float, int]:
    """Fits (unless ``train=false``); returns the seconds and steps it took. After Ctrl-C, one line and
    ``SystemExit(130)``."""
    fit_start, start_step = time.time(), trainer.global_step
    if cfg.get("train", True):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SystemExit:  # Lightning's exit after a KeyboardInterrupt
            if not interrupt.requested:
                raise
            if trainer.is_global_zero:
                log.warning("sapd.train: %s", interrupt.message())
            raise SystemExit(interrupt.EXIT_STATUS) from None
        finally:
            interrupt.restore()
    return time.time() - fit_start, trainer.global_step - start_step


def _score_best(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    callbacks: list[L.Callback],
    metrics: dict[str, float],
) -> tuple[str, str, Evaluation | None]:
    """The best and last checkpoints' paths ('' when none) and the evaluation of the best one: the latest
    validation's when it scored the best checkpoint (:func:`best_is_current`), else a validation of the best
    checkpoint (unless ``validate_best=false`` or a fast dev run), whose numbers update ``metrics``."""
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    best_cb = next((c for c in checkpoints if c.monitor and c.best_model_path), None)
    best = best_cb.best_model_path if best_cb is not None else ""
    last = next((c.best_model_path for c in checkpoints if not c.monitor and c.best_model_path), "")
    evaluation = module.evaluator.result  # the latest validation's outcome, with the step it scored
    validate_best = cfg.get("validate_best", True) and not trainer.fast_dev_run
    if validate_best and not best_is_current(best_cb, evaluation, trainer):
        results = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        if results:
            metrics.update({k: float(v) for k, v in results[0].items()})
        evaluation = module.evaluator.result
    return best, last, evaluation


def _announce(
    cfg: DictConfig, trainer: L.Trainer, table: dict[str, float], minutes: float, best: str, last: str
) -> None:
    """The COCO table on stdout (the command's product), then where the checkpoints and outputs are."""
    if table and trainer.is_global_zero:  # the command's product: on stdout
        print("\n" + format_coco_table(table, title=f"COCO bbox, {cfg.data.get('name', 'val')} ({minutes:.1f} min)"))
    if best:
        log.info("best checkpoint: %s", best)
    if last:
        log.info("last checkpoint (resume with ckpt_path=...): %s", last)
    log.info("logs and outputs: %s", cfg.paths.output_dir)


def _write_run_report(
    cfg: DictConfig,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    loggers: list[Logger],
    output_dir: Path,
) -> None:
    """The run's ``report/`` (:func:`sapd.diagnostics.report_module`), its curves from this run's
    ``metrics.csv`` and, for a resumed run, that of the run it resumes."""
    report_cfg = cfg.get("report") or {}
    csv_loggers = [lg for lg in loggers if isinstance(lg, CSVLogger)]
    for lg in csv_loggers:
        lg.save()  # rows still buffered reach metrics.csv
    csv_files = [Path(lg.log_dir) / "metrics.csv" for lg in csv_loggers]
    if cfg.get("ckpt_path"):  # a resumed run: its curves start with those of the run it resumes
        earlier = diagnostics.find_metrics_csv(Path(cfg.ckpt_path).parent.parent)
        csv_files = [f for f in earlier if f.resolve() not in {c.resolve() for c in csv_files}][-1:] + csv_files
    diagnostics.report_module(
        output_dir,
        module,
        datamodule.val_dataset,
        report_cfg,
        size_divisor=getattr(datamodule, "size_divisor", 128),
        metrics_files=csv_files,
        title=f"{cfg.get('task_name', 'train')}, {cfg.data.get('name', 'val')}",
    )


@hydra_app("sapd.train", "train", NonFiniteLossError)
def main(cfg: DictConfig) -> float | None:
    """Trains; a user error (config value, data, checkpoint) is one line on stderr and exit code 2."""
    configure_logging()
    metrics, _ = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()

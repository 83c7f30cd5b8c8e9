"""Evaluate a checkpoint: ``python -m sapd.evaluate ckpt_path=PATH [split=val|test] [data.KEY=VALUE ...]``.

``split=val`` prints the COCO table and writes the detections as a COCO results json (original
category ids); ``split=test`` (COCO test-dev, no annotations) writes the results json only, in the
format of the test-dev submission server. The model and the data config come from the checkpoint;
``data.KEY=VALUE`` changes a key of the checkpoint's data config (``data.root=...``,
``data.val_ann=...``), and a data config chosen here (``data=coco`` or ``data=synthetic``, then its
``data.*`` keys) replaces it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from sapd import diagnostics
from sapd.app import hydra_app
from sapd.callbacks import nothing_scored
from sapd.checkpoint import load_module
from sapd.checks import check_config
from sapd.data import DataError
from sapd.errors import ConfigError
from sapd.logging_setup import configure_logging
from sapd.utils import format_coco_table, instantiate_group, set_threads


def eval_data_config(chosen: DictConfig | None, stored: DictConfig) -> DictConfig:
    """The data config to evaluate on: ``chosen`` when it is a whole one (``data=<group>``: it has a
    ``_target_``), else the checkpoint's (``stored``) with the keys of ``chosen`` (``data.KEY=VALUE``)
    changed. Resolved here, where ``${paths...}`` of a chosen config can be; the stored one is resolved.

    Raises:
        ConfigError: a ``data.KEY`` that the checkpoint's data config does not have.
    """
    if chosen is not None and "_target_" in chosen:
        return OmegaConf.create(OmegaConf.to_container(chosen, resolve=True))
    data_cfg = OmegaConf.create(OmegaConf.to_container(stored, resolve=True))
    if chosen:
        changes = OmegaConf.create(OmegaConf.to_container(chosen, resolve=True))
        unknown = sorted(set(changes) - set(data_cfg))
        if unknown:
            raise ConfigError(
                f"data.{unknown[0]} is not a key of the checkpoint's data config "
                f"({', '.join(sorted(str(k) for k in data_cfg if k != '_target_'))}); "
                "or choose a whole data config: data=coco data.root=..."
            )
        data_cfg = OmegaConf.merge(data_cfg, changes)
    return data_cfg


def data_keys_added(argv: list[str]) -> list[str]:
    """Command-line arguments with each ``data.KEY=VALUE`` made ``++data.KEY=VALUE`` when no data config
    is chosen (``data=...``): the config then has no ``data`` node for Hydra to change, and the keys
    are changes to the checkpoint's data config (:func:`eval_data_config`)."""
    if any(a.lstrip("+").startswith("data=") for a in argv[1:]):
        return list(argv)
    return [argv[0], *(f"++{a}" if a.startswith("data.") and "=" in a else a for a in argv[1:])]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Runs the checkpoint over ``cfg.split`` and returns the COCO table (empty for test-dev)."""
    check_config(cfg)  # ckpt_path given, score_thresh, batch_size, ...: one line before any work
    set_threads(cfg.get("num_threads"))
    if cfg.split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', not {cfg.split!r}")
    module, run_cfg = load_module(cfg.ckpt_path)
    data_cfg = eval_data_config(cfg.get("data"), run_cfg.data)
    with open_dict(data_cfg):
        if cfg.get("batch_size"):
            data_cfg.val_batch_size = int(cfg.batch_size)
    datamodule: L.LightningDataModule = instantiate(data_cfg)
    datamodule.prepare_data()
    module.results_file = str(cfg.results_file) if cfg.get("results_file") else None
    if cfg.get("score_thresh") is not None:
        module.net.postprocessor = module.net.postprocessor.replace(score_thresh=float(cfg.score_thresh))
    if list(datamodule.label_to_cat_id) != list(module.label_to_cat_id or []):
        raise ConfigError(
            "the data's categories differ from the checkpoint's: evaluate on the data set the model was "
            f"trained for (checkpoint: {len(module.label_to_cat_id or [])} classes, data: {datamodule.num_classes})"
        )
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=instantiate_group(cfg.get("callbacks")))
    table: dict[str, float] = {}
    if cfg.split == "val":
        trainer.validate(module, datamodule=datamodule, verbose=False)
    else:
        trainer.test(module, datamodule=datamodule, verbose=False)
    evaluation = module.evaluator.result
    table = evaluation.table if evaluation is not None else {}
    if cfg.split == "val" and not table:  # every image left out: say so rather than print nothing
        raise DataError(nothing_scored("val", datamodule))
    if table and trainer.is_global_zero:  # the command's product: on stdout
        print("\n" + format_coco_table(table, title=f"COCO bbox, {cfg.split} ({cfg.ckpt_path})"))
    if module.results_file and trainer.is_global_zero:
        print(f"detections (COCO results json): {module.results_file}")
    report_cfg = cfg.get("report") or {}
    if report_cfg.get("enabled", True) and trainer.is_global_zero:
        ckpt = Path(cfg.ckpt_path)
        diagnostics.report_module(
            cfg.paths.output_dir,
            module,
            datamodule.val_dataset if cfg.split == "val" else datamodule.test_dataset,
            report_cfg,
            size_divisor=getattr(datamodule, "size_divisor", 128),
            metrics_files=diagnostics.find_metrics_csv(ckpt.parent.parent)[-1:],  # the training run's curves
            title=f"{ckpt.name}, {getattr(datamodule, 'name', 'data')} {cfg.split}",
            images_file=f"{cfg.split}_images.png",
        )
    return table


@hydra_app("sapd.evaluate", "eval")
def _main(cfg: DictConfig) -> None:
    configure_logging()
    evaluate(cfg)


def main(cfg: DictConfig | None = None) -> None:
    """Evaluates; a bad checkpoint, data or value is one line on stderr and exit code 2. Without
    ``cfg`` the config is composed from the command line (``data.KEY=VALUE``: :func:`data_keys_added`)."""
    if cfg is not None:
        _main(cfg)
        return
    sys.argv = data_keys_added(sys.argv)
    _main()


if __name__ == "__main__":
    main()

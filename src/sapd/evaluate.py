"""Evaluate a checkpoint: ``python -m sapd.evaluate ckpt_path=PATH [split=val|test] [data=coco data.root=...]``.

``split=val`` prints the COCO table and writes the detections as a COCO results json (original
category ids); ``split=test`` (COCO test-dev, no annotations) writes the results json only, in the
format of the test-dev submission server. The model and the data config come from the checkpoint
unless a data config is chosen here (``data=coco`` or ``data=synthetic``, then ``data.*`` keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from sapd import run_report
from sapd.api import SCORE_THRESH
from sapd.callbacks import nothing_scored
from sapd.checkpoint import load_module
from sapd.data import DataError
from sapd.errors import ConfigError, refusals
from sapd.logs import configure_logging
from sapd.paths import CONFIG_PATH
from sapd.utils import format_coco_table, instantiate_group, set_threads


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Runs the checkpoint over ``cfg.split`` and returns the COCO table (empty for test-dev)."""
    set_threads(cfg.get("num_threads"))
    if cfg.split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', not {cfg.split!r}")
    module, run_cfg = load_module(cfg.ckpt_path)
    chosen = cfg.get("data")  # data=<group> on the command line; else the checkpoint's data config
    # resolved here, where ${paths...} of the chosen config can be; the checkpoint's is stored resolved
    data_cfg = OmegaConf.create(OmegaConf.to_container(chosen or run_cfg.data, resolve=True))
    with open_dict(data_cfg):
        if cfg.get("batch_size"):
            data_cfg.val_batch_size = int(cfg.batch_size)
    datamodule: L.LightningDataModule = instantiate(data_cfg)
    datamodule.prepare_data()
    module.results_file = str(cfg.results_file) if cfg.get("results_file") else None
    if cfg.get("score_thresh") is not None:
        module.net.postprocessor.score_thresh = float(cfg.score_thresh)
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
    table = module.last_coco_table
    if cfg.split == "val" and not table:  # every image left out: say so rather than print nothing
        raise DataError(nothing_scored("val", datamodule))
    if table and trainer.is_global_zero:  # the command's product: on stdout
        print("\n" + format_coco_table(table, title=f"COCO bbox, {cfg.split} ({cfg.ckpt_path})"))
    if module.results_file and trainer.is_global_zero:
        print(f"detections (COCO results json): {module.results_file}")
    report_cfg = cfg.get("report") or {}
    if report_cfg.get("enabled", True) and trainer.is_global_zero:
        ckpt = Path(cfg.ckpt_path)
        run_report.report_module(
            cfg.paths.output_dir,
            module,
            datamodule.val_dataset if cfg.split == "val" else datamodule.test_dataset,
            size_divisor=getattr(datamodule, "size_divisor", 128),
            metrics_files=run_report.find_metrics_csv(ckpt.parent.parent)[-1:],  # the training run's curves
            score_thresh=float(report_cfg.get("score_thresh", SCORE_THRESH)),
            num_images=int(report_cfg.get("num_images", 8)),
            title=f"{ckpt.name}, {getattr(datamodule, 'name', 'data')} {cfg.split}",
            images_file=f"{cfg.split}_images.png",
        )
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@refusals("sapd.evaluate")
def main(cfg: DictConfig) -> None:
    """Evaluates; a bad checkpoint, data or value is one line on stderr and exit code 2."""
    configure_logging()
    evaluate(cfg)


if __name__ == "__main__":
    main()

"""Rebuilding a trained detector from a checkpoint alone (its config travels inside it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sapd.build import build_module, migrate_model_config
from sapd.module import SAPDLitModule

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing or was not written by sapd."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (train one with `python -m sapd.train`; the run prints its path)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a broken file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not ckpt.get("sapd_config"):
        raise CheckpointError(f"{path} is not a sapd training checkpoint (no 'sapd_config' inside)")
    return ckpt


def load_module(path: str | Path) -> tuple[SAPDLitModule, DictConfig]:
    """The Lightning module of a sapd checkpoint, weights loaded, in eval mode, and the run's config.

    The module is built by :func:`sapd.build.build_module` from the config inside the checkpoint, the
    backbone without downloading pretrained weights (the checkpoint holds them). A checkpoint written
    before ``model.criterion`` / ``model.postprocess`` existed is read with its keys moved there.
    """
    ckpt = read_checkpoint(path)
    run_cfg = OmegaConf.create(ckpt["sapd_config"])
    model_cfg, moved = migrate_model_config(run_cfg.model)
    if moved:
        log.warning("%s has the config layout of an older sapd; read with %s", path, ", ".join(moved))
        run_cfg.model = OmegaConf.create(model_cfg)
    classes = ckpt.get("sapd_classes") or {}
    label_to_cat_id = classes.get("label_to_cat_id")
    if not label_to_cat_id:
        label_to_cat_id = list(range(int(run_cfg.model.get("num_classes"))))
    try:
        module = build_module(
            run_cfg, label_to_cat_id=label_to_cat_id, class_names=classes.get("class_names"), pretrained=False
        )
    except Exception as exc:  # noqa: BLE001 - instantiate wraps every error of every constructor
        raise CheckpointError(f"cannot rebuild the model of {path} from its config: {exc}") from None
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith(("val_map", "test_map"))]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model of its own config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.eval()
    return module, run_cfg

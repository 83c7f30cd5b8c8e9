"""Rebuilding a trained detector from a checkpoint alone (its config travels inside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sapd.module import SAPDLitModule


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
    """The Lightning module of a sapd checkpoint, weights loaded, and the run's config.

    The backbone is built without downloading pretrained weights: the checkpoint holds them.
    """
    ckpt = read_checkpoint(path)
    run_cfg = OmegaConf.create(ckpt["sapd_config"])
    classes = ckpt.get("sapd_classes") or {}
    label_to_cat_id = classes.get("label_to_cat_id")
    class_names = classes.get("class_names")
    num_classes = len(label_to_cat_id) if label_to_cat_id else int(run_cfg.model.get("num_classes"))
    model_cfg = OmegaConf.merge(run_cfg.model, {"backbone": {"pretrained": False, "checkpoint_path": None}})
    net = instantiate(model_cfg, num_classes=num_classes)
    module = SAPDLitModule(
        net=net,
        optimizer=torch.optim.SGD,
        label_to_cat_id=label_to_cat_id,
        class_names=class_names,
        batch_size=int(run_cfg.data.get("batch_size", 1)),
    )
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith(("val_map", "test_map"))]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model of its own config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.run_config = ckpt["sapd_config"]
    module.eval()
    return module, run_cfg

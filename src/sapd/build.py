"""The one way a run's config becomes a detector (:func:`build_net`) and a
:class:`~sapd.module.SAPDLitModule` (:func:`build_module`).

Training (:mod:`sapd.train`), evaluation and analysis call :func:`build_module`: for training with the
data module's classes, for the others with the classes and config a checkpoint carries
(:func:`sapd.checkpoint.load_module`); prediction, export and :class:`sapd.Detector` need the detector
alone (:func:`sapd.checkpoint.load_detector`), without Lightning. The model config instantiates objects:
the detector (``model._target_``) receives its backbone, neck, head, selection net, criterion
(``model.criterion``) and post-processing (``model.postprocess``) as built objects.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from sapd.errors import ConfigError, UserError
from sapd.models.settings import CRITERION_TARGET, POSTPROCESS_TARGET, CriterionSettings, PostProcessSettings
from sapd.utils import config_to_dict

if TYPE_CHECKING:
    from torch import nn

    from sapd.module import SAPDLitModule

# Keys that configs written before ``model.criterion`` / ``model.postprocess`` existed kept flat under
# ``model`` (checkpoints of sapd 0.1 before the change); :func:`migrate_model_config` moves them.
CRITERION_KEYS = tuple(f.name for f in dataclasses.fields(CriterionSettings))
POSTPROCESS_KEYS = tuple(f.name for f in dataclasses.fields(PostProcessSettings))
SAPD_TARGET = "sapd.models.SAPD"


def migrate_model_config(model: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A model config of the current layout, and the keys moved to get it (empty when it had it).

    Before ``model.criterion`` and ``model.postprocess`` were config nodes, their keys sat flat under
    ``model`` (``model.eta``, ``model.score_thresh``, ...) and SAPD's criterion held its own ``z``.
    """
    cfg = dict(OmegaConf.to_container(OmegaConf.create(dict(model)), resolve=False))
    moved: list[str] = []
    nodes = [("postprocess", POSTPROCESS_TARGET, POSTPROCESS_KEYS)]
    if cfg.get("_target_") == SAPD_TARGET:
        nodes.insert(0, ("criterion", CRITERION_TARGET, CRITERION_KEYS))
    elif cfg.get("_target_") != "sapd.models.FCOSDetector":
        return cfg, moved
    for node, target, keys in nodes:
        if node in cfg:
            continue
        cfg[node] = {"_target_": target}
        for key in keys:
            if key in cfg:
                cfg[node][key] = cfg.pop(key)
                moved.append(f"model.{key} -> model.{node}.{key}")
    return cfg, moved


def _instantiate(node: Any, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        # a constructor's own refusal (e.g. "model.criterion.topk must be ...") is the message to show,
        # as the apps' one-line refusal (exit 2)
        cause = exc.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        raise


def build_backbone(cfg: DictConfig) -> Any:
    """The backbone of ``cfg.model`` alone, its pretrained weights fetched or read now: the first
    thing a training run builds, so that weights that cannot be had (no network, a file of another
    model, a file that is not weights) are refused before any data set is read. Pass it on to
    :func:`build_module` (``backbone=``), which then builds the rest around it; None for a model
    config without a ``backbone`` node."""
    node = cfg.model.get("backbone") if "model" in cfg else None
    if node is None or "_target_" not in node:
        return None
    return _instantiate(node)


def build_net(cfg: DictConfig, *, num_classes: int, pretrained: bool = True, backbone: Any = None) -> nn.Module:
    """The detector of ``cfg.model`` for ``num_classes`` classes.

    Args:
        cfg: a run config (``conf/train.yaml`` composed, or the one a checkpoint carries).
        pretrained: False builds the backbone without fetching pretrained weights (a checkpoint's
            state dict replaces them anyway).
        backbone: the backbone :func:`build_backbone` built from this config (None: built here).
    """
    if not pretrained and "backbone" in cfg.model:
        cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
        with open_dict(cfg):
            cfg.model.backbone.pretrained = False
            cfg.model.backbone.checkpoint_path = None
    extra = {"backbone": backbone} if backbone is not None else {}
    return _instantiate(cfg.model, num_classes=num_classes, **extra)


def build_module(
    cfg: DictConfig,
    *,
    label_to_cat_id: Sequence[int],
    class_names: Sequence[str] | None = None,
    pretrained: bool = True,
    backbone: Any = None,
) -> SAPDLitModule:
    """The detector of ``cfg.model`` (:func:`build_net`) wrapped with the optimiser of ``cfg.optim``.

    Args:
        cfg: a run config (``conf/train.yaml`` composed, or the one a checkpoint carries).
        label_to_cat_id: contiguous label -> data set category id; its length is the number of classes.
        class_names: names of the labels (for drawings and per-class tables).
        pretrained, backbone: as :func:`build_net`.
    """
    from sapd.module import SAPDLitModule  # Lightning: imported by the commands that train or evaluate only

    net = build_net(cfg, num_classes=len(label_to_cat_id), pretrained=pretrained, backbone=backbone)
    optim = cfg.get("optim") or {}
    optimizer = instantiate(optim["optimizer"]) if "optimizer" in optim else None
    module = SAPDLitModule(
        net=net,
        optimizer=optimizer,
        scheduler=_scheduler(optim.get("scheduler")),
        batch_size=int(cfg.data.get("batch_size", 1)),
        base_batch_size=int(optim.get("base_batch_size", 16)),
        no_decay_norm_bias=bool(optim.get("no_decay_norm_bias", False)),
        label_to_cat_id=list(label_to_cat_id),
        class_names=list(class_names) if class_names is not None else None,
        channels_last=bool(cfg.get("channels_last", False)),
    )
    module.run_config = config_to_dict(cfg)
    return module


def _scheduler(node: Any) -> Any:
    """The partial schedule of ``optim.scheduler`` (a Hydra partial of :func:`sapd.optim.lr_schedule`); the
    config of a run from before it was one (the keyword arguments alone) is the same schedule."""
    if not node:
        return None
    node = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(dict(node)), resolve=True))
    if "_target_" not in node:
        node = OmegaConf.merge({"_target_": "sapd.optim.lr_schedule", "_partial_": True}, node)
    return instantiate(node, _convert_="all")

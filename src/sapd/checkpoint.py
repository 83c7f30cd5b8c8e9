"""Rebuilding a trained detector from a checkpoint alone (its config travels inside it): the detector
(:func:`load_detector`, without Lightning) or the training module (:func:`load_module`); and the checks
of a checkpoint file and of a resume, made before any model is built."""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sapd.build import build_module, build_net, migrate_model_config
from sapd.errors import UserError

if TYPE_CHECKING:
    from sapd.module import SAPDLitModule

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that is missing or was not written by sapd."""


def _others(path: Path) -> str:
    """The other checkpoints beside ``path``, as a hint for the user."""
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    return f"; the other checkpoints there: {', '.join(others[:5])}" if others else ""


def check_checkpoint_file(path: str | Path) -> Path:
    """Cheap checks that ``path`` is a whole checkpoint file, without loading it.

    A checkpoint is a zip archive (``torch.save``'s format): its central directory is at the end of
    the file, so a save cut short (a 0-byte or truncated file) fails here in milliseconds, with a
    :class:`CheckpointError` that names the file, says what happened and lists the run's other
    checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (train one with `python -m sapd.train`; the run prints its path)"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): its save was interrupted; resume from another one{_others(path)}"
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or not a torch checkpoint: "
            f"its save was interrupted or the file is something else; use another one{_others(path)}"
        )
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a broken file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not ckpt.get("sapd_config"):
        raise CheckpointError(f"{path} is not a sapd training checkpoint (no 'sapd_config' inside)")
    return ckpt


def saved_step(path: str | Path) -> int | None:
    """The global training step a Lightning checkpoint was saved at, read without its tensors (the file
    is memory-mapped); None when the file cannot be read or holds no step."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - a missing, remote or broken file: the step is unknown
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


@dataclass
class TrainedDetector:
    """The detector of a checkpoint with what travels beside its weights; the attributes a
    :class:`sapd.module.SAPDLitModule` has of the same names."""

    net: nn.Module
    label_to_cat_id: list[int]
    class_names: list[str] | None
    channels_last: bool = False


def _parts(path: str | Path) -> tuple[dict[str, Any], DictConfig, list[int], list[str] | None]:
    """The checkpoint, its run config (in the current layout), its labels' category ids and class names."""
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
    return ckpt, run_cfg, list(label_to_cat_id), classes.get("class_names")


def _rebuilt(path: str | Path, build: Any) -> Any:
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - instantiate wraps every error of every constructor
        raise CheckpointError(f"cannot rebuild the model of {path} from its config: {exc}") from None


def _load_weights(path: str | Path, model: nn.Module, state_dict: dict[str, Any]) -> None:
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(("val_map", "test_map"))]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model of its own config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()


def load_detector(path: str | Path) -> tuple[TrainedDetector, DictConfig]:
    """The detector of a sapd checkpoint, weights loaded, in eval mode, and the run's config, without
    Lightning: what prediction, export and :class:`sapd.Detector` need.

    The detector is built by :func:`sapd.build.build_net` from the config inside the checkpoint, the
    backbone without downloading pretrained weights (the checkpoint holds them). A checkpoint written
    before ``model.criterion`` / ``model.postprocess`` existed is read with its keys moved there.
    """
    ckpt, run_cfg, label_to_cat_id, class_names = _parts(path)
    net = _rebuilt(path, lambda: build_net(run_cfg, num_classes=len(label_to_cat_id), pretrained=False))
    prefix = "net."
    state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in ckpt["state_dict"].items()}
    _load_weights(path, net, {k: v for k, v in state.items() if not k.startswith(("val_map", "test_map"))})
    channels_last = bool(run_cfg.get("channels_last", False))
    if channels_last:  # as the training module ran it
        net.to(memory_format=torch.channels_last)
    return TrainedDetector(net, label_to_cat_id, class_names, channels_last), run_cfg


def load_module(path: str | Path) -> tuple[SAPDLitModule, DictConfig]:
    """The Lightning module of a sapd checkpoint (:func:`load_detector`'s detector with the run's
    optimiser settings and evaluator), weights loaded, in eval mode, and the run's config."""
    ckpt, run_cfg, label_to_cat_id, class_names = _parts(path)
    module = _rebuilt(
        path,
        lambda: build_module(run_cfg, label_to_cat_id=label_to_cat_id, class_names=class_names, pretrained=False),
    )
    _load_weights(path, module, ckpt["state_dict"])
    return module, run_cfg


# Model settings that decide the weights a checkpoint holds, or which of them train: a resumed run
# must keep them (the loss and post-processing settings may change).
RESUME_MODEL_KEYS = (
    "_target_",
    "backbone.name",
    "backbone.dcn",
    "backbone.norm_eval",
    "backbone.frozen_stages",
    "neck.out_channels",
    "neck.num_levels",
    "neck.bfp",
    "head.feat_channels",
    "head.num_convs",
    "head.norm",
    "selection.roi_size",
    "selection.channels",
    "num_convs",
)


def _dotted(node: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def check_resume(cfg: DictConfig, path: str | Path, label_to_cat_id: list[int] | None = None) -> None:
    """Refuses, in one line, to resume ``cfg`` from a checkpoint of another model (a key of
    :data:`RESUME_MODEL_KEYS` differs) or, given the data's ``label_to_cat_id``, of other classes.

    Reads only the checkpoint's settings (the file is memory-mapped, its tensors are not read), so
    the model check runs before any data set is read and the class check before any model is built;
    Lightning's own refusal would come after both, as a long traceback.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - a file torch cannot read is named where it is loaded
        return
    stored = ckpt.get("sapd_config") if isinstance(ckpt, dict) else None
    if not stored or not isinstance(stored.get("model"), dict):
        raise CheckpointError(
            f"ckpt_path={path} is not a sapd training checkpoint (no 'sapd_config' inside): resume from the "
            "checkpoints/last.ckpt of a sapd.train run"
        )
    theirs, _ = migrate_model_config(stored["model"])
    ours = OmegaConf.to_container(cfg.model, resolve=True)
    diffs = [(k, _dotted(theirs, k), _dotted(ours, k)) for k in RESUME_MODEL_KEYS]
    diffs = [(k, a, b) for k, a, b in diffs if a != b]
    if diffs:
        key, a, b = diffs[0]
        more = f" (and {len(diffs) - 1} more model setting(s))" if len(diffs) > 1 else ""
        raise CheckpointError(
            f"ckpt_path={path} holds another model: model.{key} is {a!r} there and {b!r} here{more}; resume with "
            "the settings of the run that wrote it (its .hydra/config.yaml), or leave out ckpt_path for a new run"
        )
    stored_ids = (ckpt.get("sapd_classes") or {}).get("label_to_cat_id")
    if label_to_cat_id is not None and stored_ids is not None and list(stored_ids) != list(label_to_cat_id):
        raise CheckpointError(
            f"ckpt_path={path} was trained on {len(stored_ids)} classes and this data set has "
            f"{len(label_to_cat_id)}{' (other category ids)' if len(stored_ids) == len(label_to_cat_id) else ''}: "
            "resume on the data set it was trained on, or leave out ckpt_path for a new run"
        )

"""The start-up checks of a composed config of any command (``train``, ``evaluate``, ``predict``,
``export``, the tools): :func:`check_config` checks it against :data:`~sapd.checks.settings.SETTINGS`,
plus the rules that tie keys together (``topk`` against the pyramid's levels, a GPU trainer against the
GPUs torch sees, ...), and raises a :class:`~sapd.errors.ConfigError` whose message is one line naming
the key, the allowed values and the value given. Keys a config does not have are skipped.

The model's constructors keep their own checks for library use (``SAPDCriterion``, ``PostProcess``,
``SAPD``); these are what the commands check first, before any data set is read or model built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from sapd.checks.settings import SETTINGS
from sapd.errors import ConfigError
from sapd.models.setting_rules import is_int


def _value(cfg: Any, key: str) -> tuple[bool, Any]:
    """(present, value) of the dotted ``key``; an interpolation that cannot be resolved is a ConfigError."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, (DictConfig, Mapping)) or part not in node:
            return False, None
        if isinstance(node, DictConfig):
            if OmegaConf.is_missing(node, part):
                return True, None  # named by the missing-value check
            try:
                node = node[part]
            except InterpolationResolutionError as exc:
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: {' '.join(str(exc).split())}") from None
        else:
            node = node[part]
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    return True, node


def check_missing(cfg: Any) -> None:
    """A ``???`` value the command needs, and nobody gave: one line naming the key."""
    if not isinstance(cfg, DictConfig):
        return

    def walk(node: DictConfig, prefix: str) -> list[str]:  # interpolations are not resolved here
        found = []
        for key in node:
            full = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                found.append(full)
            elif not OmegaConf.is_interpolation(node, key) and isinstance(node.get(key), DictConfig):
                found += walk(node.get(key), full + ".")
        return found

    missing = sorted(k for k in walk(cfg, "") if not k.startswith("hydra."))
    if missing:
        given = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"{', '.join(missing)} has no value: give {given} on the command line")


def check_settings(cfg: Any) -> None:
    """Each key of :data:`SETTINGS` that ``cfg`` has against its rule."""
    for key, rule in SETTINGS.items():
        present, value = _value(cfg, key)
        if present and not rule.allows(value):
            raise ConfigError(rule.refusal(key, value))


def _check_models(cfg: Any) -> None:
    """The constructors' own checks of the criterion and post-processing nodes (built alone: cheap),
    ``topk`` against the pyramid's levels, and the schedule (``optim.scheduler``) by computing one factor."""
    from hydra.utils import instantiate

    model = cfg.get("model") if hasattr(cfg, "get") else None
    if model is not None:
        num_levels = model.get("neck", {}).get("num_levels") if hasattr(model.get("neck", {}), "get") else None
        for name in ("criterion", "postprocess"):
            node = model.get(name)
            if node is None or "_target_" not in node:
                continue
            try:
                obj = instantiate(node)
            except Exception as exc:  # noqa: BLE001 - instantiate wraps the constructor's ValueError
                cause = exc.__cause__ or exc
                raise ConfigError(" ".join(str(cause).split())) from None
            if name == "criterion" and num_levels is not None and hasattr(obj, "check_levels"):
                try:
                    obj.check_levels(int(num_levels))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
    scheduler = _value(cfg, "optim.scheduler")[1]
    if isinstance(scheduler, Mapping):
        from sapd.optim import lr_factor

        try:
            schedule = {k: v for k, v in scheduler.items() if not str(k).startswith("_")}  # not Hydra's keys
            lr_factor(0, steps_per_epoch=1, total_steps=1, **schedule)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"optim.scheduler: {' '.join(str(exc).split())}") from None


def _check_pairs(cfg: Any) -> None:
    """Rules that tie two keys together."""
    low, high = _value(cfg, "data.synthetic.min_side")[1], _value(cfg, "data.synthetic.max_side")[1]
    if low is not None and high is not None and low > high:
        raise ConfigError(f"data.synthetic.min_side={low} exceeds data.synthetic.max_side={high}")


def check_output_file(cfg: Any, key: str) -> None:
    """An output file (``results_file``) that could not be written: it is a folder, or its nearest
    existing folder is a file or not writable. Checked first, not after the whole evaluation."""
    import os
    from pathlib import Path

    value = _value(cfg, key)[1]
    if not value:
        return
    path = Path(str(value)).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}={value} is a folder: give a file name (or null: no file)")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{key}={value} cannot be written: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value} cannot be written: permission denied in {existing}; choose another {key}")


def check_accelerator(cfg: Any) -> None:
    """A GPU trainer (``trainer=gpu``, ``ddp``, the COCO experiments) where torch sees no GPU, or more
    GPUs asked for than torch sees: one line naming ``trainer=cpu`` before any data is read."""
    present, accelerator = _value(cfg, "trainer.accelerator")
    if not present or accelerator not in ("gpu", "cuda", "mps"):
        return
    import torch

    devices = _value(cfg, "trainer.devices")[1]
    if accelerator == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(
                "trainer.accelerator=mps but this machine has no usable MPS device; train on the CPU with trainer=cpu"
            )
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"trainer.accelerator={accelerator} needs a CUDA GPU and torch ({torch.__version__}, {build}) sees none "
            "here; train on the CPU with trainer=cpu (with an experiment: experiment=... trainer=cpu)"
        )
    wanted = len(devices) if isinstance(devices, list) else devices if is_int(devices) else None
    if isinstance(devices, str) and devices != "auto":
        wanted = len([p for p in devices.split(",") if p.strip()])
    if wanted is not None and wanted > count:
        raise ConfigError(
            f"trainer.devices={devices} asks for {wanted} GPUs and torch sees {count}: "
            f"give trainer.devices={count} (or -1: all of them)"
        )


def check_config(cfg: Any) -> None:
    """Every start-up check of a command's config, before any data or model is built: missing values,
    :data:`SETTINGS`, the model's constructors, the rules that tie keys together, the results file's
    folder and the accelerator.
    Raises :class:`~sapd.errors.ConfigError` (one line naming the key, the allowed values and the value)."""
    check_missing(cfg)
    check_settings(cfg)
    _check_models(cfg)
    _check_pairs(cfg)
    check_output_file(cfg, "results_file")
    check_accelerator(cfg)

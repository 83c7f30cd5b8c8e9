"""The allowed values of every setting of sapd's commands, in one table, checked before any work.

:data:`SETTINGS` maps each config key (dotted, as on the command line) to its :class:`Rule`: its
kind (integer, number, true/false, one of a list) and range, and what null means where null is
allowed. :func:`check_config` checks a composed config of any command (``train``, ``evaluate``,
``predict``, ``export``) against it, plus the rules that tie keys together (``topk`` against the
pyramid's levels, a GPU trainer against the GPUs torch sees, ...), and raises a
:class:`~sapd.errors.ConfigError` whose message is one line naming the key, the allowed values and the
value given. Keys a config does not have are skipped; keys of :data:`FREE` (paths, names, class
paths) are checked where they are used (a missing file is named when it is opened).

The model's constructors keep their own checks for library use (``SAPDCriterion``, ``PostProcess``,
``SAPD``); the table is what the commands check first, before any data set is read or model built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from sapd.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range: [0, 2**32 - 1]


@dataclass(frozen=True)
class Rule:
    """What a setting accepts: ``test(value)`` for a non-null value, described by ``text``; ``null``
    says what null means (None: null is refused)."""

    text: str
    test: Callable[[Any], bool]
    null: str | None = None

    def describe(self) -> str:
        return f"{self.text} (or null: {self.null})" if self.null else self.text

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.null is not None
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    def fmt(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {fmt(high)}"
    return ""


def _within(v: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (v <= low if low_open else v < low):
        return False
    return not (high is not None and (v >= high if high_open else v > high))


def integer(
    low: int | None = None, high: int | None = None, *, null: str | None = None, also: Mapping[Any, str] | None = None
) -> Rule:
    """An integer in [low, high]; ``also``: other values allowed, with their meaning (``{-1: "no limit"}``)."""
    also = dict(also or {})
    text = " ".join(p for p in ("an integer", _bounds(low, high, False, False)) if p)
    if also:
        text += "".join(f" or {v!r} ({why})" if isinstance(v, str) else f" or {v} ({why})" for v, why in also.items())
    return Rule(text, lambda v: (_is_int(v) and _within(v, low, high, False, False)) or v in also, null)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    null: str | None = None,
) -> Rule:
    """A finite number (an integer is one too) in the given range."""
    text = " ".join(p for p in ("a finite number", _bounds(low, high, low_open, high_open)) if p)
    return Rule(text, lambda v: _is_number(v) and _within(float(v), low, high, low_open, high_open), null)


def flag(null: str | None = None) -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), null)


def one_of(*choices: Any, null: str | None = None) -> Rule:
    text = "one of " + ", ".join(str(c) for c in choices)
    return Rule(text, lambda v: not isinstance(v, bool) and v in choices, null)


def text(null: str | None = None) -> Rule:
    return Rule("a non-empty text", lambda v: isinstance(v, str) and v.strip() != "", null)


def sizes(low: int = 1) -> Rule:
    """An integer >= low, or a list of them (a size drawn per image: scale jitter)."""

    def test(v: Any) -> bool:
        values = list(v) if isinstance(v, (list, tuple, ListConfig)) else [v]
        return bool(values) and all(_is_int(x) and x >= low for x in values)

    return Rule(f"an integer >= {low} or a non-empty list of them", test)


def milestones() -> Rule:
    def test(v: Any) -> bool:
        values = list(v) if isinstance(v, (list, tuple, ListConfig)) else None
        return values is not None and all(_is_int(x) and x >= 0 for x in values)

    return Rule("a list of epoch indices (integers >= 0)", test)


def _batches(zero: bool) -> Rule:
    """Lightning's ``limit_*_batches``: a count of batches, or a fraction of the epoch."""
    low = 0 if zero else 1

    def test(v: Any) -> bool:
        if _is_int(v):
            return v >= low
        return isinstance(v, float) and math.isfinite(v) and (v >= 0.0 if zero else v > 0.0) and v <= 1.0

    frac = "[0, 1]" if zero else "(0, 1]"
    return Rule(f"an integer >= {low} (batches) or a fraction in {frac} of the epoch", test, "all")


def _devices() -> Rule:
    def test(v: Any) -> bool:
        if _is_int(v):
            return v >= 1 or v == -1
        if isinstance(v, str):
            return v == "auto" or all(p.strip().isdigit() for p in v.split(",") if p.strip()) and v.strip() != ""
        if isinstance(v, (list, tuple, ListConfig)):
            return bool(v) and all(_is_int(x) and x >= 0 for x in v)
        return False

    return Rule("an integer >= 1, -1 (all), 'auto' or a list of device indices", test)


def _device() -> Rule:
    def test(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        name, _, index = v.partition(":")
        return name in ("auto", "cpu", "cuda", "mps") and (not index or (name == "cuda" and index.isdigit()))

    return Rule("auto, cpu, cuda, cuda:N or mps", test)


PRECISIONS = (
    "auto",  # sapd: 16-mixed on CUDA, bf16-mixed on a CPU with native bf16, else 32-true
    "32-true",
    "32",
    32,
    "16-mixed",
    "16",
    16,
    "bf16-mixed",
    "bf16",
    "16-true",
    "bf16-true",
    "64-true",
    "64",
    64,
)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")

PROB = number(0, 1)
POSITIVE = number(0, low_open=True)
THREADS = integer(1, null="torch's default")
SEED = integer(0, SEED_MAX)

#: Every setting with a range: key -> rule. A key of one command only (``opset``) or of several
#: (``num_threads``, ``score_thresh``) is listed once; a config that lacks a key skips its rule.
SETTINGS: dict[str, Rule] = {
    # --- the run (conf/train.yaml)
    "seed": integer(0, SEED_MAX, null="no seeding"),
    "num_threads": THREADS,
    "channels_last": flag(),
    "train": flag(),
    "validate_best": flag(),
    "report.enabled": flag(),
    "report.score_thresh": PROB,
    "report.num_images": integer(0),
    "report.class_table": flag(),
    "learning_check.max_skipped_fraction": number(0, 1),
    "ablation.soft_weight": flag(),
    "ablation.soft_select": flag(),
    # --- data (conf/data/*.yaml)
    "data.batch_size": integer(1),
    "data.val_batch_size": integer(1, null="data.batch_size"),
    "data.num_workers": integer(0),
    "data.persistent_workers": flag(),
    "data.pin_memory": flag(null="on when CUDA is available"),
    "data.min_size": sizes(1),
    "data.max_size": integer(1),
    "data.val_min_size": integer(1, null="the largest data.min_size"),
    "data.val_max_size": integer(1, null="data.max_size"),
    "data.flip_prob": PROB,
    "data.size_divisor": integer(1),
    "data.aspect_ratio_groups": integer(0),
    "data.drop_empty": flag(),
    "data.skip_bad_images": flag(),
    "data.allow_outside_root": flag(),
    "data.limit_val_images": integer(1, null="every validation image"),
    "data.seed": integer(0, SEED_MAX, null="the run's seed"),
    "data.test_split": one_of("test-dev", "val", "test"),
    "data.synthetic.num_train": integer(1),
    "data.synthetic.num_val": integer(1),
    "data.synthetic.seed": SEED,
    "data.synthetic.min_side": integer(32),
    "data.synthetic.max_side": integer(32),
    "data.synthetic.max_objects": integer(1),
    "data.synthetic.min_object_size": integer(1),
    "data.synthetic.empty_frac": PROB,
    "data.synthetic.crowd_frac": PROB,
    # --- the model (conf/model/*.yaml)
    "model.z": POSITIVE,
    "model.backbone.pretrained": flag(),
    "model.backbone.frozen_stages": integer(-1, 4),
    "model.backbone.norm_eval": flag(),
    "model.backbone.dcn": flag(),
    "model.neck.out_channels": integer(1),
    "model.neck.num_levels": integer(3),
    "model.neck.bfp": flag(),
    "model.head.feat_channels": integer(1),
    "model.head.num_convs": integer(0),
    "model.head.norm": one_of("gn", null="no normalisation"),
    # null: no selection network (Table 2's FSAF, +SW and +BFP rows); a node's keys are checked below
    "model.selection": Rule("a selection-network node", lambda v: isinstance(v, Mapping), "no selection network"),
    "model.selection.roi_size": integer(1),
    "model.selection.channels": integer(1),
    "model.selection.detach_features": flag(),
    "model.num_convs": integer(1),  # FCOS head
    "model.center_sampling_radius": number(0),  # FCOS
    "model.criterion.eta": number(0),
    "model.criterion.topk": integer(1),
    "model.criterion.epsilon": number(0, 1, low_open=True),
    "model.criterion.soft_weight": flag(),
    "model.criterion.soft_select": flag(),
    "model.criterion.unselected": one_of("negative", "ignore"),
    "model.criterion.valid_region": one_of("cell_overlap", "centre"),
    "model.criterion.soft_weight_norm": one_of("none", "level_max"),
    "model.criterion.normaliser": one_of("weight_sum", "num_pos"),
    "model.criterion.ignore_epsilon": number(0, 1, low_open=True, null="no ignore region"),
    "model.criterion.lambda_select": number(0),
    "model.criterion.loc_loss": one_of("iou", "giou"),
    "model.criterion.focal_alpha": PROB,
    "model.criterion.focal_gamma": number(0),
    "model.postprocess.score_thresh": number(0, 1, high_open=True),
    "model.postprocess.pre_nms_topk": integer(1),
    "model.postprocess.nms_thresh": number(0, 1, low_open=True),
    "model.postprocess.max_detections": integer(1),
    # --- optimisation (conf/optim/*.yaml)
    "optim.optimizer.lr": POSITIVE,
    "optim.optimizer.weight_decay": number(0),
    "optim.optimizer.momentum": number(0, 1, high_open=True),
    "optim.optimizer.fused": flag(null="torch's default"),
    "optim.base_batch_size": integer(1),
    "optim.no_decay_norm_bias": flag(),
    "optim.scheduler.warmup_iters": integer(0),
    "optim.scheduler.warmup_ratio": number(0, 1, low_open=True),
    "optim.scheduler.gamma": number(0, 1, low_open=True),
    "optim.scheduler.milestones": milestones(),
    "optim.scheduler.min_ratio": PROB,
    # --- the trainer (conf/trainer/*.yaml)
    "trainer.accelerator": one_of(*ACCELERATORS),
    "trainer.devices": _devices(),
    "trainer.num_nodes": integer(1),
    "trainer.max_epochs": integer(1, also={-1: "no limit"}),
    "trainer.precision": one_of(*PRECISIONS),
    "trainer.gradient_clip_val": number(0, null="no clipping"),
    "trainer.gradient_clip_algorithm": one_of("norm", "value"),
    "trainer.log_every_n_steps": integer(1),
    "trainer.check_val_every_n_epoch": integer(1, null="validation by steps"),
    "trainer.num_sanity_val_steps": integer(0, also={-1: "all"}),
    "trainer.limit_train_batches": _batches(zero=False),
    "trainer.limit_val_batches": _batches(zero=True),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.fast_dev_run": Rule(
        "true, false or an integer >= 0 (batches)", lambda v: isinstance(v, bool) or (_is_int(v) and v >= 0)
    ),
    "trainer.overfit_batches": Rule(
        "an integer >= 0 (batches) or a fraction in [0, 1]",
        lambda v: (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0),
    ),
    "trainer.deterministic": Rule("true, false or 'warn'", lambda v: isinstance(v, bool) or v == "warn"),
    "trainer.benchmark": flag(null="Lightning's default"),
    "trainer.sync_batchnorm": flag(),
    "trainer.use_distributed_sampler": flag(),
    "trainer.detect_anomaly": flag(),
    "callbacks.phase_switch.switch_epoch": integer(0, null="half of trainer.max_epochs"),
    "callbacks.step_checkpoint.every_n_train_steps": integer(1, null="by time"),
    "callbacks.last_checkpoint.every_n_epochs": integer(1),
    "callbacks.detection_images.num_images": integer(0),
    # --- evaluate, predict, export (conf/eval.yaml, predict.yaml, export.yaml)
    "split": one_of("val", "test"),
    "score_thresh": number(0, 1, high_open=True, null="the model's own, model.postprocess.score_thresh"),
    "batch_size": integer(1, null="the checkpoint's data.val_batch_size"),
    "device": _device(),
    "format": Rule("onnx or torchscript", lambda v: isinstance(v, str) and v.lower() in ("onnx", "torchscript")),
    "opset": integer(18, 23, null="the exporter's default"),  # sapd.export.ONNX_OPSETS
    "verify": flag(),
    # --- the tools (conf/analysis.yaml, report.yaml, synthetic.yaml)
    "batches": integer(1),
    "decide": flag(),
    "compare": Rule(
        "a list of two results files or evaluation folders, compare='[A,B]'",
        lambda v: isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(isinstance(p, str) and p for p in v),
        "no comparison",
    ),
    "same_commit": flag(),
    "workers": integer(1, null="up to 2"),
}

#: Keys whose values are names, paths or objects: checked where they are used, not here.
FREE = (
    "task_name",
    "tags",
    "group",
    "ckpt_path",
    "optimized_metric",
    "input",
    "output",
    "results_file",
    "out",
    "dirs",
    "annotations",
    "reference",
    "logger",
    "data.name",
    "data.root",
    "data.cache_dir",
    "data.train_ann",
    "data.train_images",
    "data.val_ann",
    "data.val_images",
    "data.test_ann",
    "data.test_images",
    "model.backbone.name",
    "model.backbone.checkpoint_path",
    "optim.scheduler.name",  # sapd.optim.lr_factor names the schedules (checked by calling it)
    "trainer.strategy",
    "trainer.default_root_dir",
    "trainer.profiler",
)
FREE_TREES = ("hydra.", "paths.", "logger.", "callbacks.", "debug.")


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
            raise ConfigError(f"{key} must be {rule.describe()}; got {value!r}")


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
    wanted = len(devices) if isinstance(devices, list) else devices if _is_int(devices) else None
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

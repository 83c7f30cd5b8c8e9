"""The check that a training run learns: a run that cannot have learned stops with one line, exit status 2."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from sapd.errors import ConfigError, UserError


class NothingLearnedError(UserError):
    """A training run that cannot have learned (its weights diverged, it skipped its steps, read no
    image, or no instance owned an anchor point), or whose validation scored nothing."""


def nothing_scored(split: str, datamodule: Any) -> str:
    """The reason a ``split`` evaluation gave no COCO table: its images were left out (and why), or none
    had ground truth or a detection."""
    reasons = Counter(((getattr(datamodule, "skipped_images", None) or {}).get(split) or {}).values())
    if reasons:
        why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        return (
            f"no {split} image could be scored: every one evaluated was left out ({why}; "
            f"data.skip_bad_images=true); check data.{split}_images and data.root"
        )
    return f"no {split} image could be scored: the images evaluated have neither ground truth nor a detection"


class LearningCheck(L.Callback):
    """Stops a run that learns nothing with a :class:`NothingLearnedError` (one line, exit status 2).

    Checked before every validation of a fit (so no checkpoint of such a run is scored and kept as
    the best) and at the end of every training epoch (before ``last.ckpt`` is written), over the
    steps of the fit so far. In order, the run stops when:

    - no training image was read (every image skipped, ``data.skip_bad_images``);
    - a parameter or buffer of the model is NaN or infinite (training diverged);
    - instances were trained on but none of them owned an anchor point (boxes too small for the
      pyramid's strides): the message names the largest box and the strides;
    - more than ``max_skipped_fraction`` of the training steps were skipped (a non-finite loss, or a
      batch whose images were all left out).

    The counts come from what the steps compute anyway (batch sizes on the host; the module's
    ``skipped_steps`` and ``instance_counts``; the largest box side kept as a tensor), so a check
    costs one device-to-host copy per validation or epoch and none per step. Under DDP the counts
    of every process are summed first: every process takes the same decision.

    Args:
        max_skipped_fraction: the fraction of skipped training steps (0..1) above which the run stops
            (``learning_check.max_skipped_fraction`` in conf/train.yaml).
    """

    def __init__(self, max_skipped_fraction: float = 0.1) -> None:
        value = max_skipped_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"learning_check.max_skipped_fraction must be a number in [0, 1]; got {value!r}")
        self.max_skipped_fraction = float(value)
        self._reset()

    def _reset(self) -> None:
        self.steps = 0  # training batches of this fit, in this process
        self.images = 0  # images in them
        self.largest_box: torch.Tensor | None = None  # longest box side seen (network input pixels)
        self._start: dict[str, int] = {}  # the module's counts when the fit started

    @staticmethod
    def _module_counts(pl_module: L.LightningModule) -> dict[str, Any]:
        counts = dict(getattr(pl_module, "instance_counts", None) or {})
        return {
            "skipped": getattr(pl_module, "skipped_steps", 0),
            "instances": counts.get("instances", 0),
            "unassigned": counts.get("without_anchor_point", 0),
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._start = {k: int(v) for k, v in self._module_counts(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images, targets = batch
        self.steps += 1
        self.images += int(images.shape[0])
        boxes = [t["boxes"] for t in targets if "boxes" in t and len(t["boxes"])]
        if boxes:
            b = torch.cat(boxes).detach()
            side = (b[:, 2:] - b[:, :2]).amax().float()
            self.largest_box = side if self.largest_box is None else torch.maximum(self.largest_box, side)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A validation of the fit that scored nothing (every image left out) stops the run: no best
        checkpoint can be chosen. Before the checkpoint callbacks look for ``val/map``."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        evaluator = getattr(pl_module, "evaluator", None)
        if evaluator is not None and not (evaluator.result and evaluator.result.table):
            raise NothingLearnedError(nothing_scored("val", trainer.datamodule))

    def _first_nonfinite(self, pl_module: L.LightningModule) -> str | None:
        """The name of the first parameter or floating buffer of ``pl_module`` that is NaN or inf, else None."""
        named = [*pl_module.named_parameters(), *pl_module.named_buffers()]
        tensors = [(n, t) for n, t in named if t.is_floating_point()]
        if not tensors:
            return None
        finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors])
        if bool(finite.all()):
            return None
        return tensors[int((~finite).nonzero()[0])][0]

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raises :class:`NothingLearnedError` when the fit so far learned nothing (see the class)."""
        if self.steps == 0 and trainer.world_size == 1:
            return
        current = self._module_counts(pl_module)
        bad_name = self._first_nonfinite(pl_module)
        device = pl_module.device

        def delta(key: str) -> torch.Tensor:  # int or tensor counts of the module, since the fit started
            return torch.as_tensor(current[key], device=device).to(torch.int64).reshape(()) - self._start.get(key, 0)

        plain = torch.tensor([self.steps, self.images, int(bad_name is not None)], dtype=torch.int64, device=device)
        module = torch.stack([delta("skipped"), delta("instances"), delta("unassigned")])
        counts = torch.cat([plain[:2], module, plain[2:]])
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        steps, images, skipped, instances, unassigned, diverged = (int(v) for v in counts.tolist())
        if steps == 0:
            return
        if images == 0:
            raise NothingLearnedError(
                f"no training image was read in {steps} step(s): every image of the training set was left out "
                f"({self._skip_reasons(trainer)}); check data.root and the training images"
            )
        if diverged:
            where = f"parameter {bad_name}" if bad_name else "a parameter (on another process)"
            raise NothingLearnedError(
                f"training diverged: {where} is NaN or infinite after {steps} step(s); lower "
                "optim.optimizer.lr or raise optim.scheduler.warmup_iters, and check the data for broken boxes"
            )
        if instances > 0 and unassigned >= instances:
            raise NothingLearnedError(self._no_anchor_point_message(trainer, pl_module, instances))
        if skipped > self.max_skipped_fraction * steps:
            raise NothingLearnedError(
                f"{skipped} of {steps} training steps were skipped (a non-finite loss or a batch without images, "
                f"see the warnings above), more than learning_check.max_skipped_fraction="
                f"{self.max_skipped_fraction:g}: the model learned from too little; lower optim.optimizer.lr, "
                "check the model.criterion settings and the data"
            )

    @staticmethod
    def _skip_reasons(trainer: L.Trainer) -> str:
        skipped = (getattr(trainer.datamodule, "skipped_images", None) or {}).get("train") or {}
        reasons = Counter(skipped.values())
        if not reasons:
            return "data.skip_bad_images=true"
        listed = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        return f"{listed}; data.skip_bad_images=true"

    def _no_anchor_point_message(self, trainer: L.Trainer, pl_module: L.LightningModule, instances: int) -> str:
        largest = self.largest_box if self.largest_box is not None else torch.zeros((), device=pl_module.device)
        largest = largest.to(pl_module.device, torch.float32)
        if trainer.world_size > 1:
            largest = trainer.strategy.reduce(largest, reduce_op="max")
        strides = list(getattr(getattr(pl_module, "net", None), "strides", None) or [])
        pyramid = f"{strides[0]}-{strides[-1]} px" if strides else "the pyramid's strides"
        return (
            f"none of the {instances} training instances owned an anchor point, so nothing trained on them: "
            f"the largest box is {float(largest):.1f} px on its longer side as the network sees it, and anchor "
            f"points lie every {pyramid} (strides of the pyramid levels); enlarge the images "
            "(data.min_size, data.max_size) or use larger objects"
        )

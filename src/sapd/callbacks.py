"""Lightning callbacks of sapd: the two-phase switch (§3.4), the check that a run learns, what goes to
the dashboard, and Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from sapd.errors import ConfigError, UserError

log = logging.getLogger(__name__)

LEVEL_NAMES = ("P3", "P4", "P5", "P6", "P7")


class PhaseSwitch(L.Callback):
    """Switches the detector from phase 1 (FSAF online selection) to phase 2 (soft top-k), §3.4.

    The paper trains the first half of the schedule with one level per instance (weight 1), then
    plugs in the feature-selection network's probabilities over the top-k levels. The phase is a
    function of the epoch and the switch epoch, and the switch epoch is stored in every checkpoint
    (the callback's state), so a run resumed from any checkpoint continues in the right phase, even
    with a longer ``trainer.max_epochs``: the stored switch epoch is kept unless ``switch_epoch`` is
    given explicitly, and then a different value is warned about.

    Args:
        switch_epoch: first epoch (0-based) of phase 2; ``None`` means half of ``max_epochs``
            (6 of 12, 12 of 24) for a new run, the stored one for a resumed run. ``0`` trains in
            phase 2 throughout; a value >= ``max_epochs`` never switches (FSAF selection only).
    """

    def __init__(self, switch_epoch: int | None = None) -> None:
        self.switch_epoch = switch_epoch
        self.stored_switch_epoch: int | None = None  # from the checkpoint of a resumed run
        self._resolved: int | None = None  # the switch epoch in use (saved with every checkpoint)
        self._warned = False

    @property
    def switch_epoch_in_use(self) -> int | None:
        """The first epoch of phase 2 this run uses (None before training started)."""
        return self._resolved

    def state_dict(self) -> dict[str, Any]:
        return {"switch_epoch": self._resolved} if self._resolved is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("switch_epoch")
        self.stored_switch_epoch = None if stored is None else int(stored)

    def resolved_switch_epoch(self, trainer: L.Trainer) -> int:
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 2
        stored = self.stored_switch_epoch
        if self.switch_epoch is not None:
            epoch = int(self.switch_epoch)
            if stored is not None and stored != epoch and not self._warned:
                log.warning(
                    "phase switch epoch changed on resume: %d (callbacks.phase_switch.switch_epoch) instead of "
                    "the %d stored with the run",
                    epoch,
                    stored,
                )
                self._warned = True
        elif stored is not None:
            epoch = stored
            if stored != max_epochs // 2 and not self._warned:
                log.info(
                    "resumed run: phase 2 still starts at epoch %d as stored with the run (half of "
                    "trainer.max_epochs=%d would be %d; set callbacks.phase_switch.switch_epoch to change it)",
                    stored,
                    max_epochs,
                    max_epochs // 2,
                )
                self._warned = True
        else:
            epoch = max_epochs // 2
        self._resolved = epoch
        return epoch

    def phase_for_epoch(self, trainer: L.Trainer, epoch: int) -> int:
        return 2 if epoch >= self.resolved_switch_epoch(trainer) else 1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net
        if not hasattr(net, "set_phase"):  # a detector without phases (model=fcos)
            return
        phase = self.phase_for_epoch(trainer, trainer.current_epoch)
        if net.current_phase != phase:
            what = "soft-selected pyramid levels, top-k" if phase == 2 else "FSAF single level"
            log.info("epoch %d: switching to phase %d (%s)", trainer.current_epoch, phase, what)
        net.set_phase(phase)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if hasattr(pl_module.net, "current_phase") and batch_idx % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("train/phase", float(pl_module.net.current_phase), on_step=True, on_epoch=False)


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


class SelectionHistogram(L.Callback):
    """Logs, every training epoch, a histogram per pyramid level of the selection weights w_l^B.

    It collects the ``selection_probs`` [M, L] that ``SAPDLitModule.training_step`` returns with the loss.
    """

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []  # this epoch's batches
        self.last_epoch: torch.Tensor | None = None  # [sum M, L] of the latest finished epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        probs = outputs.get("selection_probs") if isinstance(outputs, dict) else None
        if isinstance(probs, torch.Tensor) and probs.numel():
            self.probs.append(probs.detach().float().cpu())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.probs:
            return
        probs = self.last_epoch = torch.cat(self.probs)  # [sum M, L]
        self.probs = []
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                data = {
                    f"train/selection_weight_{LEVEL_NAMES[i] if i < len(LEVEL_NAMES) else i}": wandb.Histogram(
                        probs[:, i].numpy()
                    )
                    for i in range(probs.shape[1])
                }
                logger.experiment.log({**data, "trainer/global_step": trainer.global_step})


def _same_size(pictures: list) -> list:
    """PIL images padded (bottom / right, grey) to the largest width and height among them."""
    from PIL import Image

    if not pictures:
        return pictures
    w, h = max(p.width for p in pictures), max(p.height for p in pictures)
    out = []
    for pic in pictures:
        canvas = Image.new("RGB", (w, h), (127, 127, 127))
        canvas.paste(pic.convert("RGB"), (0, 0))
        out.append(canvas)
    return out


class DetectionImages(L.Callback):
    """Logs a few validation images with predicted (score >= ``min_score``) and true boxes to wandb."""

    def __init__(self, num_images: int = 4, min_score: float = 0.3) -> None:
        self.num_images = num_images
        self.min_score = min_score

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or outputs is None:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        from sapd.diagnostics.detections import draw_detections, unnormalize

        images, targets = batch
        pictures = []
        for image, target, det in list(zip(images, targets, outputs))[: self.num_images]:
            pil = unnormalize(image, target)
            keep = det["scores"] >= self.min_score
            pred = {k: v[keep] for k, v in det.items()}
            gt = {"boxes": target["eval_boxes"], "labels": target["eval_labels"]}
            pictures.append(draw_detections(pil, pred, pl_module.class_names, ground_truth=gt))
        pictures = _same_size(pictures)  # a wandb image list must share one size to display right
        for logger in loggers:
            logger.log_image("val/detections", pictures, step=trainer.global_step)


class InterruptCheckpoint(L.Callback):
    """Ctrl-C (SIGINT) during ``fit`` saves ``last.ckpt``, then the run stops; a second Ctrl-C stops at once.

    The first SIGINT only sets a flag; at the end of the current training batch (or, in one process,
    validation batch) the callback raises ``KeyboardInterrupt``. Lightning then calls
    :meth:`on_exception`, which saves ``last.ckpt`` at that batch boundary (the point where the step
    checkpoints are saved, so the run resumes from it exactly) through the trainer's checkpoint IO
    (whole or not at all). Under DDP the flag is or-reduced across the ranks every
    :attr:`DDP_CHECK_EVERY` training batches (a terminal's Ctrl-C reaches every rank, not at the same
    instant), so all ranks stop at the same step. While the flag is set, or while saving, another
    SIGINT ends the process at once with status 130 (the file being saved is then left as it was).
    ``sapd.train`` reads :attr:`saved` and exits with status 130 after one line naming the checkpoint.

    Args:
        fallback: where ``last.ckpt`` goes when no ``ModelCheckpoint`` writes one (``filename: last``).
    """

    EXIT_STATUS = 130  # 128 + SIGINT, the shell's status for a process ended by Ctrl-C
    DDP_CHECK_EVERY = 10  # training batches between two agreements of the ranks on a pending Ctrl-C

    def __init__(self, fallback: str | Path, app: str = "sapd.train") -> None:
        self.fallback = Path(fallback)
        self.app = app
        self.requested = False
        self.saved: Path | None = None  # the checkpoint written after an interrupt
        self.step: int | None = None  # the global step it holds
        self.error: str | None = None  # why the save failed, when it did
        self._previous: Any = None

    # -- the signal
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            os.write(2, f"{self.app}: interrupted again: stopped at once, without saving\n".encode())
            os._exit(self.EXIT_STATUS)
        self.requested = True

    def install(self) -> None:
        """Takes over SIGINT (main thread only: elsewhere Python cannot set handlers)."""
        if threading.current_thread() is threading.main_thread() and self._previous is None:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def restore(self) -> None:
        """Gives SIGINT back to the handler it had before :meth:`install`."""
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    # -- stopping at a batch boundary
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.world_size == 1:
            if self.requested:
                raise KeyboardInterrupt
            return
        # Under DDP the ranks agree through one small all-reduce, taken every DDP_CHECK_EVERY batches (the
        # same batches on every rank) so that it does not add a collective and a host wait to every step.
        if batch_idx % self.DDP_CHECK_EVERY:
            return
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            raise KeyboardInterrupt

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # ranks may hold different numbers of validation batches: no collective here, and a
        # distributed run waits for the next training batch
        if self.requested and trainer.world_size == 1 and trainer.state.fn == "fit":
            raise KeyboardInterrupt

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        self.requested = True  # a KeyboardInterrupt raised elsewhere: a second Ctrl-C now stops at once
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)  # Lightning ignores SIGINT while it shuts down
        path = self.last_path(trainer)
        try:
            trainer.save_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - reported in the run's one line, the run stops anyway
            self.error = " ".join(f"{type(exc).__name__}: {exc}".split())
            return
        self.saved, self.step = path, int(trainer.global_step)

    def last_path(self, trainer: L.Trainer) -> Path:
        """The ``last.ckpt`` of the run's ``ModelCheckpoint`` with ``filename: last``, else ``fallback``."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.filename == "last" and cb.dirpath:
                return Path(cb.dirpath) / f"last{cb.FILE_EXTENSION}"
        return self.fallback

    def message(self) -> str:
        """The one line printed when the run stops after an interrupt."""
        if self.saved is not None:
            return f"interrupted at step {self.step}; saved {self.saved}; resume with ckpt_path={self.saved}"
        return f"interrupted; last.ckpt could not be saved ({self.error}); the checkpoints saved before stay"

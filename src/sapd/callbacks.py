"""Lightning callbacks of sapd: the two-phase switch (§3.4), what goes to the dashboard, and Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

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
        from sapd.visualize import draw_detections, unnormalize

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

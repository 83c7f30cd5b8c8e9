"""Ctrl-C during training: ``last.ckpt`` saved at the next batch boundary, then the run stops (status 130)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L


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

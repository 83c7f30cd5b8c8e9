"""The two-phase schedule of SAPD (§3.4): phase 1 (FSAF online selection), then phase 2 (soft top-k)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


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

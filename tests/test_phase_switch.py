"""PhaseSwitch's own logic, called as Lightning calls it, on stand-ins for the trainer, module and detector
(test_train runs it on a real detector, test_refusals on a resumed run, test_resume in a killed and resumed fit)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from sapd.callbacks import PhaseSwitch


class PhasedNet:
    """The two members of a detector PhaseSwitch uses: ``current_phase`` and ``set_phase``."""

    def __init__(self) -> None:
        self.current_phase = 1
        self.calls: list[int] = []

    def set_phase(self, phase: int) -> None:
        self.calls.append(phase)
        self.current_phase = phase


@pytest.mark.parametrize("max_epochs, expected", [(None, 1), (-1, 1), (0, 1), (1, 0), (2, 1), (7, 3), (24, 12)])
def test_the_switch_epoch_is_half_the_schedule_or_half_of_two_without_one(max_epochs, expected):
    callback = PhaseSwitch()
    assert callback.switch_epoch_in_use is None and callback.state_dict() == {}
    assert callback.resolved_switch_epoch(SimpleNamespace(max_epochs=max_epochs)) == expected
    assert callback.switch_epoch_in_use == expected and callback.state_dict() == {"switch_epoch": expected}


def test_an_explicit_switch_epoch_wins_over_the_schedule_and_a_checkpoint_without_one():
    callback = PhaseSwitch(switch_epoch=5)
    callback.load_state_dict({})  # a checkpoint written before the first epoch started
    assert callback.stored_switch_epoch is None
    assert callback.resolved_switch_epoch(SimpleNamespace(max_epochs=4)) == 5  # never switches in 4 epochs
    assert [callback.phase_for_epoch(SimpleNamespace(max_epochs=4), e) for e in range(4)] == [1, 1, 1, 1]


def test_the_switch_is_logged_once_and_the_phase_set_every_epoch(caplog):
    net, callback = PhasedNet(), PhaseSwitch(switch_epoch=2)
    with caplog.at_level(logging.INFO, logger="sapd.callbacks"):
        for epoch in range(4):
            callback.on_train_epoch_start(SimpleNamespace(max_epochs=4, current_epoch=epoch), SimpleNamespace(net=net))
    assert net.calls == [1, 1, 2, 2]
    switches = [r.getMessage() for r in caplog.records if "switching" in r.getMessage()]
    assert switches == ["epoch 2: switching to phase 2 (soft-selected pyramid levels, top-k)"]


def test_a_detector_without_phases_is_left_alone():
    callback = PhaseSwitch(switch_epoch=0)
    module = SimpleNamespace(net=SimpleNamespace())  # model=fcos: no set_phase, no current_phase
    callback.on_train_epoch_start(SimpleNamespace(max_epochs=2, current_epoch=1), module)
    callback.on_train_batch_end(SimpleNamespace(log_every_n_steps=1), module, None, None, 0)
    assert vars(module.net) == {}


def test_the_phase_is_logged_every_log_every_n_steps_batches():
    logged: list[tuple[str, float, int]] = []
    module = SimpleNamespace(
        net=SimpleNamespace(current_phase=2),
        log=lambda name, value, **kwargs: logged.append((name, value, kwargs["on_step"])),
    )
    callback = PhaseSwitch()
    for batch_idx in range(7):
        callback.on_train_batch_end(SimpleNamespace(log_every_n_steps=3), module, None, None, batch_idx)
    assert logged == [("train/phase", 2.0, True)] * 3  # batches 0, 3 and 6
    logged.clear()
    callback.on_train_batch_end(SimpleNamespace(log_every_n_steps=0), module, None, None, 5)  # 0: every batch
    assert logged == [("train/phase", 2.0, True)]

"""Lightning callbacks of sapd: the two-phase switch (§3.4), the check that a run learns, what goes to
the dashboard, and Ctrl-C."""

from sapd.callbacks.dashboard import DetectionImages, SelectionHistogram
from sapd.callbacks.interrupt import InterruptCheckpoint
from sapd.callbacks.learning_check import LearningCheck, NothingLearnedError, nothing_scored
from sapd.callbacks.phase_switch import PhaseSwitch

__all__ = [
    "DetectionImages",
    "InterruptCheckpoint",
    "LearningCheck",
    "NothingLearnedError",
    "PhaseSwitch",
    "SelectionHistogram",
    "nothing_scored",
]

"""sapd's one output path for messages: Python ``logging``, rank-zero aware, third-party chatter quieted.

Every module logs to ``logging.getLogger(__name__)`` (a child of ``sapd``); the entry points call
:func:`configure_logging` once inside their Hydra task, after Hydra has set up the console and the
run folder's log file. Only a command's product goes to stdout with ``print`` (the report's table).
"""

from __future__ import annotations

import logging
import warnings

# Lightning's and the COCO evaluator's informational lines that tell a sapd user nothing they can act
# on (accelerator inventory, upsell tips, evaluator summaries printed at INFO on every evaluation).
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.seed",
    "lightning.fabric.utilities.distributed",
    "faster_coco_eval",
)
# Warnings raised inside libraries about their own internals or about choices sapd makes on purpose.
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # lightning <-> torch pytree internals
    r"Precision bf16-mixed is not supported by the model summary.*",
    r".*does not have many workers.*",  # the synthetic set is decoded in the main process on purpose
    r"The number of training batches \(\d+\) is smaller than the logging interval.*",
    r".*`training_step` returned `None`.*",  # a non-finite step is skipped and logged by sapd itself
    # the data modules keep the training data's position in checkpoints themselves (COCODataModule.state_dict)
    r"You're resuming from a checkpoint that ended before the epoch ended.*",
)


class RankZeroFilter(logging.Filter):
    """Passes every warning and error, and the other records only on the process of global rank 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        from lightning.pytorch.utilities import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0


def configure_logging(level: int = logging.INFO) -> None:
    """sapd's messages at ``level`` on rank 0 only; quiets :data:`QUIET_LOGGERS` and :data:`QUIET_WARNINGS`.

    Idempotent. Without handlers on the root logger (outside Hydra, e.g. in a notebook), adds one
    console handler so that sapd's messages are seen.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="[%(name)s][%(levelname)s] %(message)s")
    for handler in root.handlers:
        if not any(isinstance(f, RankZeroFilter) for f in handler.filters):
            handler.addFilter(RankZeroFilter())
    logging.getLogger("sapd").setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

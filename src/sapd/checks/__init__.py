"""The start-up checks of a command's config, before any data set is read or model built.

:mod:`~sapd.checks.settings` holds :data:`SETTINGS`, the one table of every setting's kind and range
(the criterion's read from its own fields); :mod:`~sapd.checks.kinds` the kinds of value of the
application's settings (sizes, devices, ...); :mod:`~sapd.checks.config` the checks that walk a
composed config (:func:`check_config`).
"""

from sapd.checks.config import check_accelerator, check_config, check_missing, check_output_file, check_settings
from sapd.checks.settings import FREE, FREE_TREES, SETTINGS

__all__ = [
    "FREE",
    "FREE_TREES",
    "SETTINGS",
    "check_accelerator",
    "check_config",
    "check_missing",
    "check_output_file",
    "check_settings",
]

"""User errors and how the command-line apps refuse them: one line, no traceback.

A *user error* is one the person running sapd can fix (a path, a config value, a checkpoint, the
data): every such error is a :class:`UserError` (``DataError``, ``CheckpointError``, ``ExportError``,
``ConfigError``, ...), whose message is one line naming the file, key or value and what to do.

:func:`refusals` wraps each Hydra task function: a user error is logged as the one line
``sapd.<app>: <message>`` (stderr, and the run's log file) and the process exits with status 2, with
no traceback; in a ``-m`` sweep the job is recorded as refused and the sweep goes on.
``HYDRA_FULL_ERROR=1`` (Hydra's own switch for full tracebacks) re-raises it instead, traceback and
all. Anything else (a bug) keeps its traceback. :mod:`sapd.app` does the same for Hydra's own
refusals (an unknown key or group option, ...).

:func:`sapd.checks.check_config` is the start-up check of a command's config: it runs before any
data or model is built, so a wrong value costs a second, not a data-set scan.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_USER_ERROR = 2
F = TypeVar("F", bound=Callable[..., Any])


class UserError(ValueError):
    """An error the user can fix; its message is one line naming the thing and the fix."""


class ConfigError(UserError):
    """A configuration value out of range, of the wrong kind, or naming something that is not there."""


def full_errors() -> bool:
    """True when ``HYDRA_FULL_ERROR=1``: refusals keep their traceback."""
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def _user_error(exc: BaseException, also: tuple[type[BaseException], ...] = ()) -> BaseException | None:
    """The user error behind ``exc`` (itself, or the cause Hydra's ``instantiate`` wrapped), or None."""
    kinds = (UserError, *also)
    for _ in range(10):
        if exc is None:
            return None
        if isinstance(exc, kinds):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line.

    An error raised in a DataLoader worker comes back as ``Caught DataError in DataLoader worker
    process 0. Original Traceback ...``: its last line holds the original message.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        name, sep, rest = last.partition(": ")
        text = rest if sep and name.replace(".", "").replace("_", "").isalnum() else last
    return " ".join(text.split())


def refuse(app: str, message: str) -> None:
    """Logs ``<app>: <message>`` as the one error line of a refused command (stderr if logging is not set up)."""
    if logging.getLogger().hasHandlers():
        logging.getLogger(app).error("%s: %s", app, message)
    else:
        print(f"{app}: {message}", file=sys.stderr, flush=True)


TASK_ERROR = "_sapd_task_error"  # set on an exception that left a command's task function as a bug
REFUSED_FILE = "refused.jsonl"  # in a sweep's folder: one line per refused job


def _omegaconf_user_error(exc: BaseException) -> str | None:
    """The one line of a config value left ``???`` or an interpolation that cannot be resolved, met
    while a command runs; None for other errors."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "a key"
        return f"{key} has no value: give {key}=... on the command line"
    if isinstance(exc, InterpolationResolutionError):
        key = getattr(exc, "full_key", None)
        text = " ".join(str(exc).split("\n    full_key")[0].split())
        return f"{key}: {text}" if key else text
    return None


def _sweep_job() -> tuple[str, int, list[str]] | None:
    """(sweep folder, job number, overrides) when this process runs one job of a ``-m`` sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return str(hc.sweep.dir), int(hc.job.num), list(hc.overrides.task)
    except Exception:  # noqa: BLE001 - outside Hydra (tests, the API), or a config without a sweep
        return None


def record_refusal(app: str, message: str, sweep: tuple[str, int, list[str]]) -> None:
    """Appends the refused job to ``<sweep folder>/refused.jsonl`` (one JSON object a line: app, job,
    overrides, message); :class:`sapd.app.SweepRefusals` lists them when the sweep ends."""
    import json

    folder, job, overrides = sweep
    os.makedirs(folder, exist_ok=True)
    line = json.dumps({"app": app, "job": job, "overrides": overrides, "message": message}) + "\n"
    fd = os.open(os.path.join(folder, REFUSED_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: jobs of a parallel launcher do not interleave
    finally:
        os.close(fd)


def refusals(app: str, *also: type[BaseException]) -> Callable[[F], F]:
    """Decorator for a Hydra task function: a user error (a :class:`UserError`, a config value left
    ``???``, an interpolation that cannot be resolved, or one of the types ``also``) becomes the one
    line ``<app>: <message>`` and exit status 2; ``HYDRA_FULL_ERROR=1`` re-raises it with its traceback.

    In a ``-m`` sweep the refused job is recorded in the sweep's folder (:func:`record_refusal`) and
    the sweep goes on with the next job; the sweep ends with a list of them and exit status 2.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                user = _user_error(exc, also)
                line = one_line(user) if user is not None else _omegaconf_user_error(exc)
                if line is None or full_errors():
                    if line is None:
                        with contextlib.suppress(AttributeError):
                            setattr(exc, TASK_ERROR, True)  # a bug: sapd.app keeps its traceback
                    raise
                refuse(app, line)
                sweep = _sweep_job()
                if sweep is not None:
                    record_refusal(app, line, sweep)
                    return None
                raise SystemExit(EXIT_USER_ERROR) from None

        return wrapper  # type: ignore[return-value]

    return decorate

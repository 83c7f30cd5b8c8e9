"""User errors and how the command-line apps refuse them: one line, no traceback.

A *user error* is one the person running sapd can fix (a path, a config value, a checkpoint, the
data): every such error is a :class:`UserError` (``DataError``, ``CheckpointError``, ``ExportError``,
``ConfigError``, ...), whose message is one line naming the file, key or value and what to do.

:func:`refusals` wraps each Hydra task function: a user error is logged as the one line
``sapd.<app>: <message>`` (stderr, and the run's log file) and the process exits with status 2, with
no traceback. ``HYDRA_FULL_ERROR=1`` (Hydra's own
switch for full tracebacks) re-raises it instead, traceback and all. Anything else (a bug) keeps
its traceback.

:func:`check_run_config` is the start-up check of a training config: it runs before any data or
model is built, so a wrong value costs a second, not a data-set scan.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
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


def refusals(app: str, *also: type[BaseException]) -> Callable[[F], F]:
    """Decorator for a Hydra task function: a user error (a :class:`UserError`, or one of the types
    ``also``) becomes the one line ``<app>: <message>`` and exit status 2; ``HYDRA_FULL_ERROR=1``
    re-raises it with its traceback."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                user = _user_error(exc, also)
                if user is None or full_errors():
                    raise
                refuse(app, one_line(user))
                raise SystemExit(EXIT_USER_ERROR) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def _get(cfg: Mapping | Any, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return None
        node = node.get(part)
    return node


def _check_int(cfg: Any, key: str, low: int, rule: str, *, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be {rule}; got {value!r}")


def check_run_config(cfg: Any) -> None:
    """Start-up checks of a training run config, before any data or model is built.

    The loss and post-processing settings are checked by building their config nodes alone
    (``SAPDCriterion`` and ``PostProcess`` check their own ranges: ``topk`` >= 1, ``eta`` >= 0,
    ``epsilon`` in (0, 1], ...), ``topk`` against the pyramid's levels, and the data settings here
    (``batch_size`` >= 1, ...). Raises :class:`ConfigError` naming the key and the allowed values.
    """
    from hydra.utils import instantiate

    model = _get(cfg, "model")
    if model is not None:
        num_levels = _get(cfg, "model.neck.num_levels")
        for name in ("criterion", "postprocess"):
            node = model.get(name)
            if node is None or "_target_" not in node:
                continue
            try:
                obj = instantiate(node)
            except Exception as exc:  # noqa: BLE001 - instantiate wraps the constructor's ValueError
                cause = exc.__cause__ or exc
                raise ConfigError(" ".join(str(cause).split())) from None
            if name == "criterion" and num_levels is not None and hasattr(obj, "check_levels"):
                try:
                    obj.check_levels(int(num_levels))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
    data = _get(cfg, "data")
    if data is not None:
        _check_int(cfg, "data.batch_size", 1, "an integer >= 1")
        _check_int(cfg, "data.val_batch_size", 1, "an integer >= 1 (or null: data.batch_size)", optional=True)
        _check_int(cfg, "data.num_workers", 0, "an integer >= 0", optional=True)
    trainer = _get(cfg, "trainer")
    if trainer is not None:
        _check_int(cfg, "trainer.num_nodes", 1, "an integer >= 1", optional=True)
        epochs = _get(cfg, "trainer.max_epochs")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or epochs == 0 or epochs < -1
        ):
            raise ConfigError(f"trainer.max_epochs must be an integer >= 1 (or -1: no limit); got {epochs!r}")

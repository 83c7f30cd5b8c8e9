"""The Hydra shell of sapd's commands: every refusal, Hydra's own included, is one line and exit status 2.

:func:`hydra_app` is ``@hydra.main`` for sapd's commands. Around the task function it puts
:func:`sapd.errors.refusals` (a user error in the command: one line ``sapd.<app>: ...``, exit 2), and
around Hydra it turns Hydra's own refusals into the same one line and exit status: an unknown key
(``lr=0.1``, with the keys of that name the config has), an unknown group option (``model=nope``,
with the options there are), an override that does not parse, an interpolation that cannot be
resolved, a config folder (``SAPD_CONFIG_DIR``) that is not there. Hydra prints these itself in
several lines and exits with status 1; a bug keeps its traceback, as ``HYDRA_FULL_ERROR=1`` keeps
every one.

Hydra offers no hook for its own error report, so :func:`hydra_app` replaces
``hydra._internal.utils.run_and_report`` (the function through which Hydra runs and reports every
step of a command) while the command runs; ``tests/test_checks.py`` runs the commands and fails if a
Hydra version changes this.

:class:`SweepRefusals` (``conf/hydra/default.yaml``, ``hydra.callbacks``) lists the jobs of a ``-m``
sweep that were refused, when the sweep ends, and makes the sweep's exit status 2.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import functools
import gc
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sapd.errors import EXIT_USER_ERROR, REFUSED_FILE, TASK_ERROR, UserError, full_errors, one_line, refusals, refuse

_DROP = ("full_key:", "object_type=", "reference_type=", "Set the environment variable HYDRA_FULL_ERROR")


def flatten(text: str) -> str:
    """Hydra's and OmegaConf's several-line messages as one line: the config search path and the
    ``full_key`` / ``object_type`` lines dropped, a list of options joined by commas."""
    text = text.split("\nConfig search path:")[0]
    parts: list[str] = []
    listing = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(_DROP):
            continue
        if raw.startswith("\t") and parts:
            parts[-1] += (", " if listing else " ") + line
            listing = True
            continue
        listing = False
        parts.append(line)
    joined = "; ".join(p.rstrip(".;") if i < len(parts) - 1 else p for i, p in enumerate(parts))
    return joined.replace(":;", ":")


def _leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        keys += _leaf_keys(value, full + ".") if isinstance(value, dict) else [full]
    return keys


def _similar_keys(config_name: str, key: str) -> list[str]:
    """Keys of the config ``config_name`` (composed without overrides) named like ``key``: the same last
    part (``lr`` -> ``optim.optimizer.lr``) or a close spelling."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    from sapd.paths import initialize_configs

    try:
        GlobalHydra.instance().clear()
        with initialize_configs():
            cfg = compose(config_name=config_name)
        keys = _leaf_keys(OmegaConf.to_container(cfg, resolve=False))
    except Exception:  # noqa: BLE001 - only a hint: the refusal stands without it
        return []
    last = key.rsplit(".", 1)[-1]
    same = [k for k in keys if k.rsplit(".", 1)[-1] == last and k != key]
    return same[:3] or difflib.get_close_matches(key, keys, n=3, cutoff=0.75)


def hydra_error_line(exc: BaseException, config_name: str) -> str | None:
    """The one line for an error Hydra met before or around the task (composition, overrides,
    interpolations, config folders); None for anything else (a bug)."""
    from hydra.errors import CompactHydraException, MissingConfigException, SearchPathException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(
        exc, (CompactHydraException, MissingConfigException, SearchPathException, OmegaConfBaseException)
    ):
        return None
    cause = exc.__cause__
    text = str(exc)
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
        text += "\n" + str(cause)
    line = flatten(text)
    unknown = getattr(cause, "full_key", None)
    if unknown and "is not in struct" in text:
        similar = _similar_keys(config_name, str(unknown))
        hint = f"; did you mean {' or '.join(similar)}?" if similar else ""
        line = f"{unknown} is not a key of this config (a new key needs +{unknown}=...){hint}"
    return line


def _reraise(exc: BaseException) -> Any:
    raise exc


@contextlib.contextmanager
def one_line_hydra_errors(app: str, config_name: str) -> Iterator[None]:
    """While it is open, Hydra's own refusals are one line ``<app>: ...`` and exit status 2."""
    from hydra._internal import utils as hydra_utils

    original = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as exc:
            line = None
            if not full_errors() and not getattr(exc, TASK_ERROR, False):
                line = hydra_error_line(exc, config_name)
            if line is None:
                return original(functools.partial(_reraise, exc))  # Hydra's report: a bug, or HYDRA_FULL_ERROR=1
            refuse(app, line)
            raise SystemExit(EXIT_USER_ERROR) from None

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


@functools.cache  # once per process
def quick_exit() -> None:
    """Makes the interpreter's exit skip freeing the objects of torch, Lightning and the rest one by one.

    At exit Python clears every module and collects the reference cycles among their hundreds of thousands of
    objects: after ``import sapd.train`` that took 1.0-1.6 s of the 6-7 s a refused command lasted (2 cores,
    docs/benchmarks.md). :func:`gc.freeze` in an exit handler leaves the objects that exist then to the
    operating system. It frees nothing, so the other exit handlers (logging's flush, wandb's, temporary
    folders) run as before in any order, and objects outside reference cycles are still freed one by one.
    Called by each command's process, not on import: a program that imports sapd keeps Python's own exit.
    """
    atexit.register(gc.freeze)


def hydra_app(app: str, config_name: str, *also: type[BaseException]) -> Callable[[Callable], Callable]:
    """``@hydra.main`` of a sapd command (``app``: ``sapd.train``, ...; ``config_name``: its conf/ file).

    The decorated function still takes a composed config as its one argument (what the tests do):
    then it runs the task function, with :func:`~sapd.errors.refusals`, and nothing of Hydra. Called without
    one it is the command's process (:func:`quick_exit`).
    """

    def decorate(fn: Callable) -> Callable:
        task = refusals(app, *also)(fn)

        @functools.wraps(fn)
        def main(cfg_passthrough: DictConfig | None = None) -> Any:
            if cfg_passthrough is not None:
                return task(cfg_passthrough)
            quick_exit()
            import hydra

            from sapd.paths import config_path

            try:
                path = config_path(config_name)
            except UserError as exc:
                if full_errors():
                    raise
                refuse(app, one_line(exc))
                raise SystemExit(EXIT_USER_ERROR) from None
            hydra_main = hydra.main(version_base="1.3", config_path=path, config_name=config_name)(task)
            with one_line_hydra_errors(app, config_name):
                return hydra_main()

        return main

    return decorate


class SweepRefusals(Callback):
    """Hydra callback: at the end of a ``-m`` sweep, lists the jobs refused (from
    ``<sweep folder>/refused.jsonl``, written by :func:`sapd.errors.record_refusal`) on stderr, one
    line each, and exits with status 2 when there is one."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            folder = Path(str(config.hydra.sweep.dir))
        except Exception:  # noqa: BLE001 - a config without a sweep folder: nothing recorded
            return
        path = folder / REFUSED_FILE
        if not path.is_file():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            return
        app = rows[0].get("app", "sapd")
        print(f"{app}: {len(rows)} job(s) of this sweep refused (listed in {path}):", file=sys.stderr)
        for row in sorted(rows, key=lambda r: r.get("job", 0)):
            print(
                f"  job {row.get('job')} ({' '.join(row.get('overrides', []))}): {row.get('message')}", file=sys.stderr
            )
        sys.stderr.flush()
        raise SystemExit(EXIT_USER_ERROR)

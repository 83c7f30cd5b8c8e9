"""Where sapd's Hydra configs live: the single place every entry point asks.

The configs are kept in the repository's top-level ``conf/`` folder, and the build maps that folder
into the package as ``sapd.conf`` (``[tool.setuptools.package-dir]`` in pyproject.toml), so both an
editable install (``pip install -e .``, what ``make install`` does) and a normal wheel carry them.
Hydra reads them through the package, as ``pkg://sapd.conf``; nothing depends on the working directory.

``SAPD_CONFIG_DIR`` points sapd at a conf folder of your own instead (for instance an edited copy of
``conf/`` that keeps its layout: ``train.yaml``, ``eval.yaml``, ``predict.yaml`` and the group folders).

When sapd runs from a checkout's ``src/`` put first on ``PYTHONPATH`` (a second worktree, say) while
``sapd.conf`` is installed from somewhere else, the checkout's own ``conf/`` is used, so code and
configs always come from the same tree.

The commands find their configs through :func:`sapd.app.hydra_app` (``config_path()`` when they start);
``CONFIG_PATH`` is the same for an ``@hydra.main(config_path=CONFIG_PATH, ...)`` of your own, and
:func:`initialize_configs` goes around ``hydra.compose`` (tests, notebooks).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from hydra import initialize_config_dir, initialize_config_module
from omegaconf import OmegaConf

from sapd.errors import EXIT_USER_ERROR, ConfigError

CONFIG_MODULE = "sapd.conf"
_PKG = "pkg://"


def _installed_conf() -> Path | None:
    """The folder of the importable ``sapd.conf`` package, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(CONFIG_MODULE)
    except ModuleNotFoundError:
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


def config_path(config_name: str | None = None) -> str:
    """Hydra's ``config_path`` for sapd: an absolute folder, or ``pkg://sapd.conf``.

    In order: ``$SAPD_CONFIG_DIR``; the ``conf/`` of the checkout whose ``src/`` this sapd was
    imported from, when the installed ``sapd.conf`` is another folder; else ``pkg://sapd.conf``.
    A ``SAPD_CONFIG_DIR`` that is not a folder, or lacks ``<config_name>.yaml``, is a
    :class:`~sapd.errors.ConfigError` (one line naming it and what to do).
    """
    register_configs()
    env = os.environ.get("SAPD_CONFIG_DIR")
    if env:
        folder = Path(env).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"SAPD_CONFIG_DIR={env} is not a folder: point it at a copy of sapd's conf/ or unset it")
        if config_name and not (folder / f"{config_name}.yaml").is_file():
            raise ConfigError(
                f"SAPD_CONFIG_DIR={env} has no {config_name}.yaml: point it at a copy of sapd's conf/ "
                "(train.yaml, eval.yaml, predict.yaml and the group folders) or unset it"
            )
        return str(folder)
    installed = _installed_conf()
    package = Path(__file__).resolve().parent
    checkout_conf = package.parents[1] / "conf"
    if package.parent.name == "src" and (checkout_conf / "__init__.py").is_file() and installed != checkout_conf:
        return str(checkout_conf)
    if installed is None:
        raise ConfigError(
            "sapd's Hydra configs (the package sapd.conf) are not installed: reinstall sapd "
            "(pip install -e . in a checkout, or pip install its wheel) or set SAPD_CONFIG_DIR to a conf folder"
        )
    return _PKG + CONFIG_MODULE


def register_configs() -> None:
    """The config nodes declared in code, for every config folder: ``model/criterion=paper``, the paper's
    loss setting, made from the defaults of :class:`sapd.models.settings.CriterionSettings` (their one declaration)."""
    from hydra.core.config_store import ConfigStore

    from sapd.models.settings import paper_config

    ConfigStore.instance().store(group="model/criterion", name="paper", node=paper_config())


def initialize_configs(job_name: str = "app"):
    """Hydra's ``initialize_*`` context on the same configs as :data:`CONFIG_PATH`, for ``hydra.compose``."""
    path = config_path()
    if path.startswith(_PKG):
        return initialize_config_module(config_module=path[len(_PKG) :], job_name=job_name, version_base="1.3")
    return initialize_config_dir(config_dir=path, job_name=job_name, version_base="1.3")


def writable_dir(folder: str) -> str:
    """``${sapd.writable_dir:<folder>}``: creates ``folder`` (parents too), checks a file can be written
    in it, and returns it unchanged.

    Run folders are made under it by Hydra before any sapd code runs; an unusable log folder would
    end there in a library traceback. Here it is one line naming the folder, the reason and the keys
    that move it, and exit status 2.
    """
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # a file can be created there
    except OSError as exc:
        existing = next((p for p in [path, *path.parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            why = f"{existing} is a file, not a folder"
        elif isinstance(exc, PermissionError) or (existing is not None and not os.access(existing, os.W_OK)):
            why = f"permission denied (nearest existing folder: {existing})"
        else:
            why = f"{exc.strerror or exc} (its nearest existing folder {existing} does not accept new folders)"
        # printed, not logged: Hydra resolves this before any logging of the run is set up
        print(
            f"sapd: cannot write the log folder {path}: {why}; choose another with paths.log_dir=... "
            "or the SAPD_LOG_DIR environment variable",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_USER_ERROR) from None  # not an Exception: Hydra lets it through without a traceback
    return folder


def default_score_thresh() -> float:
    """``${sapd.score_thresh:}``: the default score threshold of predict and the API (:data:`sapd.api.SCORE_THRESH`)."""
    from sapd.api import SCORE_THRESH

    return SCORE_THRESH


def register_resolvers() -> None:
    """The config resolvers sapd's YAML uses: ``sapd.writable_dir``, ``sapd.pid`` (this process's id,
    so that runs started in the same second get distinct folders) and ``sapd.score_thresh``."""
    OmegaConf.register_new_resolver("sapd.writable_dir", writable_dir, replace=True)
    OmegaConf.register_new_resolver("sapd.score_thresh", default_score_thresh, replace=True)
    # cached in the config (as Hydra's `now`), so a config copied to other processes (a launcher's jobs)
    # keeps the folder name of the process that composed it
    OmegaConf.register_new_resolver("sapd.pid", lambda: os.getpid(), replace=True, use_cache=True)


register_resolvers()


def __getattr__(name: str) -> str:
    """``CONFIG_PATH``: :func:`config_path` when asked for (not at import, so that a bad
    ``SAPD_CONFIG_DIR`` is a command's one-line refusal, not an import error)."""
    if name == "CONFIG_PATH":
        return config_path()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

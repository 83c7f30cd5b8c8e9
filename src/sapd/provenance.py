"""Where a run came from: the commit of the code and the data it trained on, for ``summary.json``.

``sapd.report`` pairs runs by seed, and pools them into one row, only when these agree.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The data keys that decide what a run trains and is scored on (sapd.report pairs and pools only runs
# equal in these); loader settings (batch size, workers) leave them unchanged.
DATA_IDENTITY_KEYS = (
    "_target_",
    "name",
    "root",
    "synthetic",
    "train_ann",
    "train_images",
    "val_ann",
    "val_images",
    "min_size",
    "max_size",
    "val_min_size",
    "val_max_size",
    "drop_empty",
    "limit_val_images",
)


def source_commit() -> dict[str, Any] | None:
    """``{"sha", "dirty"}`` of the git checkout the ``sapd`` package is imported from (``dirty``: tracked
    files changed), or None for an installed package or without git."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package), *args], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # the checkout must hold this package (a virtual environment inside another repository does not)
    if not top or (Path(top) / "src" / "sapd" / Path(__file__).name).resolve() != Path(__file__).resolve():
        return None
    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if not sha or status is None:
        return None
    return {"sha": sha, "dirty": bool(status)}


def data_identity(cfg: DictConfig) -> dict[str, Any]:
    """The data config's :data:`DATA_IDENTITY_KEYS` (resolved): what ``sapd.report`` compares runs' data by."""
    data = cfg.get("data") or {}
    try:
        values = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: the keys as written
        values = OmegaConf.to_container(data, resolve=False)
    return {k: values[k] for k in DATA_IDENTITY_KEYS if k in values}

"""Where sapd's Hydra configs live (``conf/`` at the repository root)."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> str:
    """The ``conf`` folder: $SAPD_CONFIG_DIR, else the repository's ``conf/`` beside ``src/``."""
    env = os.environ.get("SAPD_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "conf", here.parent / "conf", Path.cwd() / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        "sapd cannot find its Hydra configs (conf/train.yaml): install sapd from a checkout "
        "(pip install -e .) or set SAPD_CONFIG_DIR to the conf/ folder"
    )


CONFIG_DIR = config_dir()

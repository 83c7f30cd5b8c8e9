"""Loggers: Weights & Biases offline unless the user is logged in."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """True when wandb has an API key (environment or ``wandb login``); never touches the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        path = os.path.expanduser("~/.netrc")
        if os.path.exists(path):
            auth = netrc.netrc(path)
            host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
            return auth.authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
    return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto`` -> WANDB_MODE if set, else ``online`` when logged in, else ``offline``."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if wandb_logged_in() else "offline"


def make_wandb_logger(
    *,
    project: str = "sapd",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] | None = None,
    save_dir: str = ".",
    mode: str = "auto",
    log_model: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` that needs no account: offline unless logged in (``mode='auto'``)."""
    mode = resolve_wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(
        project=project,
        name=name,
        group=group,
        tags=list(tags) if tags else None,
        save_dir=save_dir,
        mode=mode,
        offline=mode == "offline",
        log_model=log_model if mode == "online" else False,
        **kwargs,
    )

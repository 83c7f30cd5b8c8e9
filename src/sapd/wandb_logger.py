"""The Weights & Biases logger: offline unless the user is logged in; a resumed run continues its wandb run."""

from __future__ import annotations

import copy
import logging
import os
import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

# Where a run keeps its wandb run id: a file in the run folder and a key of every checkpoint it writes.
WANDB_ID_FILE = "wandb_id.txt"
WANDB_ID_KEY = "sapd_wandb_id"


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
    id: str | None = None,  # noqa: A002 - wandb's name
    resume: str | None = "allow",
    verbose: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` that needs no account: offline unless logged in (``mode='auto'``).

    ``id`` names the wandb run (None: a new id, drawn here so that it is known before the run
    starts); with ``resume='allow'`` a run of that id that exists already is continued. Unless
    ``verbose``, wandb prints nothing (``wandb.Settings(silent=True)``): its run links, sync hints
    and closing history are a run's own business, the run folder holds them.
    """
    mode = resolve_wandb_mode(mode)
    if not verbose and "settings" not in kwargs:
        import wandb

        kwargs["settings"] = wandb.Settings(silent=True)
    os.makedirs(save_dir, exist_ok=True)
    if not id:
        id = new_wandb_id()  # noqa: A001
    logger = WandbLogger(
        project=project,
        name=name,
        group=group,
        tags=list(tags) if tags else None,
        save_dir=save_dir,
        mode=mode,
        offline=mode == "offline",
        log_model=log_model if mode == "online" else False,
        id=id,
        resume=resume,
        **kwargs,
    )
    # Lightning passes anonymous=None to wandb.init, which wandb (0.31 here) answers with a deprecation
    # warning on every run (before any setting can quiet it); unset, wandb says nothing
    init_args = getattr(logger, "_wandb_init", None)
    if isinstance(init_args, dict) and init_args.get("anonymous") is None:
        init_args.pop("anonymous", None)
    return logger


def new_wandb_id(length: int = 8) -> str:
    """A new wandb run id (base 36, as wandb draws them; from the system's randomness, so seeding does
    not make two runs share one)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _is_wandb_entry(entry: Any) -> bool:
    target = str(entry.get("_target_", "")) if isinstance(entry, (Mapping, DictConfig)) else ""
    return target == f"{__name__}.make_wandb_logger" or target.endswith("WandbLogger")


def stored_wandb_id(ckpt_path: str | os.PathLike) -> str | None:
    """The wandb run id a sapd checkpoint was written under; None when there is none.

    Read from the checkpoint (the key :data:`WANDB_ID_KEY`; memory-mapped, so the weights are not
    read), else from :data:`WANDB_ID_FILE` in the run folder the checkpoint lies in
    (``<run>/checkpoints/<name>.ckpt``).
    """
    import torch

    path = Path(ckpt_path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        found = ckpt.get(WANDB_ID_KEY) if isinstance(ckpt, dict) else None
    except Exception:  # noqa: BLE001 - a missing or unreadable file is reported by the fit that loads it
        found = None
    if found:
        return str(found)
    id_file = path.parent.parent / WANDB_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip() or None
    return None


def resume_wandb_config(logger_cfg: DictConfig | None, ckpt_path: str | os.PathLike | None) -> DictConfig | None:
    """The logger config with, for a run resumed from ``ckpt_path``, the wandb run of that checkpoint.

    Every wandb entry whose ``id`` is unset gets the checkpoint's stored id (:func:`stored_wandb_id`)
    and ``resume='allow'``, so the resumed run's curves continue on the same dashboard. The config
    is returned unchanged when there is no checkpoint, no wandb entry or no stored id.
    """
    if not logger_cfg or not ckpt_path:
        return logger_cfg
    names = [name for name, entry in logger_cfg.items() if _is_wandb_entry(entry) and not entry.get("id")]
    if not names:
        return logger_cfg
    run_id = stored_wandb_id(ckpt_path)
    if not run_id:
        return logger_cfg
    cfg = copy.deepcopy(logger_cfg)
    with open_dict(cfg):
        for name in names:
            cfg[name]["id"] = run_id
            if not cfg[name].get("resume"):
                cfg[name]["resume"] = "allow"
    log.info("resuming wandb run %s of %s", run_id, ckpt_path)
    return cfg

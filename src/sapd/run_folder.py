"""One training run per run folder: a folder that holds a run is not trained into again unless the
run resumes from it, and two processes never train into one folder at the same time.

:func:`claim_run_folder` is held for a training's lifetime. It takes an exclusive ``flock`` on
``<run>/.sapd-train.lock`` (released by the kernel when the process ends, however it ends, so a
killed run never blocks the next one) and refuses, in one line, a folder whose lock another process
holds, and a folder that already holds a run (a checkpoint in ``checkpoints/`` or a ``summary.json``)
unless ``ckpt_path`` is a file inside that folder (the run resumes itself). Only the primary process
claims the folder: the other ranks of a distributed run write into their primary's folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sapd.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder check still applies
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".sapd-train.lock"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunFolderError(UserError):
    """A run folder in use by another process, or holding a run that this one does not resume."""


def is_primary_process() -> bool:
    """False in the non-zero ranks of a distributed run (their launcher sets a rank variable)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def existing_run(folder: Path) -> Path | None:
    """The first file that shows ``folder`` holds a run (a checkpoint, the summary), or None."""
    checkpoints = folder / CHECKPOINT_DIR
    if checkpoints.is_dir():
        found = sorted(p for p in checkpoints.glob("*.ckpt") if p.is_file())
        if found:
            return found[0]
    summary = folder / SUMMARY_FILE
    return summary if summary.is_file() else None


def resumes_from(folder: Path, ckpt_path: str | os.PathLike | None) -> bool:
    """Whether ``ckpt_path`` is a file inside ``folder`` (links resolved)."""
    if not ckpt_path:
        return False
    return Path(folder).resolve() in Path(ckpt_path).resolve().parents


@contextlib.contextmanager
def claim_run_folder(folder: str | os.PathLike, ckpt_path: str | os.PathLike | None = None) -> Iterator[Path]:
    """Holds ``folder`` for one training run (module docstring); yields it.

    Raises:
        RunFolderError: another process holds the folder, or it holds a run that ``ckpt_path`` does not resume.
    """
    folder = Path(folder)
    if not is_primary_process():
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RunFolderError(
                    f"run folder {folder} is in use by another training (process {holder}); "
                    "give each run its own hydra.run.dir, or wait for that one to end"
                ) from None
        found = existing_run(folder)
        if found is not None and not resumes_from(folder, ckpt_path):
            last = folder / CHECKPOINT_DIR / "last.ckpt"
            resume = f"resume it with ckpt_path={last}, or " if last.is_file() else ""
            raise RunFolderError(
                f"run folder {folder} already holds a run ({found.relative_to(folder)}): "
                f"{resume}give another hydra.run.dir (nothing was overwritten)"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # releases the lock

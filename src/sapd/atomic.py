"""Files that appear whole or not at all, and outputs that never replace an input.

Every file sapd writes for the user (checkpoints, exported models, predictions, their JSON) is first
written to ``.<name>.tmp-<pid>`` in the destination folder, flushed and fsynced, then renamed over
the destination (``os.replace``: atomic on one filesystem) and the folder entry fsynced. A process
killed while writing leaves the previous file intact and at worst its temporary file, which the next
write of that name removes once its process is gone. A write that fails (a full disk, a file-size
limit) removes its temporary file and raises :class:`WriteError`, one line naming the file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sapd.errors import UserError

TMP_INFIX = ".tmp-"


class WriteError(UserError):
    """An output that could not be written (no space, no permission, a size limit)."""


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.<name>.tmp-<pid>`` beside it."""
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Removes the temporary files of ``path`` left by processes that are gone (killed mid-write); returns them."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}{TMP_INFIX}*"):
        pid = tmp.name.rsplit(TMP_INFIX, 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder
            os.fsync(fd)
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@contextlib.contextmanager
def replacing(path: str | Path, *, exclusive: bool = False) -> Iterator[Path]:
    """Yields the temporary path to write ``path``'s new content to; on success it is fsynced and renamed
    over ``path``, on any failure (or a kill's ``KeyboardInterrupt``) removed, ``path`` left as it was.
    ``exclusive``: ``path`` must not exist; it is linked into place (``os.link`` fails on an existing
    name, so a file that appears meanwhile is not replaced either).

    Raises:
        WriteError: the folder cannot be created, the temporary file cannot be written or renamed, or
        (``exclusive``) ``path`` exists.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create the folder {path.parent} for {path.name}: {_why(exc)}") from None
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, FileExistsError) and exclusive:
            raise WriteError(f"{path} exists and is left as it is; move it away or write elsewhere") from None
        if isinstance(exc, OSError):
            kept = f"{path} was left as it was" if os.path.lexists(path) else "nothing was written"
            raise WriteError(f"cannot write {path}: {_why(exc)}; {kept}") from None
        raise
    fsync_dir(path.parent)


def _link_new(tmp: Path, path: Path) -> None:
    """Puts ``tmp`` at ``path`` only if ``path`` does not exist (FileExistsError otherwise), then drops ``tmp``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: checked, then renamed
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes, *, exclusive: bool = False) -> Path:
    """Writes ``data`` to ``path`` whole or not at all (:func:`replacing`)."""
    path = Path(path)
    with replacing(path, exclusive=exclusive) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    return path


def write_text(path: str | Path, text: str, *, exclusive: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), exclusive=exclusive)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file (links and ``..`` resolved; hard links by inode)."""
    a, b = Path(a), Path(b)
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()

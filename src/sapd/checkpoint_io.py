"""The checkpoint writer of training runs (a Lightning plugin): a file appears whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sapd.atomic import replacing


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are never half-written: the file appears whole or not at all.

    Each save goes to a temporary file in the destination folder, is flushed and fsynced, then
    renamed over the destination (``os.replace``: atomic on one filesystem), and the folder entry is
    fsynced (:func:`sapd.atomic.replacing`). A process killed during a save leaves the previous
    ``last.ckpt`` intact and at worst a ``.<name>.tmp-<pid>`` file, which the next save of that name
    removes once that process is gone (a resumed run cleans up after the killed one). Lightning's own save
    writes through fsspec, whose temporary file lives in the system temporary folder: when that is
    another filesystem (a tmpfs ``/tmp``), the final move is a copy and a kill during it leaves a
    truncated checkpoint. Remote URLs (``s3://``, ...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(str(path).removeprefix("file://"))
        with replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()

"""``python -m sapd.train`` as the rehearsal runs it (``benchmarks/rehearse.py``): the same ``train(cfg)``
with one more callback, :class:`Recorder`, in every process.

``python -m benchmarks.rehearse_train [key=value ...]`` takes ``sapd.train``'s overrides (Lightning's DDP
launcher starts the other processes with this same command). Environment:

- ``SAPD_REHEARSE_OUT``: folder of the records: ``rank<r>.jsonl`` (one line per training step: step,
  epoch, phase, training and crowd boxes in the process's batch, seconds since the step before, peak
  RSS of the process and of its loader workers) and ``rank<r>_end.json`` (after the run: global step,
  peak RSS, a checksum of the weights);
- ``SAPD_REHEARSE_KILL_AT``: global step at whose start process 0 SIGKILLs its process group (itself,
  the other processes, the loader workers), as an out-of-memory killer or a pre-empted node would;
- ``SAPD_REHEARSE_RESULTS``: the COCO results json that validation writes (``module.results_file``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import psutil
import torch
from omegaconf import DictConfig

import sapd.train as sapd_train
from sapd.app import hydra_app
from sapd.logging_setup import configure_logging
from sapd.module import NonFiniteLossError

from .measure import peak_rss_bytes

MIB = 2**20


def _workers_pss(me: psutil.Process) -> int:
    """Proportional set size (bytes) of this process's loader workers: its children forked from it (same
    command line; the other DDP processes, which process 0 starts with another command line, are not
    counted). PSS, not RSS: a forked worker shares most of its pages with the process that forked it."""
    total = 0
    try:
        cmdline = me.cmdline()
        for child in me.children(recursive=False):
            try:
                if child.cmdline() == cmdline:
                    total += child.memory_full_info().pss
            except psutil.Error:
                continue
    except psutil.Error:
        return 0
    return total


class Recorder(L.Callback):
    """Writes one json line per training step of this process; SIGKILLs the run at ``kill_at``."""

    def __init__(self, out: Path, kill_at: int, results_file: str | None) -> None:
        self.out, self.kill_at, self.results_file = out, kill_at, results_file
        self.last_end: float | None = None
        self.boxes = self.crowd = 0
        self.workers_peak = 0
        self.me = psutil.Process()

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.results_file:
            pl_module.results_file = self.results_file

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.last_end = None  # the first step of an epoch follows validation: not timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.kill_at and trainer.is_global_zero:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        _, targets = batch
        self.boxes = sum(int(t["boxes"].shape[0]) for t in targets)
        self.crowd = sum(int(t["crowd_boxes"].shape[0]) for t in targets)
        self.images = len(targets)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.workers_peak = max(self.workers_peak, _workers_pss(self.me))
        row = {
            "step": trainer.global_step - 1,
            "epoch": trainer.current_epoch,
            "phase": int(pl_module.net.phase),
            "images": self.images,
            "boxes": self.boxes,
            "crowd": self.crowd,
            "seconds": None if self.last_end is None else round(now - self.last_end, 4),
            "peak_rss_mib": round(peak_rss_bytes() / MIB, 1),
            "workers_pss_mib": round(self.workers_peak / MIB, 1),
            "cpu_s": round(time.process_time(), 2),  # user + system seconds of this process so far
        }
        self.last_end = now
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


@hydra_app("benchmarks.rehearse_train", "train", NonFiniteLossError)
def main(cfg: DictConfig) -> None:
    configure_logging()
    out = Path(os.environ["SAPD_REHEARSE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    kill_at = int(os.environ.get("SAPD_REHEARSE_KILL_AT", "-1"))
    recorder = Recorder(out, kill_at, os.environ.get("SAPD_REHEARSE_RESULTS"))
    original = sapd_train.instantiate_group

    def with_recorder(group_cfg):
        objects = original(group_cfg)
        return [*objects, recorder] if group_cfg is cfg.get("callbacks") else objects

    sapd_train.instantiate_group = with_recorder
    try:
        _, objects = sapd_train.train(cfg)
    finally:
        sapd_train.instantiate_group = original
    trainer, module = objects["trainer"], objects["module"]
    end = {
        "global_step": int(trainer.global_step),
        "peak_rss_mib": round(peak_rss_bytes() / MIB, 1),
        "workers_pss_mib": round(recorder.workers_peak / MIB, 1),
        "cpu_s": round(time.process_time(), 2),
        "checksum": [float(p.detach().double().sum()) for p in module.parameters()],
        "finite": all(bool(torch.isfinite(p).all()) for p in module.parameters()),
    }
    (out / f"rank{trainer.global_rank}_end.json").write_text(json.dumps(end))


if __name__ == "__main__":
    main()

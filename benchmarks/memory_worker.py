"""Peak memory of one speed-suite task in a fresh process (``python -m benchmarks memory=subprocess``).

Reads ``{"config": BenchConfig dict, "task": name}`` as JSON on stdin, builds only what the task needs,
runs it once as warm-up (lazy initialisation, optimizer state), then measures a second call with
:func:`benchmarks.measure.measure_extra_memory`, and prints the result as one JSON line on stdout.
A fresh process per task means no allocator cache left by other models can hide a task's peak.
"""

from __future__ import annotations

import json
import sys

import torch

from .measure import measure_extra_memory
from .workloads import BenchConfig, Workbench


def measure_task(wb: Workbench, name: str) -> dict:
    """Warm-up call, then the extra-memory measurement of a second call of task ``name``."""
    fn = wb.task(name)
    fn()
    return measure_extra_memory(fn, wb.device)


def main() -> None:
    request = json.loads(sys.stdin.read())
    cfg = BenchConfig.from_dict(request["config"])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    result = measure_task(Workbench(cfg), request["task"])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""How the benchmarks measure: interleaved wall-clock timing, peak memory, and the machine they ran on.

Timing: every repetition runs every task once, round-robin, with the order rotated by one task per
repetition (no task always follows the same neighbour); warm-up repetitions are run and dropped;
``gc.collect()`` before each call, over the objects made since the run began (:func:`frozen_heap`);
``time.perf_counter`` around the call, with the device synchronised
on both sides on CUDA. The statistic is the median over repetitions; ratios are ratios of medians of
samples taken in the same loop, so background load shifts both sides alike.

Memory on CPU: ``tracemalloc`` does not see torch's allocations, so the resident set size of the
process is read from ``/proc/self/status``. Before a measured call the garbage is collected, freed heap
pages are handed back to the OS (glibc ``malloc_trim``) and the kernel's high-water mark ``VmHWM`` is
reset (``echo 5 > /proc/self/clear_refs``); ``extra = VmHWM after - VmRSS before``: what the call needs
on top of what already existed (model, optimizer state, inputs). On CUDA the same difference is taken
with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping

import torch

from sapd.utils import cpu_flags

Task = Callable[[], object]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


_frozen_depth = 0  # frozen_heap blocks open now
_frozen_before = False  # objects were frozen before the outermost block (sapd's loaders freeze): left so


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Runs the block with every object alive at its start out of the garbage collector's reach.

    A suite's many ``gc.collect()`` calls then walk only the objects made since (the models, inputs and
    garbage of the calls), not the whole heap of the caller: in a pytest process that holds torch,
    Lightning and Hydra (~540,000 objects) one full collection took 0.3 s on a 2-core EPYC
    (2026-12-05). Nor can an automatic full collection over that heap land inside a timed call.
    ``gc.unfreeze()`` hands the objects back at the end of the outermost block (blocks nest), unless some
    were frozen before it began (``gc.unfreeze`` cannot tell whose they are).
    """
    global _frozen_depth, _frozen_before
    if _frozen_depth == 0:
        _frozen_before = gc.get_freeze_count() > 0
        gc.collect()
        gc.freeze()
    _frozen_depth += 1
    try:
        yield
    finally:
        _frozen_depth -= 1
        if _frozen_depth == 0 and not _frozen_before:
            gc.unfreeze()


def time_call(fn: Task, device: torch.device | str = "cpu") -> tuple[float, object]:
    """Seconds one call of ``fn`` takes (device synchronised before and after) and its return value."""
    gc.collect()
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return time.perf_counter() - start, value


def run_interleaved(
    tasks: Mapping[str, Task],
    *,
    reps: int,
    warmup: int,
    device: torch.device | str = "cpu",
    label: str = "",
) -> dict[str, list[float]]:
    """Times ``tasks`` round-robin: ``warmup + reps`` rounds, each task once per round, order rotated.

    A task may return a dict of sub-timings (seconds, e.g. the loss part of a training step); those
    samples are kept under ``"<task>/<key>"``.

    Returns:
        samples per task name (and sub-timing), the warm-up rounds excluded.
    """
    with frozen_heap():
        return _interleave(tasks, reps, warmup, device, label)


def _interleave(
    tasks: Mapping[str, Task], reps: int, warmup: int, device: torch.device | str, label: str
) -> dict[str, list[float]]:
    """The rounds of :func:`run_interleaved`."""
    names = list(tasks)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(warmup + reps):
        shift = rnd % len(names) if names else 0
        order = names[shift:] + names[:shift]
        t_round = time.perf_counter()
        for name in order:
            seconds, extra = time_call(tasks[name], device)
            if rnd < warmup:
                continue
            samples[name].append(seconds)
            if isinstance(extra, dict):
                for key, value in extra.items():
                    samples.setdefault(f"{name}/{key}", []).append(float(value))
        kind = "warm-up" if rnd < warmup else "rep"
        idx = rnd + 1 if rnd < warmup else rnd - warmup + 1
        total = warmup if rnd < warmup else reps
        log(f"[{label}] {kind} {idx}/{total} ({time.perf_counter() - t_round:.1f} s)")
    return samples


def summarize(samples: list[float]) -> dict[str, float | int | list[float]]:
    """Median, min, max and count of a list of seconds (the samples are kept too)."""
    if not samples:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0, "samples": []}
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": [round(s, 6) for s in samples],
    }


def log(message: str) -> None:
    """Progress to stderr (stdout carries the table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # not Linux: psutil knows

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size (since start or the last :func:`reset_peak_rss`)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_extra_memory(fn: Task, device: torch.device | str = "cpu") -> dict[str, float | str]:
    """Peak memory one call of ``fn`` needs on top of what exists before it.

    Returns:
        ``extra_bytes``, ``peak_bytes`` (process RSS high-water mark on CPU, allocator peak on CUDA),
        ``baseline_bytes`` and ``method``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "extra_bytes": float(peak - base),
            "peak_bytes": float(peak),
            "baseline_bytes": float(base),
            "method": "torch.cuda.max_memory_allocated - memory_allocated before",
        }
    release_free_memory()
    base = rss_bytes()
    exact = reset_peak_rss()
    fn()
    peak = peak_rss_bytes()
    return {
        "extra_bytes": float(max(peak - base, 0)),
        "peak_bytes": float(peak),
        "baseline_bytes": float(base),
        "method": "VmHWM after - VmRSS before (clear_refs reset, malloc_trim)"
        if exact
        else "ru_maxrss after - RSS before (peak not resettable: an upper bound of the process)",
    }


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """CPU model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str) -> dict:
    """Where and with what the numbers were taken."""
    import timm
    import torchvision

    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil ships with the dev environment
        physical, mem_gib = None, None
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    return info

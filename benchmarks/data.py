"""Throughput of the training data loader (decode, resize, flip, normalise, collate), in images/s.

``python -m benchmarks suite=data [workers=2] [batches=40]`` (``make bench-data``) measures
  (a) the default synthetic set at its training settings (``data=synthetic`` of the project's
      ``conf/``: sizes, padding, aspect-ratio batching), and
  (b) 800-px training: a small synthetic set of ~800x1200 images drawn into a temporary folder, loaded
      with the training sizes and padding of ``data=coco`` (shorter side 800, longer at most 1333).
Both data modules are instantiated from the composed configs, as training builds them. The first
batches (worker start-up) are not timed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate

from .cli import lists_to_tuples, option, parse
from .configs import compose_config

PROG = "python -m benchmarks suite=data"


@dataclass
class DataConfig:
    """Settings of the data-loading benchmark (``python -m benchmarks suite=data help``)."""

    workers: int = option(2, "loader worker processes")
    batch_size: int = option(8, "batch of the synthetic case (a); the 800-px case (b) uses 2")
    batches: int = option(40, "timed batches of (a); (b) times half as many (at least 10)")
    warmup: int = option(3, "batches dropped before timing (worker start-up)")
    overrides: tuple[str, ...] = option((), "Hydra overrides of conf/ for both cases, e.g. [data.flip_prob=0]")
    quick: bool = option(False, "tiny sets in a temporary folder, 2 batches (smoke runs)")

    def __post_init__(self) -> None:
        lists_to_tuples(self)


QUICK = {"batches": 2, "warmup": 1, "batch_size": 2}
QUICK_SYNTHETIC = {"num_train": 8, "num_val": 2, "max_objects": 4}


def loader_throughput(dm, *, batches: int, warmup: int = 3) -> float:
    """Images/s of ``dm.train_dataloader()`` over ``batches`` batches after ``warmup`` batches.

    The loader is restarted when it runs out, so a small set gives as many batches as asked for.
    """
    dm.setup("fit")
    loader = dm.train_dataloader()
    n, t0, it = 0, time.perf_counter(), iter(loader)
    for i in range(warmup + batches):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _ = next(it)
        if i == warmup - 1:
            t0 = time.perf_counter()
        elif i >= warmup:
            n += images.shape[0]
    return n / (time.perf_counter() - t0)


def data_overrides(cfg: DataConfig, *, batch_size: int, root: str | None = None, **synthetic) -> list[str]:
    """Overrides of ``data=synthetic`` for a benchmark loader (workers, batch, fixed shuffle seed)."""
    out = [
        "data=synthetic",
        f"data.num_workers={cfg.workers}",
        f"data.batch_size={batch_size}",
        "data.persistent_workers=false",
        "data.pin_memory=false",
        "data.seed=0",
    ]
    if root is not None:
        out.append(f"data.root={root}")
    return out + [f"data.synthetic.{k}={v}" for k, v in synthetic.items()]


def coco_training_overrides() -> list[str]:
    """The training sizes, padding and batching of ``data=coco`` as overrides of another data config."""
    coco = compose_config(["data=coco"]).data
    keys = ("min_size", "max_size", "size_divisor", "aspect_ratio_groups", "flip_prob")
    return [f"data.{k}={_yaml(coco[k])}" for k in keys]


def _yaml(value) -> str:
    from omegaconf import ListConfig

    if isinstance(value, ListConfig):
        return "[" + ",".join(str(v) for v in value) + "]"
    return "null" if value is None else str(value)


def run(cfg: DataConfig) -> dict[str, float]:
    """Images/s of case (a) ``synthetic`` and case (b) ``800px``; prints one line for each."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        quick = QUICK_SYNTHETIC if cfg.quick else {}
        root = str(Path(tmp) / "synthetic") if cfg.quick else None
        over = data_overrides(cfg, batch_size=cfg.batch_size, root=root, **quick)
        data = compose_config([*over, *cfg.overrides]).data
        dm = instantiate(data)
        dm.prepare_data()
        results["synthetic"] = loader_throughput(dm, batches=cfg.batches, warmup=cfg.warmup)
        print(
            f"(a) default synthetic set, train size {data.min_size}/{data.max_size}, divisor {data.size_divisor}, "
            f"batch {cfg.batch_size}, {cfg.workers} workers: {results['synthetic']:.1f} images/s"
        )

        big = {"num_train": 4 if cfg.quick else 48, "num_val": 2 if cfg.quick else 4, "min_side": 800, "max_side": 1200}
        over = data_overrides(cfg, batch_size=2, root=str(Path(tmp) / "big"), **big)
        data = compose_config([*over, *coco_training_overrides(), *cfg.overrides]).data
        dm = instantiate(data)
        dm.prepare_data()
        batches = cfg.batches if cfg.quick else max(cfg.batches // 2, 10)
        results["800px"] = loader_throughput(dm, batches=batches, warmup=cfg.warmup)
    print(
        f"(b) 800-1200 px images, train size {data.min_size}/{data.max_size}, divisor {data.size_divisor}, "
        f"batch 2, {cfg.workers} workers: {results['800px']:.1f} images/s"
    )
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Command-line entry."""
    cfg = parse(
        DataConfig,
        [] if argv is None else argv,
        prog=PROG,
        summary=__doc__.split("\n\n")[0],
        presets=lambda c: [QUICK] if c.quick else [],
    )
    return run(cfg)

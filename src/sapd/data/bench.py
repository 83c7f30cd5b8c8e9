"""Throughput of the training data loader (decode, resize, flip, normalise, collate), in images/s.

``python -m sapd.data.bench [--workers 2] [--batches 40]`` measures
  (a) the default synthetic set at its default training size (conf/data/synthetic.yaml), and
  (b) 800-px training: a small synthetic set of ~800x1200 images drawn into a temporary folder,
      resized to shorter side 800 / longer side at most 1333 (SPEC §6), as COCO training does.
The first batches (worker start-up) are not timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sapd.data.datamodule import COCODataModule, SyntheticCOCODataModule


def loader_throughput(dm: COCODataModule, *, batches: int, warmup: int = 3) -> float:
    """Images/s of ``dm.train_dataloader()`` over ``batches`` batches after ``warmup`` batches."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    n, t0, it = 0, None, iter(loader)
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


def synthetic_train_size() -> tuple[int | list[int], int]:
    """(min_size, max_size) of conf/data/synthetic.yaml when the repository's conf/ is at hand."""
    cfg_file = Path(__file__).resolve().parents[3] / "conf" / "data" / "synthetic.yaml"
    if cfg_file.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(cfg_file)
        return OmegaConf.to_object(cfg.min_size) if not isinstance(cfg.min_size, int) else cfg.min_size, cfg.max_size
    return 256, 384


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sapd.data.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="for the synthetic case; 800 px uses 2")
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args(argv)

    common = {"num_workers": args.workers, "persistent_workers": False, "pin_memory": False, "seed": 0}
    min_size, max_size = synthetic_train_size()
    dm = SyntheticCOCODataModule(batch_size=args.batch_size, min_size=min_size, max_size=max_size, **common)
    dm.prepare_data()
    a = loader_throughput(dm, batches=args.batches)
    print(
        f"(a) default synthetic set, train size {min_size}/{max_size}, batch {args.batch_size}, "
        f"{args.workers} workers: {a:.1f} images/s"
    )

    with tempfile.TemporaryDirectory() as tmp:
        big = {"num_train": 48, "num_val": 4, "min_side": 800, "max_side": 1200}
        dm = SyntheticCOCODataModule(Path(tmp), synthetic=big, batch_size=2, min_size=800, max_size=1333, **common)
        dm.prepare_data()
        b = loader_throughput(dm, batches=max(args.batches // 2, 10))
    print(f"(b) 800-1200 px images, train size 800/1333, batch 2, {args.workers} workers: {b:.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the SAPD training objective alone: targets + losses + selection net.

Times forward + backward of :meth:`SAPD.loss`'s work (ownership, per-point and per-instance losses,
level selection, the feature-selection network, Eq. 6) on fixed head outputs for a batch of images at
800 x 1333 (padded to a multiple of 128), with 1, 10, 100 and 500 instances per image, and the peak
extra resident memory of the 500-instance case.

    python -m sapd.models.bench_assign [--images 2] [--classes 80] [--instances 1 10 100 500]
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import torch

from sapd.models.anchor_points import level_strides
from sapd.models.criterion import SAPDCriterion
from sapd.models.selection import FeatureSelectionNet


def random_targets(num_images: int, num_instances: int, height: int, width: int, num_classes: int, seed: int):
    """COCO-like random boxes: log-uniform sizes 8-600 px, aspect ratio 0.5-2, inside the image."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(num_images):
        size = torch.exp(torch.empty(num_instances).uniform_(math.log(8), math.log(600), generator=g))
        ratio = torch.exp(torch.empty(num_instances).uniform_(math.log(0.5), math.log(2), generator=g))
        w = (size * ratio.sqrt()).clamp(max=width - 1)
        h = (size / ratio.sqrt()).clamp(max=height - 1)
        x1 = torch.rand(num_instances, generator=g) * (width - w)
        y1 = torch.rand(num_instances, generator=g) * (height - h)
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (num_instances,), generator=g)})
    return targets


def head_outputs(num_images: int, height: int, width: int, num_classes: int, channels: int, device):
    """Fixed head outputs (leaf tensors with gradient), as ``SAPD.forward`` returns them."""
    strides = level_strides(5)
    sizes = [(math.ceil(height / s), math.ceil(width / s)) for s in strides]
    p = sum(h * w for h, w in sizes)
    g = torch.Generator().manual_seed(0)
    return {
        "cls_logits": (torch.randn(num_images, p, num_classes, generator=g) - 4).to(device).requires_grad_(),
        "box_reg": torch.rand(num_images, p, 4, generator=g).to(device).requires_grad_(),
        "features": [
            torch.randn(num_images, channels, h, w, generator=g).to(device).requires_grad_() for h, w in sizes
        ],
        "level_sizes": sizes,
    }, strides


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    height = math.ceil(args.height / 128) * 128
    width = math.ceil(args.width / 128) * 128
    out, strides = head_outputs(args.images, height, width, args.classes, args.channels, device)
    selection = FeatureSelectionNet(in_channels=args.channels, channels=args.channels).to(device)
    if args.no_selection:  # to see the selection net's share
        selection = None
    criterion = SAPDCriterion(num_classes=args.classes, soft_select=not args.no_selection)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    # Largest case first so that the resident-memory high-water mark measures it alone.
    for n in sorted(args.instances, reverse=True):
        targets = [
            {k: v.to(device) for k, v in t.items()}
            for t in random_targets(args.images, n, args.height, args.width, args.classes, n)
        ]
        row = {"instances": n}
        for phase in (1, 2):
            times = []
            for rep in range(args.repeats + 1):
                for t in [
                    out["cls_logits"],
                    out["box_reg"],
                    *out["features"],
                    *(selection.parameters() if selection else []),
                ]:
                    t.grad = None
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rss0 = _maxrss_mib()
                sync()
                t0 = time.perf_counter()
                loss = criterion(out, targets, strides, selection, phase)
                loss["total"].backward()
                sync()
                if rep > 0:  # the first pass warms up
                    times.append(time.perf_counter() - t0)
                if n == max(args.instances) and phase == 1 and rep == 0:
                    row["peak_extra_mib"] = (
                        torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _maxrss_mib() - rss0
                    )
            row[f"phase{phase}_ms"] = 1000 * statistics.median(times)
        row["num_pos"] = int(loss["num_pos"])
        row["num_unassigned"] = int(loss["num_unassigned"])
        rows.append(row)
    return sorted(rows, key=lambda r: r["instances"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--channels", type=int, default=256, help="FPN channels seen by the selection net")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 10, 100, 500])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-selection", action="store_true", help="leave the feature-selection net out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print(
        f"SAPD targets + losses + selection net, forward + backward on fixed head outputs: {args.images} images "
        f"{args.height}x{args.width} (padded to multiples of 128), K={args.classes}, C={args.channels}, "
        f"device={args.device}, threads={torch.get_num_threads()}, median of {args.repeats}"
        + (", WITHOUT the selection net" if args.no_selection else "")
    )
    print(f"{'instances/img':>13} {'phase 1 ms':>11} {'phase 2 ms':>11} {'positives':>10} {'unassigned':>11}")
    for r in rows:
        print(
            f"{r['instances']:>13} {r['phase1_ms']:>11.1f} {r['phase2_ms']:>11.1f} "
            f"{r['num_pos']:>10} {r['num_unassigned']:>11}"
        )
    big = max(rows, key=lambda r: r["instances"])
    kind = "peak allocated (CUDA)" if args.device.startswith("cuda") else "resident-memory high-water mark rise"
    print(f"peak extra memory at {big['instances']} instances/img: {big['peak_extra_mib']:.0f} MiB ({kind})")


if __name__ == "__main__":
    main()

"""Benchmark of the SAPD training objective alone: targets + losses + selection net.

``python -m benchmarks suite=assign [key=value ...]`` (``make bench-assign``) times forward + backward
of the criterion (ownership, per-point and per-instance losses, level selection, the
feature-selection network, Eq. 6) on fixed head outputs for a batch of images at 800 x 1333 (padded
to a multiple of ``pad``), with 1, 10, 100 and 500 instances per image, in phase 1 and phase 2, and
the peak extra memory of the largest case. The criterion, the selection net and ``z`` come from the
project's ``conf/`` (``model=sapd``); ``overrides`` change them as on the training command line
(e.g. ``overrides=[model.criterion.topk=2]``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from sapd.models.anchor_points import level_strides

from .cli import lists_to_tuples, option, parse
from .configs import sapd_config
from .measure import frozen_heap, measure_extra_memory, time_call
from .workloads import padded_size, random_targets

PROG = "python -m benchmarks suite=assign"


@dataclass
class AssignConfig:
    """Settings of the assignment benchmark (``python -m benchmarks suite=assign help``)."""

    device: str = option("cpu", "cpu or cuda[:i]")
    threads: int = option(0, "torch threads (0: torch's default)")
    images: int = option(2, "images per batch")
    height: int = option(800, "image height before padding")
    width: int = option(1333, "image width before padding")
    pad: int = option(128, "size divisor of the padded batch (the SAPD collate of COCO: 128)")
    classes: int = option(80, "K, the number of classes")
    channels: int = option(256, "FPN channels seen by the selection net (model.neck.out_channels)")
    instances: tuple[int, ...] = option((1, 10, 100, 500), "instances per image")
    repeats: int = option(3, "timed repetitions (median), after one warm-up")
    selection: bool = option(True, "false: leave the feature-selection net out (and soft selection off)")
    overrides: tuple[str, ...] = option((), "Hydra overrides of conf/, e.g. [model.criterion.topk=2]")
    seed: int = option(0, "seed of the head outputs and the boxes")
    quick: bool = option(False, "256x384 images, 16 channels, 1 and 10 instances, 1 repetition (smoke runs)")

    def __post_init__(self) -> None:
        lists_to_tuples(self)


QUICK = {"height": 256, "width": 384, "channels": 16, "instances": (1, 10), "repeats": 1}


@dataclass
class LossPart:
    """What the benchmark runs: the configured criterion, selection net, strides and box coding ``z``."""

    criterion: object
    selection: nn.Module | None
    strides: list[int]
    z: float


def build_loss_part(cfg: AssignConfig) -> LossPart:
    """The criterion and selection net of ``model=sapd`` composed with ``cfg``'s channels and overrides."""
    extra = [f"model.neck.out_channels={cfg.channels}", f"model.selection.channels={cfg.channels}"]
    if not cfg.selection:  # no selection net, so no soft selection (phase 2 = phase 1 on every level)
        extra += ["model.selection=null", "model.criterion.soft_select=false"]
    model = sapd_config(extra=[*extra, *cfg.overrides]).model
    num_levels = int(model.neck.num_levels)
    selection = None
    if model.selection is not None:
        make = instantiate(model.selection)
        selection = make(in_channels=cfg.channels, num_levels=num_levels).to(cfg.device)
    return LossPart(
        criterion=instantiate(model.criterion),
        selection=selection,
        strides=level_strides(num_levels),
        z=float(model.z),
    )


def head_outputs(
    num_images: int,
    size: tuple[int, int],
    num_classes: int,
    channels: int,
    strides: Sequence[int],
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict:
    """Fixed head outputs of a padded ``size`` batch as ``SAPD.forward`` returns them, as leaf tensors
    with gradient: ``cls_logits`` [N, P, K] around the prior (-4), ``box_reg`` [N, P, 4], ``features``."""
    h, w = size
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in strides]
    points = sum(a * b for a, b in sizes)
    g = torch.Generator().manual_seed(seed)
    return {
        "cls_logits": (torch.randn(num_images, points, num_classes, generator=g) - 4).to(device).requires_grad_(),
        "box_reg": torch.rand(num_images, points, 4, generator=g).to(device).requires_grad_(),
        "features": [
            torch.randn(num_images, channels, a, b, generator=g).to(device).requires_grad_() for a, b in sizes
        ],
        "level_sizes": sizes,
    }


def loss_step(part: LossPart, outputs: dict, targets: list[dict[str, Tensor]], phase: int):
    """One forward + backward of the loss part; returns a call that does it and returns the loss dict."""
    leaves = [outputs["cls_logits"], outputs["box_reg"], *outputs["features"]]
    params = list(part.selection.parameters()) if part.selection is not None else []

    def run() -> dict[str, Tensor]:
        for t in leaves + params:
            t.grad = None
        losses = part.criterion(outputs, targets, part.strides, part.selection, phase, z=part.z)
        losses["total"].backward()
        return losses

    return run


def measure_case(
    part: LossPart,
    outputs: dict,
    targets: list[dict[str, Tensor]],
    phase: int,
    *,
    repeats: int,
    device: torch.device | str = "cpu",
) -> dict:
    """Median milliseconds of ``repeats`` timed calls after one warm-up, and the criterion's counts.

    Returns:
        ``ms``, ``num_pos`` (positive points of the batch) and ``num_unassigned`` (instances with no
        candidate point), as the criterion reports them.
    """
    step = loss_step(part, outputs, targets, phase)
    _, losses = time_call(step, device)  # warm-up
    times = [time_call(step, device)[0] for _ in range(repeats)]
    return {
        "ms": 1000 * statistics.median(times) if times else float("nan"),
        "num_pos": int(losses["num_pos"]),
        "num_unassigned": int(losses["num_unassigned"]),
    }


def run(cfg: AssignConfig) -> list[dict]:
    """One row per instance count: ``phase1_ms``, ``phase2_ms``, ``num_pos``, ``num_unassigned`` (phase 2),
    and ``peak_extra_mib`` for the largest count (its first phase-1 call, measured alone)."""
    device = torch.device(cfg.device)
    part = build_loss_part(cfg)
    size = padded_size((cfg.height, cfg.width), cfg.pad)
    out = head_outputs(cfg.images, size, cfg.classes, cfg.channels, part.strides, device, cfg.seed)
    biggest = max(cfg.instances)
    rows = []
    with frozen_heap():
        # Largest case first so that its memory is measured before smaller cases have run.
        for n in sorted(cfg.instances, reverse=True):
            gen = torch.Generator().manual_seed(cfg.seed + n)
            targets = random_targets(cfg.images, n, (cfg.height, cfg.width), cfg.classes, gen)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            row: dict = {"instances": n}
            if n == biggest:
                mem = measure_extra_memory(loss_step(part, out, targets, 1), device)
                row["peak_extra_mib"] = mem["extra_bytes"] / 2**20
            for phase in (1, 2):
                case = measure_case(part, out, targets, phase, repeats=cfg.repeats, device=device)
                row[f"phase{phase}_ms"] = case["ms"]
                row["num_pos"], row["num_unassigned"] = case["num_pos"], case["num_unassigned"]
            rows.append(row)
    return sorted(rows, key=lambda r: r["instances"])


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Command-line entry: run and print the table."""
    cfg = parse(
        AssignConfig,
        [] if argv is None else argv,
        prog=PROG,
        summary=__doc__.split("\n\n")[0],
        presets=lambda c: [QUICK] if c.quick else [],
    )
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rows = run(cfg)
    hp, wp = padded_size((cfg.height, cfg.width), cfg.pad)
    print(
        f"SAPD targets + losses + selection net, forward + backward on fixed head outputs: {cfg.images} images "
        f"{cfg.height}x{cfg.width} (padded to {hp}x{wp}), K={cfg.classes}, C={cfg.channels}, "
        f"device={cfg.device}, threads={torch.get_num_threads()}, median of {cfg.repeats}"
        + ("" if cfg.selection else ", WITHOUT the selection net")
    )
    print(f"{'instances/img':>13} {'phase 1 ms':>11} {'phase 2 ms':>11} {'positives':>10} {'unassigned':>11}")
    for r in rows:
        print(
            f"{r['instances']:>13} {r['phase1_ms']:>11.1f} {r['phase2_ms']:>11.1f} "
            f"{r['num_pos']:>10} {r['num_unassigned']:>11}"
        )
    big = max(rows, key=lambda r: r["instances"])
    kind = "allocator peak (CUDA)" if cfg.device.startswith("cuda") else "resident-memory high-water mark rise"
    print(f"peak extra memory at {big['instances']} instances/img: {big['peak_extra_mib']:.0f} MiB ({kind})")
    return rows

"""Pictures that explain how SAPD's soft weights and level selection treat objects of each size, drawn
by the command ``python -m sapd.analysis ckpt_path=CKPT [out=DIR] [batches=N]`` (:mod:`sapd.analysis`,
config ``conf/analysis.yaml``); without ``out=`` the pictures go to the checkpoint's run folder,
``<run>/analysis/``.

From a trained checkpoint and its own training / validation data, three PNG files:

- ``f_by_size.png``: f of Eq. 4 on the positives of FSAF-style selection, by object size, for each
  valid-region rule (``cell_overlap``, ``centre``): the median and quartiles over points, and the
  best point of each object.
- ``weight_share_by_size.png``: the share of the positives' total weight sum w (the Eq. 6
  normaliser) held by objects of each size, for FSAF, +SW and +SW+SS, under each combination of
  valid region and soft-weight normalisation, beside the share of objects of that size.
- ``selection_by_size.png``: the selection net's probability of each pyramid level, averaged over
  validation objects of each size; ``selection_examples.png``: the paper's Fig. 7, validation
  images with their true boxes and the selection net's level probabilities as bars beside each box.

Sizes are sqrt(area) in pixels of the network input (training scale for training data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import Tensor

from sapd.checkpoint import load_module
from sapd.diagnostics.detections import unnormalize
from sapd.errors import UserError
from sapd.models.anchor_points import level_name
from sapd.models.criterion import SAPDCriterion

SIZE_EDGES = (0.0, 8.0, 16.0, 32.0, 64.0, 128.0, float("inf"))
SIZE_NAMES = ("< 8", "8-16", "16-32", "32-64", "64-128", "> 128")
ROWS = {"FSAF": (False, False, 1), "+SW": (True, False, 1), "+SW+SS": (True, True, 2)}  # sw, ss, phase
SETTINGS = [(v, n) for v in ("cell_overlap", "centre") for n in ("none", "level_max")]


class AnalysisError(UserError):
    """A checkpoint these pictures cannot be drawn for."""


def size_bin(boxes: Tensor) -> Tensor:
    """Index into ``SIZE_NAMES`` of each box's sqrt(area) (LongTensor[M])."""
    side = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    edges = torch.tensor(SIZE_EDGES[1:-1], dtype=side.dtype)
    return torch.bucketize(side, edges, right=True)


def _batches(loader, limit: int) -> Iterator:
    for i, batch in enumerate(loader):
        if i >= limit:
            return
        yield batch


@torch.no_grad()
def weight_statistics(net, batches: Sequence) -> dict:
    """Per criterion setting: f of each positive with its object's size bin, and w summed by size bin.

    Returns:
        dict with ``objects`` (LongTensor[B]: objects per size bin), ``f[(valid_region)]`` (list of
        (f, bin) tensors of FSAF-selected positives with soft weights on), ``best_f[(valid_region)]``
        (best f of each object, with bins), ``share[(row, valid_region, norm)]`` (FloatTensor[B]) and
        ``weight_ratio[(row, valid_region, norm)]`` (float: the positives' weight sum over their number,
        the factor by which ``normaliser=num_pos`` scales the loss against the paper's ``weight_sum``).
    """
    nb = len(SIZE_NAMES)
    objects = torch.zeros(nb)
    f_pairs: dict[str, list[tuple[Tensor, Tensor]]] = {v: [] for v, _ in SETTINGS}
    best_f: dict[str, list[tuple[Tensor, Tensor]]] = {v: [] for v, _ in SETTINGS}
    sums = {(row, v, n): torch.zeros(nb) for row in ROWS for v, n in SETTINGS}
    num_pos = dict.fromkeys(sums, 0)
    base: SAPDCriterion = net.criterion
    for images, targets in batches:
        out = net(images)
        boxes = torch.cat([t["boxes"].float().reshape(-1, 4) for t in targets])
        bins = size_bin(boxes)
        objects += torch.bincount(bins, minlength=nb).float()
        for row, (sw, ss, phase) in ROWS.items():
            for valid, norm in SETTINGS:
                crit = dataclasses.replace(
                    base, soft_weight=sw, soft_select=ss, valid_region=valid, soft_weight_norm=norm
                )
                a = crit.assignment(out, targets, net.strides, net.selection, phase, z=net.z)
                sums[(row, valid, norm)] += torch.bincount(bins[a.instance], a.weight, minlength=nb)
                num_pos[(row, valid, norm)] += a.weight.numel()
                if row == "+SW" and norm == "none":  # w = f: phase-1 selection, soft weights, Eq. 4 as printed
                    f_pairs[valid].append((a.weight, bins[a.instance]))
                    best = torch.zeros(len(boxes)).scatter_reduce_(0, a.instance, a.weight, reduce="amax")
                    has = torch.zeros(len(boxes), dtype=torch.bool)
                    has[a.instance] = True
                    best_f[valid].append((best[has], bins[has]))
    cat = {k: (torch.cat([f for f, _ in v]), torch.cat([b for _, b in v])) for k, v in f_pairs.items()}
    best = {k: (torch.cat([f for f, _ in v]), torch.cat([b for _, b in v])) for k, v in best_f.items()}
    share = {k: v / v.sum().clamp(min=1e-12) for k, v in sums.items()}
    ratio = {k: v.sum().item() / max(num_pos[k], 1) for k, v in sums.items()}
    return {"objects": objects, "f": cat, "best_f": best, "share": share, "weight_ratio": ratio}


@torch.no_grad()
def selection_statistics(net, batches: Sequence) -> tuple[Tensor, Tensor, list]:
    """Mean level probability of the selection net per size bin ([B, L]), object counts ([B]), and the
    first batch's (image, target, probs) triples for drawing."""
    nb, nl = len(SIZE_NAMES), net.num_levels
    totals, counts, examples = torch.zeros(nb, nl), torch.zeros(nb), []
    for images, targets in batches:
        out = net(images)
        boxes = torch.cat([t["boxes"].float().reshape(-1, 4) for t in targets])
        if not len(boxes):
            continue
        owner = torch.repeat_interleave(torch.arange(len(targets)), torch.tensor([len(t["boxes"]) for t in targets]))
        probs = net.selection(out["features"], boxes, owner, net.strides).softmax(-1)  # [M, L]
        bins = size_bin(boxes)
        totals.index_add_(0, bins, probs)
        counts += torch.bincount(bins, minlength=nb).float()
        if not examples:
            examples = [(images[i], targets[i], probs[owner == i]) for i in range(len(targets))]
    return totals / counts.clamp(min=1)[:, None], counts, examples


def share_table(stats: dict) -> str:
    """The weight shares of ``weight_share_by_size.png`` (and the median f of positives) as markdown."""
    objects = stats["objects"] / stats["objects"].sum().clamp(min=1)
    head = ["setting", "row", *SIZE_NAMES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| share of objects | | " + " | ".join(f"{100 * v:.1f}" for v in objects.tolist()) + " |")
    for valid, norm in SETTINGS:
        for row in ROWS:
            share = stats["share"][(row, valid, norm)]
            cells = " | ".join(f"{100 * v:.1f}" for v in share.tolist())
            lines.append(f"| {valid}, {norm} | {row} | {cells} |")
    for valid in ("cell_overlap", "centre"):
        f, bins = stats["f"][valid]
        med = [f"{f[bins == b].median().item():.2f}" if (bins == b).any() else "-" for b in range(len(SIZE_NAMES))]
        lines.append(f"| {valid} | median f of +SW positives | " + " | ".join(med) + " |")
    lines += [
        "",
        "Weight sum of the positives over their number: the factor by which `normaliser=num_pos` scales the"
        " detection loss against the paper's weight sum (FSAF: 1; +SW+SS counts its points on every selected level)",
        "",
        "| setting | " + " | ".join(ROWS) + " |",
        "|" + "---|" * (len(ROWS) + 1),
    ]
    for valid, norm in SETTINGS:
        ratios = (stats["weight_ratio"][(r, valid, norm)] for r in ROWS)
        lines.append(f"| {valid}, {norm} | " + " | ".join(f"{v:.2f}" for v in ratios) + " |")
    return "\n".join(lines)


def _plot_f(stats: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    x = torch.arange(len(SIZE_NAMES)).float()
    for ax, key, title in (
        (axes[0], "f", "f of every positive point (FSAF level selection)"),
        (axes[1], "best_f", "f of each object's best point"),
    ):
        for k, (valid, colour) in enumerate((("cell_overlap", "tab:red"), ("centre", "tab:blue"))):
            f, bins = stats[key][valid]
            med, lo, hi = [], [], []
            for b in range(len(SIZE_NAMES)):
                v = f[bins == b]
                q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75])) if len(v) else torch.full((3,), float("nan"))
                lo.append(q[0]), med.append(q[1]), hi.append(q[2])
            xs = x + (k - 0.5) * 0.15
            med_t, lo_t, hi_t = torch.stack(med), torch.stack(lo), torch.stack(hi)
            ax.errorbar(xs, med_t, yerr=[med_t - lo_t, hi_t - med_t], fmt="o-", color=colour, capsize=4, label=valid)
        ax.set_xticks(x, SIZE_NAMES)
        ax.set_xlabel("object size sqrt(area) at training scale (px)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("f (Eq. 4, eta = 1): median and quartiles")
    axes[0].legend(title="valid region")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_share(stats: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey=True)
    x = torch.arange(len(SIZE_NAMES)).float()
    objects = stats["objects"] / stats["objects"].sum().clamp(min=1)
    colours = {"FSAF": "tab:grey", "+SW": "tab:orange", "+SW+SS": "tab:green"}
    for ax, (valid, norm) in zip(axes.flat, SETTINGS):
        for k, row in enumerate(ROWS):
            ax.bar(x + (k - 1) * 0.25, stats["share"][(row, valid, norm)] * 100, 0.25, label=row, color=colours[row])
        ax.plot(x, objects * 100, "k_", markersize=28, mew=2, label="share of objects")
        ax.set_title(f"valid_region={valid}, soft_weight_norm={norm}", fontsize=10)
        ax.set_xticks(x, SIZE_NAMES)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("object size sqrt(area) at training scale (px)")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of sum w over positives (%)")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_selection(mean: Tensor, counts: Tensor, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = torch.zeros(len(SIZE_NAMES))
    for lvl in range(mean.shape[1]):
        ax.bar(SIZE_NAMES, mean[:, lvl], bottom=bottom, label=level_name(lvl))
        bottom += mean[:, lvl]
    for i, n in enumerate(counts.tolist()):
        ax.text(i, 1.01, f"n={int(n)}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("object size sqrt(area) at evaluation scale (px)")
    ax.set_ylabel("mean selection probability w_l^B")
    ax.set_title("Feature-selection net: level probabilities by object size (validation)", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_examples(examples: list, class_names: Sequence[str] | None, path: Path, num: int = 4) -> None:
    """Fig. 7 of the paper: each image with its (up to four largest) true boxes numbered, and below it
    the selection net's probability of every level for each box, in the box's colour."""
    import matplotlib.pyplot as plt

    examples = [e for e in examples if len(e[1]["boxes"])][:num]
    if not examples:
        return
    colours = ("tab:red", "tab:blue", "tab:orange", "tab:purple")
    fig, axes = plt.subplots(
        2, len(examples), figsize=(4.2 * len(examples), 6.6), squeeze=False, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    for col, (image, target, probs) in enumerate(examples):
        h, w = (int(v) for v in target["img_size"])
        boxes, labels = target["boxes"], target["labels"]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = torch.argsort(area, descending=True)[: len(colours)]
        ax, bars = axes[0, col], axes[1, col]
        ax.imshow(unnormalize(image).crop((0, 0, w, h)))
        num_levels = probs.shape[1]
        width = 0.8 / len(order)
        for k, i in enumerate(order.tolist()):
            x1, y1, x2, y2 = boxes[i].tolist()
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colours[k], lw=2))
            ax.text(
                x1 + 2, y1 + 2, str(k + 1), color="white", fontsize=9, va="top", bbox={"color": colours[k], "pad": 1}
            )
            name = class_names[int(labels[i])] if class_names else str(int(labels[i]))
            side = float(area[i].sqrt())
            xs = torch.arange(num_levels) + (k - (len(order) - 1) / 2) * width
            bars.bar(xs, probs[i].tolist(), width, color=colours[k], label=f"{k + 1}: {name}, {side:.0f} px")
        ax.set_axis_off()
        bars.set_xticks(range(num_levels), [level_name(i) for i in range(num_levels)])
        bars.set_ylim(0, 1)
        bars.set_ylabel("w_l^B" if col == 0 else "")
        bars.legend(fontsize=7, loc="upper right")
        bars.grid(axis="y", alpha=0.3)
    fig.suptitle("Selection net: level probabilities of each true box (sqrt(area) at evaluation scale)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def analyse(ckpt_path: str | Path, out_dir: str | Path, num_batches: int = 20) -> list[Path]:
    """Writes the four pictures for ``ckpt_path`` into ``out_dir``; returns their paths."""
    module, run_cfg = load_module(ckpt_path)
    net = module.net.float().eval()
    if not hasattr(net, "criterion") or net.selection is None:
        raise AnalysisError(
            f"{ckpt_path} is not a SAPD model with a feature-selection net: give a checkpoint of a SAPD run"
        )
    datamodule = instantiate(run_cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    stats = weight_statistics(net, list(_batches(datamodule.train_dataloader(), num_batches)))
    mean, counts, examples = selection_statistics(net, list(_batches(datamodule.val_dataloader(), num_batches)))
    paths = [out_dir / n for n in ("f_by_size.png", "weight_share_by_size.png", "selection_by_size.png")]
    _plot_f(stats, paths[0])
    _plot_share(stats, paths[1])
    _plot_selection(mean, counts, paths[2])
    paths.append(out_dir / "selection_examples.png")
    _plot_examples(examples, module.class_names, paths[3])
    paths.append(out_dir / "weight_share_by_size.md")
    paths[4].write_text(
        f"Share of the positives' weight sum (%) by object size, from {ckpt_path} ({num_batches} training batches)\n\n"
        + share_table(stats)
        + "\n"
    )
    return [p for p in paths if p.is_file()]


def default_out(ckpt_path: str | Path) -> Path:
    """``<run>/analysis``: the run folder of a checkpoint in ``<run>/checkpoints/``, else the checkpoint's folder."""
    folder = Path(ckpt_path).parent
    run = folder.parent if folder.name == "checkpoints" else folder
    return run / "analysis"

"""Precision, recall and F1 of a checkpoint's boxes by score threshold: how ``predict``'s default was chosen.

``python -m benchmarks.score_threshold ckpt_path=PATH [thresholds=[0.1,0.2]] [iou=0.5] [limit=N] ...``

Runs :class:`sapd.Detector` over the validation images of the checkpoint's own data config (the
synthetic set is drawn into ``data_dir`` if it is not cached there) and counts, for every threshold,
the detections kept (score >= threshold), the true positives (same category, IoU >= ``iou`` with a
ground-truth box not matched by a higher-scoring detection: greedy in score order, as COCO matches)
and the ground-truth boxes found. The ground truth is the data set's evaluation ground truth
(:meth:`sapd.data.coco.COCODetection.ground_truth`): boxes evaluation drops (no width or height)
are not counted. A detection that matches no box but lies mostly inside a crowd region of its
category (intersection / its area >= ``iou``) is ignored, as COCOeval ignores it.
Because matching runs in score order, a detection's outcome does not depend on the detections below
it, so one matching at the lowest threshold gives every threshold's counts. Prints one markdown
table and the threshold with the highest F1 = 2PR / (P + R).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.ops import box_iou

from .cli import option, parse

PROG = "python -m benchmarks.score_threshold"


@dataclass
class Config:
    ckpt_path: str = option("???", "sapd training checkpoint (its data config names the validation set)")
    thresholds: list[float] = field(
        default_factory=lambda: [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5],
        metadata={"help": "score thresholds to tabulate"},
    )
    iou: float = option(0.5, "IoU for a detection to count as a true positive")
    limit: int | None = option(None, "use the first N validation images (null: all)")
    batch_size: int = option(8, "images per forward pass")
    device: str = option("auto", "auto | cpu | cuda")
    num_threads: int | None = option(None, "torch intra-op threads (null: torch's default)")
    data_dir: str | None = option(None, "cache of synthetic sets (null: $SAPD_DATA_DIR or ~/.cache/sapd)")


def match_in_score_order(
    boxes: torch.Tensor,
    cats: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_cats: torch.Tensor,
    gt_crowd: torch.Tensor,
    iou: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy matching of detections (sorted by decreasing score) to ground truth.

    Returns:
        ``tp`` BoolTensor[D] (matched a non-crowd box of its category) and ``ignored`` BoolTensor[D]
        (no match, but inside a crowd region of its category).
    """
    d = len(boxes)
    tp = torch.zeros(d, dtype=torch.bool)
    ignored = torch.zeros(d, dtype=torch.bool)
    if d == 0 or len(gt_boxes) == 0:
        return tp, ignored
    same = cats[:, None] == gt_cats[None, :]  # [D, G]
    ious = torch.where(same & ~gt_crowd[None, :], box_iou(boxes, gt_boxes), torch.zeros(()))  # [D, G]
    free = torch.ones(len(gt_boxes), dtype=torch.bool)
    for i in range(d):  # score order: each detection takes the best box still free
        cand = torch.where(free, ious[i], torch.full_like(ious[i], -1.0))
        best = int(cand.argmax())
        if cand[best] >= iou:
            tp[i] = True
            free[best] = False
    if gt_crowd.any():
        lt = torch.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
        rb = torch.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)  # [D, G]
        area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1).clamp(min=1e-6)  # [D]
        ioa = inter / area[:, None]
        in_crowd = ((ioa >= iou) & same & gt_crowd[None, :]).any(1)
        ignored = ~tp & in_crowd
    return tp, ignored


def counts_by_threshold(
    scores: torch.Tensor, tp: torch.Tensor, ignored: torch.Tensor, thresholds: Sequence[float]
) -> list[tuple[int, int]]:
    """(detections kept, true positives) at each threshold, crowd-ignored detections not counted."""
    counted = ~ignored
    return [(int((counted & (scores >= t)).sum()), int((tp & (scores >= t)).sum())) for t in thresholds]


def table(rows: list[dict], num_gt: int) -> str:
    lines = [
        f"ground-truth boxes (non-crowd): {num_gt}",
        "",
        "| score ≥ | detections | true pos. | precision | recall | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, rec, f1 = r["precision"], r["recall"], r["f1"]
        lines.append(f"| {r['thresh']:.2f} | {r['dets']} | {r['tp']} | {p:.3f} | {rec:.3f} | {f1:.3f} |")
    best = max(rows, key=lambda r: r["f1"])
    lines += ["", f"highest F1: {best['f1']:.3f} at score ≥ {best['thresh']:.2f}"]
    return "\n".join(lines)


def measure(cfg: Config) -> tuple[list[dict], int]:
    from hydra.utils import instantiate

    from sapd import Detector

    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    thresholds = sorted(float(t) for t in cfg.thresholds)
    det = Detector.from_checkpoint(cfg.ckpt_path, device=cfg.device, score_thresh=thresholds[0])
    data_cfg = det.run_config.data
    extra = {}
    if str(data_cfg.get("_target_", "")).endswith("SyntheticCOCODataModule"):
        extra["cache_dir"] = cfg.data_dir or os.environ.get("SAPD_DATA_DIR") or str(Path.home() / ".cache/sapd")
    datamodule = instantiate(data_cfg, **extra)
    datamodule.prepare_data()
    datamodule.setup("validate")
    ds = datamodule.val_dataset
    coco = ds.coco
    ids = list(ds.ids)[: cfg.limit] if cfg.limit else list(ds.ids)
    paths = [Path(ds.img_dir) / coco.imgs[i]["file_name"] for i in ids]
    num_gt = 0
    all_scores, all_tp, all_ignored = [], [], []
    for index, result in det.stream(paths, batch_size=cfg.batch_size):
        # the ground truth evaluation scores (degenerate boxes it drops are not counted), by contiguous label
        truth = {k: torch.from_numpy(v) for k, v in ds.ground_truth(ids[index]).items()}
        crowd = truth["iscrowd"].bool()
        num_gt += int((~crowd).sum())
        tp, ignored = match_in_score_order(result.boxes, result.labels, truth["boxes"], truth["labels"], crowd, cfg.iou)
        all_scores.append(result.scores)
        all_tp.append(tp)
        all_ignored.append(ignored)
    scores, tp, ignored = torch.cat(all_scores), torch.cat(all_tp), torch.cat(all_ignored)
    rows = []
    for t, (n, k) in zip(thresholds, counts_by_threshold(scores, tp, ignored, thresholds)):
        precision = k / n if n else 1.0
        recall = k / num_gt if num_gt else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"thresh": t, "dets": n, "tp": k, "precision": precision, "recall": recall, "f1": f1})
    return rows, num_gt


def main(argv: Sequence[str] | None = None) -> list[dict]:
    import sys

    cfg = parse(Config, sys.argv[1:] if argv is None else argv, prog=PROG, summary=__doc__.strip().splitlines()[0])
    if cfg.ckpt_path in ("???", ""):
        raise SystemExit(f"{PROG}: error: give the checkpoint: ckpt_path=PATH")
    rows, num_gt = measure(cfg)
    print(table(rows, num_gt))
    return rows


if __name__ == "__main__":
    main()

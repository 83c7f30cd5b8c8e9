"""The COCO evaluator, without Lightning: what a validation or test pass collects, gathers and scores.

:class:`COCOEvaluator` owns one evaluation pass. In each process it collects the image ids, the metric's
per-image states (torchmetrics' :class:`~torchmetrics.detection.MeanAveragePrecision`, the metric
interface) and the COCO results entries; at the end of the pass every process's share goes to rank 0,
which keeps each image once (:func:`merge_evaluations`), scores it once and broadcasts the numbers, so
every rank returns the same :class:`Evaluation`.

The scoring engine behind the metric is ``hotcoco`` (a Rust COCOeval): its 12 stats and its
precision/recall arrays equal pycocotools' on sapd's detections, crowd regions and empty results
(``tests/test_evaluation.py``; figures and timings in docs/benchmarks.md, "COCO scoring engines"), and it
scores a COCO-sized set far faster. ``faster_coco_eval`` and ``pycocotools`` (torchmetrics' own backends) stay
selectable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sapd.evaluation.class_metrics import ClassMetrics, class_metrics_from_coco
from sapd.evaluation.engines import coco_metric

log = logging.getLogger(__name__)

# The COCO numbers logged after each evaluation (torchmetrics' names), as ``<stage>/<key>``.
COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")

# The states of torchmetrics' MeanAveragePrecision (iou_type="bbox") that hold one entry per image, in update order.
BOX_STATES = (
    "detection_box",
    "detection_scores",
    "detection_labels",
    "groundtruth_box",
    "groundtruth_labels",
    "groundtruth_crowds",
    "groundtruth_area",
)


def eval_targets(targets: Sequence[dict[str, Any]]) -> list[dict[str, Tensor]]:
    """Ground truth as COCOeval sees it (original pixels, crowd flags, annotation areas)."""
    return [
        {
            "boxes": t["eval_boxes"].float(),
            "labels": t["eval_labels"].long(),
            "iscrowd": t["eval_iscrowd"].long(),
            "area": t["eval_area"].float(),
        }
        for t in targets
    ]


def coco_results(
    dets: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Any]], label_to_cat_id: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Detections as COCO results entries (xywh in the annotation file's frame, original category ids, 2
    decimals, 5 for scores)."""
    from sapd.data.coco import to_annotation_frame

    results = []
    for det, target in zip(dets, targets):
        image_id = int(target["image_id"])
        boxes = to_annotation_frame(det["boxes"].detach().cpu(), target)  # unturned where annotated unturned
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = det["scores"].detach().cpu().tolist()
        labels = det["labels"].detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels):
            cat = label_to_cat_id[label] if label_to_cat_id is not None else int(label)
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(cat),
                    "bbox": [round(v, 2) for v in box],
                    "score": round(float(score), 5),
                }
            )
    return results


def _first_visits(results: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """COCO results entries by image id, of each image's first visit (its first run of consecutive entries)."""
    runs: dict[int, list[dict[str, Any]]] = {}
    done: set[int] = set()
    previous = None
    for entry in results:
        image_id = int(entry["image_id"])
        if image_id != previous:
            if previous is not None:
                done.add(previous)
            previous = image_id
        if image_id not in done:
            runs.setdefault(image_id, []).append(entry)
    return runs


def merge_evaluations(
    shares: Sequence[dict[str, Any]],
) -> tuple[dict[str, list[Tensor]], list[dict[str, Any]], int]:
    """Every image once, from the evaluations of the processes (:meth:`COCOEvaluator.share`).

    Each share holds ``image_ids`` (the images in the order the metric saw them, or None when
    unknown), ``states`` (the metric's per-image lists, :data:`BOX_STATES`) and ``results`` (COCO
    results entries). An image seen more than once (a padding sampler repeats images to even the
    shares) is kept from the first share and visit that has it; a share without ``image_ids`` is
    kept whole.

    Returns:
        (the merged metric states, the merged results entries, the number of repeats dropped).
    """
    states: dict[str, list[Tensor]] = {}
    results: list[dict[str, Any]] = []
    seen: set[int] = set()
    repeated = 0
    for share in shares:
        ids, per_image = share["image_ids"], share["states"]
        for name in per_image:
            states.setdefault(name, [])
        if ids is None:
            for name, values in per_image.items():
                states[name].extend(values)
            results.extend(share["results"])
            seen.update(int(r["image_id"]) for r in share["results"])
            continue
        visits = _first_visits(share["results"])
        for i, image_id in enumerate(ids):
            if image_id in seen:
                repeated += 1
                continue
            seen.add(image_id)
            for name, values in per_image.items():
                states[name].append(values[i])
            results.extend(visits.pop(image_id, []))
        for image_id, entries in visits.items():  # results of images the share does not list (none expected)
            if image_id not in seen:
                seen.add(image_id)
                results.extend(entries)
    return states, results, repeated


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_shares(share: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every process's share on rank 0 (in rank order), None on the other ranks; [share] in one process."""
    if not _distributed():
        return [share]
    shares: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(share, shares, dst=0)
    return shares


# ---------------------------------------------------------------------------------------- the evaluator
@dataclass(frozen=True)
class Evaluation:
    """The outcome of one evaluation pass, the same on every process.

    Attributes:
        stage: ``"val"`` or ``"test"``.
        step: the global training step of the weights that were evaluated.
        table: the COCO numbers (:data:`COCO_KEYS`); empty when nothing was scored (no image with ground
            truth or detections).
        class_metrics: per-class AP and PR curves (None when nothing was scored).
        num_results: COCO results entries collected (written to the results file on rank 0).
        states: the scored ground truth and detections, torchmetrics' per-image lists (:data:`BOX_STATES`),
            for the report's error analysis; on rank 0 only (None elsewhere, and when nothing was scored).
    """

    stage: str
    step: int
    table: dict[str, float] = field(default_factory=dict)
    class_metrics: ClassMetrics | None = None
    num_results: int = 0
    states: dict[str, list[Tensor]] | None = field(default=None, repr=False)


class COCOEvaluator:
    """Collects, gathers and scores one evaluation pass at a time (see the module's docstring).

    Args:
        label_to_cat_id: contiguous label -> COCO category id (results entries; the number of classes).
        engine: the COCOeval implementation (:data:`ENGINES`).
    """

    def __init__(self, label_to_cat_id: Sequence[int] | None = None, engine: str = "hotcoco") -> None:
        self.label_to_cat_id = list(label_to_cat_id) if label_to_cat_id is not None else None
        self.engine = engine
        self.metric = coco_metric(engine)
        self.result: Evaluation | None = None  # the latest pass's outcome
        self.image_ids: list[int] = []  # this process's images, in the metric's order
        self.results: list[dict[str, Any]] = []  # this process's COCO results entries

    def reset(self) -> None:
        """Forgets what this process collected (the start of a pass)."""
        self.metric.reset()
        self.image_ids, self.results = [], []

    def update(
        self,
        dets: Sequence[dict[str, Tensor]],
        targets: Sequence[dict[str, Any]],
        *,
        score: bool = True,
        collect_results: bool = False,
    ) -> None:
        """Adds one batch: its detections (original pixels) scored against ``targets``' ``eval_*`` ground truth
        when ``score`` (a split with annotations), and as COCO results entries when ``collect_results``."""
        image_ids = [int(t["image_id"]) for t in targets]
        self.image_ids.extend(image_ids)  # also without scoring: they tell a repeated image's results entries
        if score:
            self.metric.update(
                [{k: d[k].detach() for k in ("boxes", "scores", "labels")} for d in dets], eval_targets(targets)
            )
        if collect_results:
            self.results.extend(coco_results(dets, targets, self.label_to_cat_id))

    def share(self) -> dict[str, Any]:
        """This process's evaluation: image ids, the metric's per-image states (on the CPU) and results entries."""
        states = {name: [v.detach().cpu() for v in getattr(self.metric, name)] for name in BOX_STATES}
        states = {name: values for name, values in states.items() if values}
        ids: list[int] | None = list(self.image_ids)
        if any(len(values) != len(ids) for values in states.values()):
            ids = None  # the metric was updated outside update(): nothing to match its entries with
        return {"image_ids": ids, "states": states, "results": list(self.results)}

    def finish(
        self, stage: str, step: int, results_file: str | Path | None = None
    ) -> tuple[Evaluation, list[dict[str, Any]]]:
        """The end of a pass, in one process or under DDP; resets what was collected.

        Every process's share goes to rank 0, which keeps each image once (:func:`merge_evaluations`),
        scores once and writes ``results_file`` (when given); the outcome is then broadcast, so every
        rank returns the same :class:`Evaluation` (also kept as :attr:`result`). The merged results
        entries are returned on rank 0 (an empty list elsewhere).
        """
        shares = gather_shares(self.share())
        self.image_ids, self.results = [], []
        outcome: tuple[dict[str, float], ClassMetrics | None, int] = ({}, None, 0)
        results: list[dict[str, Any]] = []
        scored: dict[str, list[Tensor]] | None = None
        if shares is not None:  # rank 0, or the only process
            states, results, repeated = merge_evaluations(shares)
            if repeated:
                log.warning("%d repeated evaluations of an image were dropped: each image is scored once", repeated)
            for name, values in states.items():
                setattr(self.metric, name, values)
            if self.metric.groundtruth_labels or self.metric.detection_labels:
                scored = {name: list(getattr(self.metric, name)) for name in BOX_STATES}
            table, per_class = self.score()  # resets the metric
            outcome = (table, per_class, len(results))
            if results_file:
                write_results(results_file, results)
        else:
            self.metric.reset()
        if _distributed():
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        table, per_class, num_results = outcome
        self.result = Evaluation(stage, int(step), table, per_class, num_results, scored)
        return self.result, results

    def score(self) -> tuple[dict[str, float], ClassMetrics | None]:
        """The COCO numbers (:data:`COCO_KEYS`) and per-class metrics of the metric's states; resets it."""
        metric = self.metric
        if not metric.groundtruth_labels and not metric.detection_labels:
            metric.reset()
            return {}, None
        num_gt = self.count_ground_truth()
        values = metric.compute()
        metric.reset()
        table = {key: float(values[key]) for key in COCO_KEYS}
        per_class = None
        if "precision" in values:  # absent when there was nothing to evaluate
            per_class = class_metrics_from_coco(
                values["precision"],
                values["recall"],
                values["classes"],
                iou_thresholds=metric.iou_thresholds,
                rec_thresholds=metric.rec_thresholds,
                num_gt=num_gt,
            )
        return table, per_class

    def count_ground_truth(self) -> Tensor:
        """LongTensor[K]: non-crowd ground-truth boxes per label in the metric's states (under DDP, rank 0 holds
        every process's share by then: :meth:`finish`)."""
        metric = self.metric
        num_classes = len(self.label_to_cat_id) if self.label_to_cat_id is not None else 0
        labels = torch.cat(metric.groundtruth_labels).long().cpu() if metric.groundtruth_labels else None
        crowd = torch.cat(metric.groundtruth_crowds).bool().cpu() if metric.groundtruth_crowds else None
        if labels is None or labels.numel() == 0:
            return torch.zeros(num_classes, dtype=torch.long)
        return torch.bincount(labels[~crowd], minlength=max(num_classes, int(labels.max()) + 1))


def write_results(path: str | Path, results: list[dict[str, Any]]) -> Path:
    """Writes ``results`` as a COCO results json (called on rank 0 only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    log.info("wrote %d detections to %s", len(results), path)
    return path

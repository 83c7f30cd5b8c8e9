"""COCO evaluation, without Lightning: :class:`COCOEvaluator` (collection, the gather across processes,
scoring), the scoring engines behind torchmetrics' metric, and the per-class numbers of a pass."""

from sapd.evaluation.class_metrics import ClassMetrics, class_metrics_from_coco
from sapd.evaluation.engines import COCO_STATS, ENGINES, coco_metric
from sapd.evaluation.evaluator import (
    BOX_STATES,
    COCO_KEYS,
    COCOEvaluator,
    Evaluation,
    coco_results,
    eval_targets,
    gather_shares,
    merge_evaluations,
    write_results,
)

__all__ = [
    "BOX_STATES",
    "COCO_KEYS",
    "COCO_STATS",
    "ENGINES",
    "COCOEvaluator",
    "ClassMetrics",
    "Evaluation",
    "class_metrics_from_coco",
    "coco_metric",
    "coco_results",
    "eval_targets",
    "gather_shares",
    "merge_evaluations",
    "write_results",
]

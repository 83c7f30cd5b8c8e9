"""The COCOeval implementations behind torchmetrics' :class:`~torchmetrics.detection.MeanAveragePrecision`:
hotcoco (sapd's default; docs/benchmarks.md, "COCO scoring engines"), and torchmetrics' own faster-coco-eval
and pycocotools backends."""

from __future__ import annotations

from typing import Any

from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.detection.helpers import CocoBackend

# COCOeval's 12 summary stats, in its order, by torchmetrics' names.
COCO_STATS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)

ENGINES: tuple[str, ...] = ("hotcoco", "faster_coco_eval", "pycocotools")


class _HotcocoEval:
    """hotcoco's COCOeval as torchmetrics calls it: hotcoco keeps no ``ious`` (torchmetrics reads them for
    ``extended_summary``; nothing in sapd uses them), so they are an empty dict; the rest is hotcoco's."""

    ious: dict = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import hotcoco

        object.__setattr__(self, "_eval", hotcoco.COCOeval(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._eval, name)


class _HotcocoBackend(CocoBackend):
    """torchmetrics' COCO backend with hotcoco's pycocotools-compatible ``COCO`` and ``COCOeval``."""

    def __init__(self) -> None:  # CocoBackend's own __init__ accepts its two backends only
        self.backend = "hotcoco"

    @property
    def coco(self) -> object:
        import hotcoco

        return hotcoco.COCO

    @property
    def cocoeval(self) -> object:
        return _HotcocoEval

    @property
    def mask_utils(self) -> object:
        import hotcoco

        return hotcoco.mask


def coco_metric(engine: str = "hotcoco") -> MeanAveragePrecision:
    """torchmetrics' COCO metric (boxes xyxy, COCOeval's precision array kept) scored by ``engine``.

    ``extended_summary``: COCOeval's precision array, from which the per-class APs and PR curves come
    (:func:`class_metrics_from_coco`) without evaluating each class again. ``sync_on_compute=False``: under
    DDP the processes' images are gathered and scored once on rank 0 (:meth:`COCOEvaluator.finish`);
    torchmetrics' own sync needs equally many images per process.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown COCO engine {engine!r}: use one of {', '.join(ENGINES)}")
    metric = MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend="faster_coco_eval" if engine == "hotcoco" else engine,
        extended_summary=True,
        sync_on_compute=False,
    )
    if engine == "hotcoco":
        metric._coco_backend = _HotcocoBackend()
    return metric

"""COCO scoring engines: agreement of hotcoco, faster-coco-eval and pycocotools, and their time at COCO scale.

``python -m benchmarks suite=coco_eval [images=5000] [detections=100] [checkpoints=[a.ckpt,b.ckpt]]`` measures

  (a) time: each engine scores one drawn COCO-sized case, ``images`` images of COCO's 80 categories with
      about 7 ground-truth boxes each (some crowd) and ``detections`` detections each (jittered copies of
      the ground truth and background boxes): ground truth and results loaded from memory, then
      ``evaluate``, ``accumulate`` and ``summarize``; the best of ``repeats`` runs;
  (b) agreement, in the 12 COCOeval stats of every engine against pycocotools: on the drawn case; on a
      COCO-format folder with RLE crowd regions (:func:`sapd.data.coco_like.make_coco_like`, its val split,
      with drawn detections); on an empty results list; and on each checkpoint's detections over its own
      validation set at score threshold 0, scored through sapd's metric (:func:`sapd.evaluation.coco_metric`),
      where the per-class precision and recall arrays are compared too.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cli import option, parse

PROG = "python -m benchmarks suite=coco_eval"
ENGINES = ("pycocotools", "faster_coco_eval", "hotcoco")


@dataclass
class CocoEvalConfig:
    """Settings of the scoring-engine benchmark (``python -m benchmarks suite=coco_eval help``)."""

    images: int = option(5000, "images of the drawn COCO-sized case (a)")
    detections: int = option(100, "detections per image of the drawn case")
    repeats: int = option(1, "timed runs per engine (the best is kept)")
    seed: int = option(0, "seed of the drawn cases")
    checkpoints: tuple[str, ...] = option((), "sapd checkpoints whose validation detections are compared (b)")
    engines: tuple[str, ...] = option(ENGINES, "engines to time")
    out: str | None = option(None, "a json file for the figures")

    def __post_init__(self) -> None:
        if self.images < 1 or self.detections < 0 or self.repeats < 1:
            raise ValueError("images and repeats must be at least 1, detections at least 0")
        unknown = sorted(set(self.engines) - set(ENGINES))
        if unknown:
            raise ValueError(f"unknown engine {unknown[0]!r}: choose from {', '.join(ENGINES)}")


# ------------------------------------------------------------------------------------------------ engines
def _tools(engine: str) -> tuple[Any, Any]:
    """(COCO, COCOeval) of ``engine``."""
    if engine == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if engine == "faster_coco_eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval

        return COCO, COCOeval
    import hotcoco

    return hotcoco.COCO, hotcoco.COCOeval


def score(engine: str, gt: dict, results: Sequence[dict]) -> np.ndarray:
    """The 12 COCOeval bbox stats of ``results`` (COCO results entries) against ``gt`` (a COCO
    annotations dict), by ``engine``."""
    coco_cls, eval_cls = _tools(engine)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(list(results)))
        else:  # every engine's loadRes refuses an empty list: the results as a data set without annotations
            coco_dt = coco_cls()
            coco_dt.dataset = {"images": copy.deepcopy(gt["images"]), "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = eval_cls(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)


def timed_score(engine: str, gt: dict, results: Sequence[dict], repeats: int) -> tuple[float, np.ndarray]:
    best, stats = float("inf"), np.zeros(0)
    for _ in range(repeats):
        start = time.perf_counter()
        stats = score(engine, gt, results)
        best = min(best, time.perf_counter() - start)
    return best, stats


# ------------------------------------------------------------------------------------------------ cases
def drawn_case(images: int, detections: int, seed: int = 0, num_cats: int = 80) -> tuple[dict, list[dict]]:
    """A COCO-sized case: ground truth (about 7 boxes per image in 640x480 images, one in 20 crowd) and
    ``detections`` results per image, half jittered copies of ground-truth boxes, half background."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": f"c{i + 1}"} for i in range(num_cats)]
    imgs = [{"id": i + 1, "width": 640, "height": 480, "file_name": f"{i + 1}.jpg"} for i in range(images)]
    anns, results = [], []
    for img in imgs:
        n = int(rng.integers(1, 14))
        wh = np.exp(rng.uniform(np.log(4), np.log(400), size=(n, 2)))
        xy = rng.uniform(0, 1, size=(n, 2)) * np.maximum(np.array([640, 480]) - wh, 1)
        labels = rng.integers(1, num_cats + 1, size=n)
        crowd = rng.uniform(size=n) < 0.05
        for (x, y), (w, h), c, k in zip(xy, wh, labels, crowd):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img["id"],
                    "category_id": int(c),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": int(k),
                }
            )
        near = detections // 2
        pick = rng.integers(0, n, size=near)
        jitter = rng.normal(0, 0.15, size=(near, 4)) * np.concatenate([wh[pick], wh[pick]], axis=1)
        boxes = np.concatenate([xy[pick], wh[pick]], axis=1) + jitter
        cls = np.where(rng.uniform(size=near) < 0.8, labels[pick], rng.integers(1, num_cats + 1, size=near))
        bg_wh = np.exp(rng.uniform(np.log(4), np.log(300), size=(detections - near, 2)))
        bg = np.concatenate([rng.uniform(0, 400, size=(detections - near, 2)), bg_wh], axis=1)
        boxes = np.concatenate([boxes, bg])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        cls = np.concatenate([cls, rng.integers(1, num_cats + 1, size=detections - near)])
        scores = rng.uniform(size=detections)
        for b, c, s in zip(boxes.round(2).tolist(), cls.tolist(), scores.round(5).tolist()):
            results.append({"image_id": img["id"], "category_id": int(c), "bbox": b, "score": s})
    return {"images": imgs, "categories": cats, "annotations": anns}, results


def crowd_folder_case(root: Path, seed: int = 0) -> tuple[dict, list[dict], dict]:
    """The val split of a drawn COCO-format folder with RLE crowd regions, with detections drawn around its
    boxes (and some background); also the split's quirk counts."""
    from sapd.data.coco_like import make_coco_like, quirks

    make_coco_like(root, num_train=8, num_val=40, seed=seed)
    gt = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    results = []
    for a in gt["annotations"]:
        for _ in range(3):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.1, size=4) * [w, h, w, h]
            cat = a["category_id"] if rng.uniform() < 0.8 else int(rng.choice(cat_ids))
            box = [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]
            results.append({"image_id": a["image_id"], "category_id": cat, "bbox": box, "score": float(rng.uniform())})
    for img in gt["images"][::3]:
        results.append({"image_id": img["id"], "category_id": cat_ids[0], "bbox": [5.0, 5.0, 30.0, 20.0], "score": 0.5})
    return gt, results, quirks(root, "val")


def checkpoint_states(path: str) -> tuple[list[dict], list[dict]]:
    """A checkpoint's detections (score threshold 0) and ground truth over its own validation set."""
    import torch
    from hydra.utils import instantiate

    from sapd.checkpoint import load_module
    from sapd.evaluation import eval_targets

    module, run_cfg = load_module(path)
    module.net.postprocessor.score_thresh = 0.0
    datamodule = instantiate(run_cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    preds, targets = [], []
    with torch.no_grad():
        for images, batch_targets in datamodule.val_dataloader():
            dets = module.detect(images, batch_targets)
            preds += [{k: d[k] for k in ("boxes", "scores", "labels")} for d in dets]
            targets += eval_targets(batch_targets)
    return preds, targets


def metric_agreement(preds: list[dict], targets: list[dict]) -> dict[str, Any]:
    """Every engine through sapd's metric on the same states: the 12 stats, and the largest difference from
    pycocotools in the stats and in the precision and recall arrays."""
    import torch

    from sapd.evaluation import COCO_STATS, coco_metric

    values = {}
    for engine in ENGINES:
        metric = coco_metric(engine)
        metric.update(preds, targets)
        values[engine] = metric.compute()
    ref = values["pycocotools"]
    out: dict[str, Any] = {"detections": int(sum(len(p["scores"]) for p in preds)), "images": len(preds)}
    for engine in ENGINES:
        v = values[engine]
        out[engine] = [float(v[k]) for k in COCO_STATS]
        if engine != "pycocotools":
            out[f"{engine}_max_diff"] = max(
                max(abs(float(v[k]) - float(ref[k])) for k in COCO_STATS),
                float((v["precision"] - ref["precision"]).abs().max()),
                float((v["recall"] - ref["recall"]).abs().max()),
            )
            out[f"{engine}_arrays_equal"] = bool(
                torch.equal(v["precision"], ref["precision"]) and torch.equal(v["recall"], ref["recall"])
            )
    return out


def json_agreement(gt: dict, results: Sequence[dict]) -> dict[str, Any]:
    stats = {engine: score(engine, gt, results) for engine in ENGINES}
    out: dict[str, Any] = {e: s.tolist() for e, s in stats.items()}
    for engine in ENGINES[1:]:
        out[f"{engine}_max_diff"] = float(np.abs(stats[engine] - stats["pycocotools"]).max())
    return out


# ------------------------------------------------------------------------------------------------ run
def run(cfg: CocoEvalConfig) -> dict[str, Any]:
    report: dict[str, Any] = {"config": {"images": cfg.images, "detections": cfg.detections, "seed": cfg.seed}}
    gt, results = drawn_case(cfg.images, cfg.detections, cfg.seed)
    print(f"(a) {cfg.images} images, {len(gt['annotations'])} boxes, {len(results)} detections, 80 categories")
    timing, stats = {}, {}
    for engine in cfg.engines:
        timing[engine], stats[engine] = timed_score(engine, gt, results, cfg.repeats)
        print(f"    {engine:17s} {timing[engine]:8.2f} s   AP {stats[engine][0]:.6f}")
    report["seconds"] = timing
    if "pycocotools" in stats:
        report["drawn_max_diff"] = {e: float(np.abs(s - stats["pycocotools"]).max()) for e, s in stats.items()}
    agreement: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        crowd_gt, crowd_results, counts = crowd_folder_case(Path(tmp) / "coco_like", cfg.seed)
        agreement["crowd_folder"] = {**json_agreement(crowd_gt, crowd_results), "quirks": counts}
    agreement["empty_results"] = json_agreement(crowd_gt, [])
    for path in cfg.checkpoints:
        agreement[str(path)] = metric_agreement(*checkpoint_states(path))
    report["agreement"] = agreement
    print(
        "(b) largest |stat - pycocotools| over the 12 stats"
        + (" and the precision/recall arrays" * bool(cfg.checkpoints))
    )
    for name, a in agreement.items():
        diffs = ", ".join(f"{e} {a[f'{e}_max_diff']:.3g}" for e in ENGINES[1:])
        print(f"    {name}: {diffs}   (pycocotools AP {a['pycocotools'][0]:.6f})")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry."""
    return run(parse(CocoEvalConfig, [] if argv is None else argv, prog=PROG, summary=__doc__.split("\n\n")[0]))

"""Two detection sets on the same images, one seed each: ``python -m sapd.report compare='[A,B]'
annotations=FILE``.

Each of A and B is a COCO results json, or the run folder of ``python -m sapd.evaluate`` that holds
one (its ``results_val.json``); ``annotations`` is the COCO annotation file both were scored on.
Prints B - A of AP, AP50, AP75, APs, APm, APl with hotcoco's image-bootstrap 95 % interval
(:func:`sapd.diagnostics.error_analysis.bootstrap_compare`: the images are drawn with replacement, both detection
sets scored on each draw). That interval covers evaluation-sample noise, not training noise across
seeds (docs/statistics.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sapd.diagnostics.error_analysis import SIZES, bootstrap_compare
from sapd.errors import UserError

# What python -m sapd.evaluate writes into its run folder (conf/eval.yaml: results_file, split=val)
EVAL_RESULTS = "results_val.json"
DRAWS = 1000  # bootstrap draws of the images
CONFIDENCE = 0.95
# The rows printed: bootstrap_compare's metric and the COCO size whose objects it needs (None: all)
METRIC_SIZES = (("AP", None), ("AP50", None), ("AP75", None), ("APs", "small"), ("APm", "medium"), ("APl", "large"))
DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")


def results_path(path: str | Path) -> Path:
    """A COCO results json as given, or the ``results_val.json`` of an evaluation's run folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"compare: {path} does not exist: give a COCO results json or a sapd.evaluate run folder"
        )
    if path.is_dir():
        if not (path / EVAL_RESULTS).is_file():
            raise FileNotFoundError(
                f"compare: {path} holds no {EVAL_RESULTS}: give the results json that python -m sapd.evaluate "
                "wrote (it prints its path), or its run folder"
            )
        return path / EVAL_RESULTS
    return path


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = " ".join(str(exc).split())
        raise UserError(f"{what} {path} is not a json file ({why}); give {what} as json") from None


def read_ground_truth(path: str | Path) -> dict[str, Any]:
    """The COCO annotation file at ``path``: ``images``, ``annotations`` and ``categories``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotations: {path} is not a file: give the COCO annotation file A and B were scored on"
        )
    gt = _read_json(path, "annotations")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(gt, dict) or k not in gt]
    if missing:
        raise UserError(
            f"annotations {path} is not a COCO annotation file (no {', '.join(missing)}): give the one with "
            "the objects of the images A and B were scored on (e.g. annotations/instances_val2017.json)"
        )
    if not gt["images"]:
        raise UserError(f"annotations {path} has no images: give the annotation file A and B were scored on")
    return gt


def read_results(path: Path, gt: dict[str, Any]) -> list[dict[str, Any]]:
    """The detections of a COCO results json, refused when they are not on ``gt``'s images and categories."""
    results = _read_json(path, "results")
    detections = isinstance(results, list) and all(isinstance(r, dict) for r in results)
    if not detections or not all(k in r for r in results for k in DETECTION_KEYS):
        raise UserError(
            f"{path} is not a COCO results json (a list of detections with {', '.join(DETECTION_KEYS)}): "
            "give the results json that python -m sapd.evaluate wrote"
        )
    for key, things in (("image_id", "images"), ("category_id", "categories")):
        known = {item["id"] for item in gt[things]}
        strange = sorted({r[key] for r in results} - known, key=str)
        if strange:
            raise UserError(
                f"{path} has detections on {things} that the annotations do not have ({key} {strange[0]}, "
                f"{len(strange)} in all): give the annotation file these detections were scored on"
            )
    return results


def objects_per_size(gt: dict[str, Any]) -> dict[str, int]:
    """The non-crowd objects of each COCO size (area within the size's range, ends included, as COCOeval)."""
    anns = [a for a in gt["annotations"] if not a.get("iscrowd", 0)]
    areas = np.array([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=np.float64)
    return {size: int(((areas >= lo) & (areas <= hi)).sum()) for size, (lo, hi) in SIZES.items()}


def image_bootstrap(a: str | Path, b: str | Path, annotations: str | Path | None, draws: int = DRAWS) -> str:
    """B - A in AP points for the detection sets ``a`` and ``b`` (:func:`results_path`) on the images of
    ``annotations``, with the image-bootstrap interval: a markdown table, its heading and what it covers."""
    paths = [results_path(a), results_path(b)]
    if annotations is None:
        raise UserError("compare needs annotations=FILE: the COCO annotation file both detection sets were scored on")
    if paths[0].resolve() == paths[1].resolve():
        raise UserError(f"compare names {paths[0]} twice: give the detections of two models")
    gt = read_ground_truth(annotations)
    result_a, result_b = (read_results(p, gt) for p in paths)
    out = bootstrap_compare(gt, result_a, result_b, n_bootstrap=draws, seed=0, confidence=CONFIDENCE)
    objects = objects_per_size(gt)
    lines = [
        f"Image bootstrap of B - A on the {len(gt['images'])} images of {annotations} (AP points; {draws} draws "
        f"of the images with replacement, {CONFIDENCE * 100:.0f} % interval):",
        f"A: {paths[0]}",
        f"B: {paths[1]}",
        "",
        f"| metric | B - A | {CONFIDENCE * 100:.0f} % interval |",
        "|---|---|---|",
    ]
    for metric, size in METRIC_SIZES:
        delta = out[metric]
        if (size is not None and not objects[size]) or math.isnan(delta["delta"]):  # no objects of that size
            lines.append(f"| {metric} | - | - |")
            continue
        lo, hi = 100 * delta["lower"], 100 * delta["upper"]
        lines.append(f"| {metric} | {100 * delta['delta']:+.1f} | [{lo:+.1f}, {hi:+.1f}] |")
    lines += [
        "",
        "The interval covers evaluation-sample noise (which images were scored), not training noise across "
        "seeds (docs/statistics.md).",
    ]
    return "\n".join(lines)

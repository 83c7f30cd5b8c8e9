"""The command ``python -m sapd.export ckpt_path=PATH [format=onnx|torchscript] [output=FILE] [opset=N]
[score_thresh=X]`` (``conf/export.yaml``): loads the checkpoint, writes the model (:mod:`sapd.export.graph`)
and its JSON beside it, and checks the file against PyTorch (:mod:`sapd.export.check`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from sapd.api import run_eval_size
from sapd.app import hydra_app
from sapd.atomic import same_file, write_text
from sapd.checkpoint import TrainedDetector, load_detector
from sapd.checks import check_config
from sapd.data import transforms
from sapd.export.check import verify
from sapd.export.graph import ExportableSAPD, export_onnx, export_torchscript
from sapd.export.runtime import ExportError
from sapd.logging_setup import configure_logging
from sapd.utils import set_threads

if TYPE_CHECKING:
    from sapd.module import SAPDLitModule

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def export_metadata(
    module: TrainedDetector | SAPDLitModule,
    run_cfg: DictConfig,
    *,
    fmt: str,
    ckpt_path: str | Path,
) -> dict[str, Any]:
    """What a deployment needs beside the model: preprocessing, classes, post-processing, the inputs / outputs."""
    data = run_cfg.get("data", {})
    min_size, max_size = run_eval_size(data)
    post = module.net.postprocessor
    return {
        "format": fmt,
        "checkpoint": str(ckpt_path),
        "torch": torch.__version__,
        "inputs": {
            "images": "float32[N, 3, H, W]: RGB / 255, minus mean, over std; zero-padded bottom / right to "
            "multiples of size_divisor",
            "image_sizes": "int64[N, 2]: (h, w) of each image before padding",
        },
        "outputs": {
            "boxes": "float32[N, D, 4]: x1, y1, x2, y2 in input (resized) pixels",
            "scores": "float32[N, D]",
            "labels": "int64[N, D]: 0..K-1, -1 in empty slots",
            "num_detections": "int64[N]",
        },
        "preprocess": {
            "mean": list(transforms.IMAGENET_MEAN),
            "std": list(transforms.IMAGENET_STD),
            "min_size": min_size,
            "max_size": max_size,
            "size_divisor": int(data.get("size_divisor", 128)),
        },
        "postprocess": {
            "score_thresh": float(post.score_thresh),
            "pre_nms_topk": int(post.pre_nms_topk),
            "nms_thresh": float(post.nms_thresh),
            "max_detections": int(post.max_detections),
        },
        "class_names": list(module.class_names or []),
        "label_to_cat_id": [int(v) for v in (module.label_to_cat_id or [])],
    }


def default_output(ckpt_path: str | Path, fmt: str) -> Path:
    """Beside the checkpoint: ``<stem>.onnx`` / ``<stem>.torchscript.pt``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(ckpt_path.stem + FORMATS[fmt])


def metadata_path(output: Path) -> Path:
    """The JSON written beside an exported file: ``<output>.json``."""
    return output.with_name(output.name + ".json")


def check_output(output: Path, ckpt_path: str | Path) -> None:
    """Refuses an output (or its ``<output>.json``) that is the checkpoint (links and ``..`` resolved)."""
    for target in (output, metadata_path(output)):
        if same_file(target, ckpt_path):
            raise ExportError(
                f"output={output} would replace the checkpoint {ckpt_path}: give another output=FILE "
                f"(or none: {default_output(ckpt_path, 'onnx').name} / {default_output(ckpt_path, 'torchscript').name})"
            )


def export(cfg: DictConfig) -> dict[str, Any]:
    """Exports ``cfg.ckpt_path`` as ``cfg.format``; returns the paths written and, with ``verify``, the parity found."""
    fmt = str(cfg.get("format", "onnx")).lower()
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {cfg.get('format')!r}")
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ExportError("give the checkpoint to export: python -m sapd.export ckpt_path=PATH format=onnx")
    check_config(cfg)  # opset, num_threads, ...: one line before any work
    if fmt == "torchscript" and cfg.get("opset") is not None:
        raise ExportError("opset applies to format=onnx only")
    output = Path(cfg.output) if cfg.get("output") else default_output(cfg.ckpt_path, fmt)
    check_output(output, cfg.ckpt_path)
    set_threads(cfg.get("num_threads"))
    score_thresh = cfg.get("score_thresh")  # its range: sapd.checks.SETTINGS, checked at the start
    module, run_cfg = load_detector(cfg.ckpt_path)
    net = module.net
    ExportableSAPD(net)  # refuses FCOS before any work
    if score_thresh is not None:  # baked into the graph (and written in the metadata)
        net.postprocessor = net.postprocessor.replace(score_thresh=float(score_thresh))  # the loaded copy
    size_divisor = int(run_cfg.data.get("size_divisor", 128))
    meta = export_metadata(module, run_cfg, fmt=fmt, ckpt_path=cfg.ckpt_path)
    if fmt == "onnx":
        export_onnx(net, output, size_divisor=size_divisor, opset=cfg.get("opset"), metadata=meta)
    else:
        export_torchscript(net, output, size_divisor=size_divisor, metadata=meta)
    sidecar = metadata_path(output)
    write_text(sidecar, json.dumps(meta, indent=1) + "\n")
    result: dict[str, Any] = {"output": str(output), "metadata": str(sidecar)}
    if cfg.get("verify", True):
        result["parity"] = verify(net, output, size_divisor=size_divisor, fmt=fmt, opset=cfg.get("opset"))
    return result


@hydra_app("sapd.export", "export")
def main(cfg: DictConfig) -> None:
    """Writes the model and its JSON; a bad request or checkpoint is one line on stderr, exit code 2."""
    configure_logging()
    result = export(cfg)
    log.info("wrote %s (and %s)", result["output"], result["metadata"])
    if "parity" in result:
        p = result["parity"]
        log.info(
            "check against PyTorch on random batches: %d detections (score >= %g), %d unpaired, max box diff %.2g px "
            "(relative %.2g), max score diff %.2g",
            p["detections"],
            p["score_thresh"],
            p["unmatched"] + p["count_diff"],
            p["max_abs_box"],
            p["max_rel_box"],
            p["max_abs_score"],
        )
    print(result["output"])

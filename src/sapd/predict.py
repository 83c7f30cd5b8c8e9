"""Detect objects in images: ``python -m sapd.predict ckpt_path=PATH input=IMAGE_OR_FOLDER output=FOLDER``.

For every image it writes ``<name>.json`` (boxes in the image's pixels, scores, class names and
COCO category ids) and ``<name>.png`` (the image with labelled boxes). Images that cannot be read
are reported, counted and skipped; the others are still processed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from sapd.checkpoint import load_module
from sapd.data import DataError, transforms
from sapd.data.io import read_image
from sapd.data.transforms import collate, preprocess_image
from sapd.logs import configure_logging
from sapd.paths import CONFIG_PATH
from sapd.utils import set_threads
from sapd.visualize import draw_detections

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(path: str | Path) -> list[Path]:
    """One image, or every image of a folder (sorted, not recursive)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return files
    raise FileNotFoundError(f"input not found: {path} (give an image file or a folder of images)")


def eval_size(data_cfg: DictConfig) -> tuple[int, int | None]:
    """The (shorter side, longer-side cap) the model was validated at."""
    return transforms.eval_size(
        data_cfg.get("min_size", 800),
        data_cfg.get("max_size", 1333),
        data_cfg.get("val_min_size"),
        data_cfg.get("val_max_size"),
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Runs the checkpoint over ``cfg.input`` and writes one JSON and one PNG per image."""
    set_threads(cfg.get("num_threads"))
    module, run_cfg = load_module(cfg.ckpt_path)
    device = resolve_device(str(cfg.get("device", "auto")))
    net = module.net.to(device).eval()
    min_size, max_size = eval_size(run_cfg.data)
    size_divisor = int(run_cfg.data.get("size_divisor", 128))
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = module.class_names
    cat_ids = module.label_to_cat_id
    thresh = float(cfg.get("score_thresh", 0.3))
    written, failed = 0, []
    for path in list_images(cfg.input):
        try:
            pil = read_image(path)
        except DataError as exc:
            log.error("%s: skipped", exc)
            failed.append(str(path))
            continue
        tensor, meta = preprocess_image(pil, min_size=min_size, max_size=max_size)
        images, targets = collate([(tensor, meta)], size_divisor=size_divisor)
        outputs = net(images.to(device))
        det = net.postprocess(outputs, [tuple(meta["img_size"])], [tuple(meta["scale_factor"])])[0]
        keep = det["scores"] >= thresh
        det = {k: v[keep].cpu() for k, v in det.items()}
        records = [
            {
                "bbox_xyxy": [round(v, 2) for v in box],
                "score": round(score, 4),
                "label": label,
                "category_id": cat_ids[label] if cat_ids else label,
                "category_name": names[label] if names else str(label),
            }
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
        ]
        doc = {"file": str(path), "width": pil.width, "height": pil.height, "detections": records}
        (out_dir / f"{path.stem}.json").write_text(json.dumps(doc, indent=1))
        draw_detections(pil, det, names).save(out_dir / f"{path.stem}.png")
        written += 1
    log.info(
        "wrote %d predictions (JSON + PNG) to %s%s",
        written,
        out_dir,
        f"; {len(failed)} unreadable skipped" if failed else "",
    )
    return {"written": written, "failed": failed, "output": str(out_dir)}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    configure_logging()
    predict(cfg)


if __name__ == "__main__":
    main()

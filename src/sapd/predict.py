"""Detect objects in images: ``python -m sapd.predict ckpt_path=PATH input=IMAGE_OR_FOLDER output=FOLDER``.

For every image ``<name>`` (file name with its suffix, e.g. ``cat.jpg``) it writes
``<output>/<name>.json`` (boxes in the image's pixels, scores, class names and category ids) and
``<output>/<name>.png`` (the image with labelled boxes): ``cat.jpg`` and ``cat.png`` in one folder
give ``cat.jpg.json`` / ``cat.jpg.png`` and ``cat.png.json`` / ``cat.png.png``. Images go through
:class:`sapd.Detector` in batches of ``batch_size``.

Images that cannot be read are logged, skipped, counted and named again at the end; the others are
still processed. The command refuses (one line, exit code 2) an output folder that is the input
folder, any output path that is an input file, and an output folder that already holds any file it
would write: predictions are never replaced (nor suffixed). Each file is written whole or not at all
(:mod:`sapd.atomic`), so a full disk stops the run with one line and leaves no empty or cut file. It
fails with exit code 2 when no input image could be read at all.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sapd.api import Detector, resolve_device, run_eval_size
from sapd.app import hydra_app
from sapd.atomic import replacing, write_text
from sapd.checkpoint import CheckpointError
from sapd.checks import check_config
from sapd.data import DataError
from sapd.data.io import read_image
from sapd.errors import UserError
from sapd.logging_setup import configure_logging
from sapd.utils import set_threads

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAX_NAMES = 20  # unreadable files named in the closing summary (each is also logged as it is met)

eval_size = run_eval_size  # the (shorter side, longer-side cap) a run was validated at
__all__ = ["PredictError", "eval_size", "list_images", "output_paths", "predict", "resolve_device"]


class PredictError(UserError):
    """A predict run that cannot go on: its message is one line naming the key / path and the fix."""


def list_images(path: str | Path) -> list[Path]:
    """One image, or every image of a folder (sorted, not recursive)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return files
    raise FileNotFoundError(f"input not found: {path} (give an image file or a folder of images)")


def output_paths(image: Path, out_dir: Path) -> tuple[Path, Path]:
    """``(<out_dir>/<file name>.json, <out_dir>/<file name>.png)``: the suffix is kept, so ``x.jpg`` and
    ``x.png`` of one folder never share an output."""
    return out_dir / f"{image.name}.json", out_dir / f"{image.name}.png"


def check_outputs(input_path: Path, files: list[Path], out_dir: Path) -> None:
    """Refuses an output folder that is the input folder, is not a folder, would write over an input,
    or holds any of the files to write (existing predictions or anything else of that name)."""
    out = out_dir.resolve()
    if input_path.is_dir() and input_path.resolve() == out:
        raise PredictError(
            f"output={out_dir} is the input folder: predictions would mix with the images; give another output=FOLDER"
        )
    if out.exists() and not out.is_dir():
        raise PredictError(f"output={out_dir} exists and is not a folder; give a folder for the predictions")
    inputs = {p.resolve() for p in files}
    for image in files:
        for target in output_paths(image, out_dir):
            if target.resolve() in inputs:
                raise PredictError(
                    f"output={out_dir}: {target} would overwrite the input image {target.resolve()}; "
                    "give another output=FOLDER"
                )
    existing = [t for image in files for t in output_paths(image, out_dir) if os.path.lexists(t)]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise PredictError(
            f"output={out_dir} already holds {existing[0]}{more}: predict never replaces a file; "
            "give a new output=FOLDER or move those files away"
        )


def _batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PredictError(f"batch_size must be an integer >= 1; got {value!r}")
    return value


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Runs the checkpoint over ``cfg.input`` and writes one JSON and one PNG per readable image.

    Returns:
        ``written`` (count), ``failed`` (paths of unreadable images, as text), ``output`` (folder).
    Raises:
        FileNotFoundError: no input; PredictError: a refused output, a bad ``batch_size`` or
        ``score_thresh``, or no readable image at all; CheckpointError: a bad checkpoint.
    """
    check_config(cfg)  # score_thresh, batch_size, device, ...: one line before any work
    set_threads(cfg.get("num_threads"))
    input_path = Path(str(cfg.input))
    files = list_images(input_path)
    out_dir = Path(str(cfg.output))
    check_outputs(input_path, files, out_dir)
    batch_size = _batch_size(cfg.get("batch_size", 8))
    try:
        det = Detector.from_checkpoint(
            cfg.ckpt_path, device=str(cfg.get("device", "auto")), score_thresh=cfg.get("score_thresh")
        )
    except ValueError as exc:
        if isinstance(exc, (CheckpointError, DataError)):
            raise
        raise PredictError(str(exc)) from None  # score_thresh, device
    out_dir.mkdir(parents=True, exist_ok=True)

    failed: list[Path] = []
    opened: dict[int, tuple[Path, Image.Image]] = {}  # images read and not yet written, by stream index

    def readable() -> Iterator[Image.Image]:
        """The images that can be read, in order; the stream's index counts only these."""
        index = 0
        for path in files:
            try:
                image = read_image(path)
            except DataError as exc:
                log.error("%s: skipped", exc)
                failed.append(path)
                continue
            opened[index] = (path, image)
            index += 1
            yield image

    written = 0
    for index, result in det.stream(readable(), batch_size=batch_size):
        path, image = opened.pop(index)
        doc = {"file": str(path), "width": image.width, "height": image.height, "detections": result.to_records()}
        json_path, png_path = output_paths(path, out_dir)
        write_text(json_path, json.dumps(doc, indent=1), exclusive=True)
        with replacing(png_path, exclusive=True) as tmp:
            det.draw(image, result).save(tmp, format="PNG")
        written += 1

    if failed:
        names = ", ".join(p.name for p in failed[:MAX_NAMES])
        more = f" and {len(failed) - MAX_NAMES} more (each logged above)" if len(failed) > MAX_NAMES else ""
        log.warning("%d unreadable image(s) skipped: %s%s", len(failed), names, more)
    if written == 0:
        raise PredictError(
            f"none of the {len(files)} input image(s) in {input_path} could be read; see the errors above"
        )
    log.info(
        "wrote %d predictions (<name>.json + <name>.png) to %s at score >= %.2f%s",
        written,
        out_dir,
        det.score_thresh,
        f"; {len(failed)} unreadable skipped" if failed else "",
    )
    return {"written": written, "failed": [str(p) for p in failed], "output": str(out_dir)}


@hydra_app("sapd.predict", "predict", FileNotFoundError)
def main(cfg: DictConfig) -> None:
    """Writes the predictions; a missing key, bad input, refused output or bad checkpoint is one line, exit code 2."""
    configure_logging()
    for key in ("ckpt_path", "input"):
        if OmegaConf.is_missing(cfg, key):
            raise PredictError(f"give {key}=...: python -m sapd.predict ckpt_path=PATH input=IMAGE_OR_FOLDER")
    predict(cfg)


if __name__ == "__main__":
    main()

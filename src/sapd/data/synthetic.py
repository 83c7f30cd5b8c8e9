"""A synthetic detection data set in COCO's exact file layout: the embedded default of sapd.

``make_synthetic_coco`` draws coloured, textured shapes (8 classes with COCO-like gaps in the
category ids) on cluttered backgrounds and writes::

    root/annotations/instances_train.json   root/train/000000000001.jpg ...
    root/annotations/instances_val.json     root/val/000000100001.jpg ...
    root/synthetic.json                     (the parameters; marks a finished set)

The set is a pure function of its parameters (:class:`~sapd.data.synthetic_drawing.SyntheticParams`;
:mod:`sapd.data.synthetic_drawing` draws each image), cached in a folder named by their hash. It is
written to a temporary folder beside ``root`` and renamed into place, so a killed run leaves no half set.

CLI: ``python -m sapd.data.synthetic [out=DIR] [data.synthetic.num_train=N] [data.synthetic.seed=S] ...``
(``conf/synthetic.yaml``) draws the set that ``data=synthetic`` trains on, with the same parameters
and cache folder (``paths.data_dir``), and prints its folder.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sapd.app import hydra_app
from sapd.checks import check_config
from sapd.data import DataError
from sapd.data.synthetic_drawing import (
    CATEGORIES,
    GENERATOR_VERSION,
    SPLITS,
    VAL_ID_OFFSET,
    SyntheticParams,
    render_image,
)
from sapd.logging_setup import configure_logging

log = logging.getLogger(__name__)

MARKER = "synthetic.json"
# Where drawn sets are cached when a Python caller gives no folder. The Hydra configs pass
# ``paths.data_dir`` instead (``$SAPD_DATA_DIR``, else this same folder).
DEFAULT_CACHE_DIR = Path("~/.cache/sapd")


def default_root(params: SyntheticParams, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/synthetic-<hash of params>``; ``cache_dir=None``: ``DEFAULT_CACHE_DIR`` (``~/.cache/sapd``)."""
    base = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    return base / f"synthetic-{params.digest()}"


def _write_split(params: SyntheticParams, split: str, root: Path, pool) -> None:
    num = params.num_train if split == "train" else params.num_val
    first_id = 1 if split == "train" else VAL_ID_OFFSET + 1
    (root / split).mkdir(parents=True)
    jobs = [(asdict(params), split, i, first_id + i, str(root / split)) for i in range(num)]
    results = pool.imap(render_image, jobs, chunksize=16) if pool else map(render_image, jobs)
    images, annotations = [], []
    for image, anns in results:  # in job order, so ids are deterministic
        images.append(image)
        for a in anns:
            annotations.append({"id": first_id + len(annotations), **a})
    dataset = {
        "info": {
            "description": f"sapd synthetic shapes ({split}), generator v{GENERATOR_VERSION}",
            "version": str(GENERATOR_VERSION),
            "year": 2020,
        },
        "licenses": [{"id": 0, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(dataset, f, separators=(",", ":"))


def _is_complete(root: Path, params: SyntheticParams) -> bool:
    try:
        meta = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("digest") == params.digest()


def make_synthetic_coco(
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    verbose: bool = False,
    **params,
) -> Path:
    """Write the synthetic set (once) and return its root folder.

    Args:
        root: destination; None -> ``default_root(params, cache_dir)``, i.e.
            ``<cache_dir>/synthetic-<hash of params>``.
            An existing set there is reused when its parameters match, and replaced otherwise;
            a non-empty folder that is not a synthetic set is never touched (DataError).
        cache_dir: folder of the cached sets when ``root`` is None; None -> ``~/.cache/sapd``
            (the Hydra configs pass ``paths.data_dir``, which ``$SAPD_DATA_DIR`` moves).
        workers: processes for drawing (default ``min(2, cpu_count)``; small sets draw in-process).
        verbose: log (at INFO) how long drawing took.
        **params: fields of :class:`SyntheticParams` (num_train, num_val, seed, min_side, ...).

    Returns:
        ``root``, holding ``annotations/instances_{train,val}.json``, ``{train,val}/*.jpg``.
    """
    try:
        p = SyntheticParams(**params)
    except TypeError as e:
        raise DataError(f"synthetic: {e} (known: {', '.join(SyntheticParams.__dataclass_fields__)})") from None
    root = Path(root).expanduser() if root is not None else default_root(p, cache_dir)
    if _is_complete(root, p):
        return root
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise DataError(f"synthetic: {root} exists and is not a synthetic data set; choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    t0 = time.perf_counter()
    try:
        (tmp / "annotations").mkdir()
        workers = min(2, os.cpu_count() or 1) if workers is None else workers
        use_pool = workers > 1 and p.num_train + p.num_val >= 64
        # fork: the worker only needs the drawing module; the set is identical with or without a pool
        pool = mp.get_context("fork").Pool(workers) if use_pool else None
        try:
            for split in SPLITS:
                _write_split(p, split, tmp, pool)
        finally:
            if pool:
                pool.close()
                pool.join()
        meta = {"digest": p.digest(), "generator_version": GENERATOR_VERSION, "params": asdict(p)}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if _is_complete(root, p):  # another process finished the same set meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        if root.exists():  # an older synthetic set (checked above): move aside, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "set")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not _is_complete(root, p):  # not another process finishing the same set first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        seconds = time.perf_counter() - t0
        log.info("synthetic set (%d train + %d val) drawn in %.1f s: %s", p.num_train, p.num_val, seconds, root)
    return root


def draw(cfg: DictConfig) -> Path:
    """The set of ``cfg.data`` (``data.synthetic`` parameters, ``data.cache_dir``) written to ``cfg.out``
    (None: the cache folder training reads); returns its folder."""
    params = OmegaConf.to_container(cfg.data.synthetic, resolve=True)
    out = cfg.get("out")
    return make_synthetic_coco(
        out, cache_dir=cfg.data.get("cache_dir"), workers=cfg.get("workers"), verbose=True, **params
    )


@hydra_app("sapd.data.synthetic", "synthetic")
def main(cfg: DictConfig) -> None:
    """``python -m sapd.data.synthetic [out=DIR] [data.synthetic.KEY=VALUE ...]``: prints the set's folder."""
    configure_logging()
    check_config(cfg)
    root = draw(cfg)
    print(root)


if __name__ == "__main__":
    main()

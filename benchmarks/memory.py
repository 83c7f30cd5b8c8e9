"""Host memory of the COCO loader: parsing time and peak RSS per process, alone and with loader workers.

``python -m benchmarks suite=memory [folder=/tmp/sapd-coco-memory] [cases=[parse,parse_json,workers,workers_json]]``

First draws (once, into ``folder``, never into the repository) a COCO-sized annotation file with
numpy: ``images`` images (118,287 as train2017), ``boxes`` annotations (860,001) with polygon
segmentations of ~``vertices`` points and 1 % crowd regions as uncompressed RLE, about 1 % of images
without annotations, COCO's 80 category ids; written as COCO writes it (about 450 MB, as
``instances_train2017.json``), plus a val file of ``val_images`` images (5,000 as val2017).

Then every case runs in a fresh Python process (so that each peak is its own):

- ``parse``: ``COCODetection`` of the train file, as training builds it: parsing time, peak RSS
  (``VmHWM``) and the RSS held afterwards;
- ``parse_json``: the same, then ``dataset.coco`` (pycocotools' copy of the whole file,
  segmentations included): what a process holds when the parsed json is kept, as the loader did
  before it dropped it;
- ``workers`` / ``workers_json``: the data module of ``conf/data/coco.yaml`` (``num_workers`` 4,
  persistent train and val workers) on both files, then one full pass of the train loader and one
  of the val loader; afterwards, for the main process and each worker: RSS, peak RSS, USS (pages
  only that process holds) and PSS (shared pages split among their holders), and the sums. Images
  are not decoded: a stand-in image of the annotated size takes each file's place and the transform
  only turns it into a 1-pixel tensor, so that a pass is seconds, while every item is still built
  by the data set's own code (targets, boxes, evaluation ground truth): what a worker touches in an
  epoch, which decides how many of the main process's pages it copies.

Memory figures do not depend on CPU load; times do. Figures go to ``out`` (JSON, and markdown beside it).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cli import lists_to_tuples, option, parse

PROG = "python -m benchmarks suite=memory"
CASES = ("parse", "parse_json", "workers", "workers_json")
# COCO's 80 category ids (1..90 without the 10 unused ones)
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
TRAIN, VAL = "annotations/instances_train.json", "annotations/instances_val.json"


@dataclass
class MemoryConfig:
    """Settings of the host-memory benchmark (``python -m benchmarks suite=memory help``)."""

    cases: tuple[str, ...] = option(CASES, f"cases to run, of {', '.join(CASES)}")
    folder: str = option("/tmp/sapd-coco-memory", "where the drawn files go (drawn once, kept; never the repository)")
    images: int = option(118_287, "train images (train2017: 118,287)")
    boxes: int = option(860_001, "train annotations (train2017: 860,001)")
    val_images: int = option(5_000, "val images (val2017: 5,000; annotations in proportion)")
    vertices: int = option(20, "mean points per polygon (sets the file size: 20 gives about train2017's 448 MB)")
    num_workers: int = option(4, "loader workers per loader (conf/data/coco.yaml: 4 train + 4 val, persistent)")
    batch_size: int = option(64, "images per batch of the worker passes (only the number of batches changes)")
    floor_gib: float = option(3.0, "the worker passes stop (and say so) when the machine has less memory available")
    seed: int = option(0, "seed of the drawing")
    out: str = option("benchmarks/results_memory.json", "JSON of the figures (and .md beside it); empty: write nothing")

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        unknown = [c for c in self.cases if c not in CASES]
        if unknown or not self.cases:
            raise ValueError(f"cases must be some of {', '.join(CASES)}, got {list(self.cases)}")
        if min(self.images, self.boxes, self.val_images, self.vertices, self.num_workers, self.batch_size) < 1:
            raise ValueError("images, boxes, val_images, vertices, num_workers and batch_size must be >= 1")
        root = Path(self.folder).resolve()
        repo = Path(__file__).resolve().parents[1]
        if root == repo or repo in root.parents:
            raise ValueError(f"folder {root} is inside the repository; draw the files elsewhere (e.g. /tmp)")


# -- drawing --------------------------------------------------------------------------------------


def draw_coco(path: Path, images: int, boxes: int, vertices: int, seed: int, first_id: int = 1) -> None:
    """A COCO-format annotation file of ``images`` images and ``boxes`` annotations, drawn with numpy
    and written in chunks (the whole file is never held as Python objects)."""
    rng = np.random.default_rng(seed)
    landscape = rng.random(images) < 0.75
    short = rng.integers(333, 481, images)
    width = np.where(landscape, 640, short)
    height = np.where(landscape, short, 640)
    ids = first_id + np.sort(rng.choice(10 * images, images, replace=False))  # COCO's ids have gaps too
    with_anns = np.flatnonzero(rng.random(images) >= 0.01)  # ~1 % of images without annotations
    weights = rng.lognormal(0.0, 1.0, len(with_anns))
    owner = np.concatenate(
        [with_anns, rng.choice(with_anns, boxes - len(with_anns), p=weights / weights.sum())]
    )  # [boxes] image index of each annotation: every image of with_anns has one at least
    owner = np.sort(owner[:boxes])
    crowd = rng.random(boxes) < 0.011
    w_img, h_img = width[owner].astype(np.float64), height[owner].astype(np.float64)
    bw = np.exp(rng.uniform(np.log(2.0), np.log(w_img)))
    bh = np.exp(rng.uniform(np.log(2.0), np.log(h_img)))
    x = rng.uniform(0, w_img - bw)
    y = rng.uniform(0, h_img - bh)
    cats = rng.choice(COCO_IDS, boxes)
    area = bw * bh * rng.uniform(0.3, 0.9, boxes)
    npoints = np.clip(rng.poisson(vertices, boxes), 3, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "drawn by benchmarks/memory.py", "year": 2017}, ')
        f.write('"licenses": [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 1, "name": "CC BY"}], ')
        f.write('"images": [')
        for start in range(0, images, 20_000):
            chunk = []
            for i in range(start, min(start + 20_000, images)):
                name = f"{int(ids[i]):012d}.jpg"
                chunk.append(
                    json.dumps(
                        {
                            "license": 1,
                            "file_name": name,
                            "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                            "height": int(height[i]),
                            "width": int(width[i]),
                            "date_captured": "2013-11-14 11:18:45",
                            "flickr_url": f"http://farm4.staticflickr.com/3153/{name}",
                            "id": int(ids[i]),
                        }
                    )  # fmt: skip
                )
            f.write(("," if start else "") + ",".join(chunk))
        f.write('], "annotations": [')
        for start in range(0, boxes, 20_000):
            chunk = []
            for k in range(start, min(start + 20_000, boxes)):
                if crowd[k]:  # an uncompressed RLE over the whole image, as COCO's crowd regions are stored
                    runs = rng.integers(1, 400, int(rng.integers(50, 800)))
                    segmentation = {"counts": runs.tolist(), "size": [int(h_img[k]), int(w_img[k])]}
                else:
                    t = rng.uniform(0, 2 * np.pi, npoints[k])
                    px = x[k] + bw[k] * (0.5 + 0.5 * np.cos(t))
                    py = y[k] + bh[k] * (0.5 + 0.5 * np.sin(t))
                    segmentation = [np.round(np.stack([px, py], 1).ravel(), 2).tolist()]
                chunk.append(
                    json.dumps(
                        {
                            "segmentation": segmentation,
                            "area": float(area[k]),
                            "iscrowd": int(crowd[k]),
                            "image_id": int(ids[owner[k]]),
                            "bbox": [round(float(v), 2) for v in (x[k], y[k], bw[k], bh[k])],
                            "category_id": int(cats[k]),
                            "id": first_id + k,
                        }
                    )  # fmt: skip
                )
            f.write(("," if start else "") + ",".join(chunk))
        categories = [{"supercategory": "thing", "id": c, "name": f"category_{c}"} for c in COCO_IDS]
        f.write('], "categories": ' + json.dumps(categories) + "}")
    tmp.replace(path)
    np.savez(path.with_suffix(".sizes.npz"), ids=ids, wh=np.stack([width, height], 1))


def ensure_files(cfg: MemoryConfig) -> dict[str, Path]:
    """The drawn train and val files under ``cfg.folder`` (drawn when missing or of other settings)."""
    root = Path(cfg.folder)
    stamp = root / "drawn.json"
    settings = {k: getattr(cfg, k) for k in ("images", "boxes", "val_images", "vertices", "seed")}
    files = {"train": root / TRAIN, "val": root / VAL}
    drawn = [*files.values(), *(p.with_suffix(".sizes.npz") for p in files.values())]
    if not (stamp.is_file() and json.loads(stamp.read_text()) == settings and all(p.is_file() for p in drawn)):
        for p in (stamp, *drawn):
            p.unlink(missing_ok=True)
        t0 = time.perf_counter()
        draw_coco(files["train"], cfg.images, cfg.boxes, cfg.vertices, cfg.seed)
        val_boxes = max(1, round(cfg.boxes * cfg.val_images / cfg.images))
        draw_coco(files["val"], cfg.val_images, val_boxes, cfg.vertices, cfg.seed + 1, first_id=10 * cfg.images + 1)
        for split in ("train", "val"):
            (root / split).mkdir(exist_ok=True)  # image folders: the data set checks that they exist
        stamp.write_text(json.dumps(settings))
        print(f"drew {files['train']} ({files['train'].stat().st_size / 1e6:.0f} MB) and {files['val']} "
              f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
    return files


# -- measuring (in the probe process) ------------------------------------------------------------


def proc_memory(pid: int | str = "self") -> dict[str, float]:
    """MiB of process ``pid``: ``rss`` and its peak ``peak_rss`` (``VmHWM``), ``pss`` and ``uss``
    (private clean + dirty) from ``smaps_rollup``."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    out = {"rss": int(values["VmRSS"]) / 1024, "peak_rss": int(values["VmHWM"]) / 1024}
    rollup = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        rollup[key] = int(value.split()[0])
    out["pss"] = rollup.get("Pss", 0) / 1024
    out["uss"] = (rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)) / 1024
    return out


def _stand_in(coco_module, files: dict[str, str]) -> None:
    """Images are not decoded: the readers of ``sapd.data.coco`` return a blank image of the annotated
    size, found from the file name (``<id>.jpg``) in the sizes drawn beside each file (numpy arrays:
    the workers touch no Python object of the probe's own)."""
    from PIL import Image

    drawn = [np.load(Path(f).with_suffix(".sizes.npz")) for f in files.values()]
    ids = np.concatenate([d["ids"] for d in drawn])
    wh = np.concatenate([d["wh"] for d in drawn])
    order = np.argsort(ids)
    ids, wh = ids[order], wh[order]
    blanks: dict[tuple[int, int], Image.Image] = {}

    def read(path, **kw):
        i = np.searchsorted(ids, int(Path(path).stem))
        size = (int(wh[i, 0]), int(wh[i, 1]))
        if size not in blanks:
            blanks[size] = Image.new("RGB", size)
        return blanks[size]

    def read_oriented(path, **kw):
        return read(path), 1

    coco_module.read_image, coco_module.read_image_oriented = read, read_oriented


def _guard(floor_gib: float, result: dict):
    """A thread that kills this process's workers when the machine's available memory falls under
    ``floor_gib`` (other work shares the machine), noting it in ``result["aborted"]``."""
    import signal
    import threading

    import psutil

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            available = psutil.virtual_memory().available / 2**30
            if available < floor_gib:
                result["aborted"] = f"available memory fell to {available:.1f} GiB: workers stopped"
                for child in psutil.Process().children(recursive=True):
                    os.kill(child.pid, signal.SIGKILL)
                return

    threading.Thread(target=watch, daemon=True).start()
    return stop


def probe(case: str, files: dict[str, str], num_workers: int, batch_size: int, floor_gib: float = 3.0) -> dict:
    """One case in this process; the figures as a dict (printed as JSON by :func:`main` of the child)."""
    import torch

    torch.set_num_threads(1)
    before = proc_memory()
    result: dict = {"case": case, "start_rss": before["rss"]}
    if case.startswith("parse"):
        from sapd.data.coco import COCODetection

        t0 = time.perf_counter()
        ds = COCODetection(files["train"], Path(files["train"]).parents[1] / "train")
        result["parse_s"] = time.perf_counter() - t0
        if case == "parse_json":
            t0 = time.perf_counter()
            _ = ds.coco
            result["coco_s"] = time.perf_counter() - t0
        gc.collect()
        result |= {"images": len(ds), "stats": dict(ds.stats), **proc_memory()}
        return result

    import sapd.data.coco as coco_module
    from sapd.data.datamodule import COCODataModule

    root = Path(files["train"]).parents[1]
    dm = COCODataModule(
        root, train_ann=TRAIN, train_images="train", val_ann=VAL, val_images="val", num_workers=num_workers,
        persistent_workers=True, batch_size=batch_size, val_batch_size=batch_size, pin_memory=False, seed=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    dm.setup("fit")
    result["parse_s"] = time.perf_counter() - t0
    if case == "workers_json":
        _ = dm.train_dataset.coco, dm.val_dataset.coco
    _stand_in(coco_module, files)

    def one_pixel(img, target, generator=None):
        return torch.zeros(3, 1, 1), target

    dm.train_dataset.transforms = dm.val_dataset.transforms = one_pixel
    gc.collect()
    result["parsed_rss"] = proc_memory()["rss"]
    loaders = {"train": dm.train_dataloader(), "val": dm.val_dataloader()}
    t0 = time.perf_counter()
    seen = {}
    stop = _guard(floor_gib, result)
    try:
        for split, loader in loaders.items():
            seen[split] = sum(len(targets) for _, targets in loader)
    except RuntimeError as e:  # a worker killed by the guard
        if "aborted" not in result:
            raise
        result["error"] = str(e).splitlines()[0]
        result["main"] = proc_memory()
        return result
    stop.set()
    result["pass_s"] = time.perf_counter() - t0
    result["items"] = seen
    import psutil

    workers = psutil.Process().children(recursive=True)
    result["main"] = proc_memory()
    result["workers"] = [proc_memory(p.pid) for p in workers]
    every = [result["main"], *result["workers"]]
    result["total"] = {k: sum(m[k] for m in every) for k in ("rss", "pss", "uss")}
    for loader in loaders.values():  # persistent workers end with their iterator
        loader._iterator = None
    return result


def run_probe(case: str, files: dict[str, Path], cfg: MemoryConfig) -> dict:
    """:func:`probe` of ``case`` in a fresh Python process (this interpreter, this ``sys.path``)."""
    code = (
        "import json, sys; from benchmarks.memory import probe; "
        f"print('@@' + json.dumps(probe({case!r}, {json.dumps({k: str(v) for k, v in files.items()})}, "
        f"{cfg.num_workers}, {cfg.batch_size}, {cfg.floor_gib})), flush=True)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("@@")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{case}: the probe failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][2:])


def markdown(results: dict[str, dict], cfg: MemoryConfig, files: dict[str, Path], info: dict) -> str:
    size = files["train"].stat().st_size / 1e6
    lines = [
        f"Host memory of the COCO loader, {info.get('cpu')}, {info.get('logical_cores')} logical cores, "
        f"{info.get('memory_gib')} GiB, load average {info.get('load_average')}; drawn train file "
        f"{cfg.images:,} images, {cfg.boxes:,} annotations, {size:.0f} MB; MiB",
        "",
    ]
    parse_rows = [c for c in ("parse", "parse_json") if c in results]
    if parse_rows:
        lines += [
            "| case | parse (s) | peak RSS | RSS held after parsing | of which the data (RSS - RSS before) |",
            "|---|---|---|---|---|",
        ]
        for c in parse_rows:
            r = results[c]
            extra = f" + {r['coco_s']:.1f} (pycocotools)" if "coco_s" in r else ""
            lines.append(
                f"| {c} | {r['parse_s']:.1f}{extra} | {r['peak_rss']:.0f} | {r['rss']:.0f} | "
                f"{r['rss'] - r['start_rss']:.0f} |"
            )
        lines.append("")
    work_rows = [c for c in ("workers", "workers_json") if c in results]
    if work_rows:
        lines += [
            "| case | main RSS / peak | each worker: RSS / USS / PSS (mean) | total USS | total PSS | pass (s) |",
            "|---|---|---|---|---|---|",
        ]
        for c in work_rows:
            r = results[c]
            if "aborted" in r:
                lines.append(f"| {c} | {r['main']['rss']:.0f} / {r['main']['peak_rss']:.0f} | {r['aborted']} | | | |")
                continue
            ws = r["workers"]
            mean = {k: sum(w[k] for w in ws) / max(len(ws), 1) for k in ("rss", "uss", "pss")}
            lines.append(
                f"| {c} ({len(ws)} workers) | {r['main']['rss']:.0f} / {r['main']['peak_rss']:.0f} | "
                f"{mean['rss']:.0f} / {mean['uss']:.0f} / {mean['pss']:.0f} | {r['total']['uss']:.0f} | "
                f"{r['total']['pss']:.0f} | {r['pass_s']:.0f} |"
            )
    return "\n".join(lines)


def run(cfg: MemoryConfig) -> dict[str, dict]:
    from .measure import log, machine_info

    files = ensure_files(cfg)
    results = {}
    for case in cfg.cases:
        results[case] = run_probe(case, files, cfg)
        log(f"[{case}] {json.dumps({k: v for k, v in results[case].items() if k not in ('stats', 'workers')})}")
    info = machine_info("cpu")
    text = markdown(results, cfg, files, info)
    print(text)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        figures = {"config": asdict(cfg), "machine": info, "file_mb": files["train"].stat().st_size / 1e6}
        out.write_text(json.dumps(figures | {"results": results}, indent=2) + "\n")
        args = " ".join(a for a in sys.argv[1:] if not a.startswith("suite="))
        out.with_suffix(".md").write_text(f"`{PROG} {args}`".replace(" `", "`") + "\n\n" + text + "\n")
        log(f"wrote {out} and {out.with_suffix('.md')}")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    """Command-line entry."""
    cfg = parse(MemoryConfig, [] if argv is None else argv, prog=PROG, summary=__doc__.split("\n\n")[0])
    return run(cfg)

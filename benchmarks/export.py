"""Latency of an exported SAPD: PyTorch (eager) vs TorchScript vs ONNX Runtime, end to end.

``python -m benchmarks suite=export [key=value ...]`` (``make bench-export``) builds each model from the
project's ``conf/`` with random weights (``tiny``: ``model=tiny``, the CPU default, 8 classes, padded to
multiples of 32; ``r50``: ``model=sapd`` with ResNet-50, no BFP, 80 classes, multiples of 128), exports
it with :mod:`sapd.export` into a temporary folder, and times, interleaved, batch ``batch`` of random
images at the model's stated size:

- ``pytorch``: ``net(images)`` then ``net.postprocess`` (what ``sapd.predict`` runs);
- ``torchscript``: the exported TorchScript file (network + post-processing);
- ``onnxruntime``: the exported ONNX file on ONNX Runtime's CPU provider.

``runtimes=`` chooses which (PyTorch, the reference, always runs); an ONNX export takes ~13 s even for
the tiny model (``torch.export`` traces the network and the post-processing), a TorchScript one ~1 s.

All three include decoding and NMS. ``post=cap`` (default) sets the classification bias to 0 so that
random weights score ~0.5 and every level fills its 1000 NMS candidates (a busy image's worst case),
as the speed suite does; ``post=init`` keeps the prior-0.01 bias (nothing passes the threshold).
Torch and ONNX Runtime use the same thread count. Beside the timings it reports the export time of
each format and the parity of both exported files with PyTorch on the timed batch
(:func:`sapd.export.match_detections`). Writes ``benchmarks/results_export.json`` and ``.md`` (``out=``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from hydra.utils import instantiate

from sapd import export as sapd_export

from .cli import lists_to_tuples, option, parse
from .configs import compose_config, sapd_overrides
from .measure import log, machine_info, run_interleaved, summarize
from .report import _clean
from .workloads import padded_size

PROG = "python -m benchmarks suite=export"
RUNTIMES = ("pytorch", "torchscript", "onnxruntime")
# model -> (Hydra overrides of the training config, classes)
MODELS = {
    "tiny": (["model=tiny"], 8),
    "r50": ([*sapd_overrides("resnet50"), "data=coco"], 80),
}


@dataclass
class ExportBenchConfig:
    """Settings of the export benchmark (``python -m benchmarks suite=export help``)."""

    models: tuple[str, ...] = option(("tiny", "r50"), "which models: tiny (model=tiny), r50 (model=sapd, ResNet-50)")
    tiny_size: tuple[int, int] = option((320, 480), "[H,W] of the tiny model's images (its evaluation size)")
    r50_size: tuple[int, int] = option((512, 853), "[H,W] of the R-50 images (the speed suite's CPU size)")
    batch: int = option(1, "images per call (ms/image = call time / batch)")
    threads: int = option(0, "torch and ONNX Runtime intra-op threads (0: all logical cores)")
    warmup: int = option(2, "warm-up rounds dropped before timing")
    reps: int = option(10, "timed rounds")
    runtimes: tuple[str, ...] = option(RUNTIMES, "runtimes timed beside pytorch (always run, the reference)")
    post: str = option("cap", "cap: scores ~0.5, 5 x 1000 NMS candidates; init: prior-0.01 bias, nothing kept")
    seed: int = option(0, "seed of the weights and the images")
    quick: bool = option(False, "tiny model only at 128x192, 1 repetition (smoke runs, tests)")
    out: str = option("benchmarks/results_export.json", "JSON path; the Markdown is written beside it (.md)")

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"models must be among {', '.join(MODELS)}; got {', '.join(unknown)}")
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"runtimes must be among {', '.join(RUNTIMES)}; got {', '.join(unknown)}")
        if "pytorch" not in self.runtimes:
            self.runtimes = ("pytorch", *self.runtimes)
        if self.post not in ("cap", "init"):
            raise ValueError(f"post must be cap or init; got {self.post!r}")


QUICK = {"models": ("tiny",), "tiny_size": (128, 192), "warmup": 1, "reps": 1}


def build_model(name: str, cfg: ExportBenchConfig) -> tuple[torch.nn.Module, int, tuple[int, int]]:
    """The model ``name`` with random weights, its size divisor, and its image size."""
    overrides, num_classes = MODELS[name]
    run_cfg = compose_config(overrides)
    torch.manual_seed(cfg.seed)
    net = instantiate(run_cfg.model, num_classes=num_classes).eval()
    if cfg.post == "cap":
        with torch.no_grad():
            net.head.cls_out.bias.zero_()
    size = cfg.tiny_size if name == "tiny" else cfg.r50_size
    return net, int(run_cfg.data.size_divisor), tuple(size)


def measure_model(name: str, cfg: ExportBenchConfig, folder: Path) -> dict:
    """Exports model ``name`` in the formats of ``cfg.runtimes`` and times those runtimes on one batch."""
    net, divisor, size = build_model(name, cfg)
    hp, wp = padded_size(size, divisor)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.zeros(cfg.batch, 3, hp, wp)
    images[:, :, : size[0], : size[1]] = torch.randn(cfg.batch, 3, *size, generator=gen)
    sizes = torch.tensor([list(size)] * cfg.batch)
    export_s = {}
    paths = {"onnxruntime": folder / f"{name}.onnx", "torchscript": folder / f"{name}.torchscript.pt"}
    paths = {r: p for r, p in paths.items() if r in cfg.runtimes}
    for runtime, path in paths.items():
        log(f"[export] {name}: {runtime}")
        t0 = time.perf_counter()
        if runtime == "onnxruntime":
            sapd_export.export_onnx(net, path, size_divisor=divisor)
        else:
            sapd_export.export_torchscript(net, path, size_divisor=divisor)
        export_s[runtime] = time.perf_counter() - t0
    exported = {r: sapd_export.ExportedModel(p, threads=cfg.threads) for r, p in paths.items()}
    eager = sapd_export.inference_copy(net)

    @torch.no_grad()
    def pytorch():
        return eager.postprocess(eager(images), [size] * cfg.batch)

    np_images, np_sizes = images.numpy(), sizes.numpy()
    tasks = {"pytorch": pytorch} | {r: (lambda m=m: m(np_images, np_sizes)) for r, m in exported.items()}
    samples = run_interleaved(tasks, reps=cfg.reps, warmup=cfg.warmup, label=f"export/{name}")
    reference = sapd_export.reference_detections(eager, images, sizes)
    parity = {
        r: sapd_export.match_detections(reference, sapd_export.to_original_pixels(*m(np_images, np_sizes), sizes))
        for r, m in exported.items()
    }
    timings = {r: summarize(samples[r]) for r in tasks}
    return {
        "size": list(size),
        "padded": [hp, wp],
        "size_divisor": divisor,
        "num_classes": MODELS[name][1],
        "timings": timings,
        "ms_per_image": {r: 1000 * t["median"] / cfg.batch for r, t in timings.items()},
        "export_s": export_s,
        "file_mib": {r: p.stat().st_size / 2**20 for r, p in paths.items()},
        "parity": parity,
    }


def run(cfg: ExportBenchConfig, command: str = PROG) -> dict:
    """Every model of ``cfg.models``; returns the results dict (what is written as JSON)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command,
            "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
            "machine": machine_info("cpu"),
            "models": {},
        }
        with tempfile.TemporaryDirectory() as tmp:  # run_interleaved freezes the heap while it times
            for name in cfg.models:
                results["models"][name] = measure_model(name, cfg, Path(tmp))
        return results
    finally:
        torch.set_num_threads(threads)


def to_markdown(res: dict) -> str:
    """The results as a Markdown table per model, with export times and parity."""
    cfg = res["config"]
    m = res["machine"]
    lines = [
        "# Exported SAPD: PyTorch vs TorchScript vs ONNX Runtime",
        "",
        f"{res['date']}; `{res['command']}`; {m['cpu']}, {cfg['threads']} threads, torch {m['torch']}; "
        f"batch {cfg['batch']}, random weights (post={cfg['post']}), end to end (network, decoding, NMS); "
        f"median of {cfg['reps']} interleaved rounds after {cfg['warmup']} warm-up.",
        "",
        "| model | image (padded) | runtime | ms / image | vs PyTorch | export (s) | file (MiB) | parity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["models"].items():
        image = f"{r['size'][0]}x{r['size'][1]} ({r['padded'][0]}x{r['padded'][1]})"
        base = r["ms_per_image"]["pytorch"]
        lines.append(f"| {name} | {image} | pytorch | {base:.1f} | 1.00x | - | - | reference |")
        for runtime in r["parity"]:
            ms = r["ms_per_image"][runtime]
            p = r["parity"][runtime]
            verdict = "ok" if sapd_export.parity_ok(p) else "DIFFERS"
            parity = f"{verdict}: {p['detections']} dets, box {p['max_abs_box']:.1e} px, score {p['max_abs_score']:.1e}"
            lines.append(
                f"| {name} | {image} | {runtime} | {ms:.1f} | {base / ms:.2f}x | {r['export_s'][runtime]:.1f} | "
                f"{r['file_mib'][runtime]:.1f} | {parity} |"
            )
    lines += [
        "",
        "vs PyTorch > 1 means faster than eager PyTorch. Parity: every detection paired with PyTorch's "
        "(same label, score within 1e-4, boxes within 1e-3 relative).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: run, print the Markdown, write JSON + Markdown."""
    cfg = parse(
        ExportBenchConfig,
        [] if argv is None else argv,
        prog=PROG,
        summary=__doc__.split("\n\n")[0],
        presets=lambda c: [QUICK] if c.quick else [],
    )
    if cfg.threads <= 0:
        cfg.threads = os.cpu_count() or 1
    command = " ".join([PROG, *(argv or [])])
    results = run(cfg, command)
    markdown = to_markdown(results)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown, end="")
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return results

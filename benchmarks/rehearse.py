"""A rehearsal of the COCO job on this machine: ``experiment=r50`` in 2 gloo processes on a drawn COCO-format set.

``python -m benchmarks suite=rehearse [form=short|full] [out=DIR]`` (``make rehearse ARGS=form=short``):

1. draws a set with COCO's quirks (:mod:`sapd.data.coco_like`: the 80 categories with COCO's ids, images
   without annotations, crowd RLE regions, zero-size boxes, an all-crowd image, an image whose only box
   has zero size, grayscale and EXIF-rotated JPEGs) in COCO's layout, read with ``data.root=``;
2. trains ``experiment=r50`` as it is, with only the sizes shrunk (:data:`SHRUNK`: a small backbone from
   scratch, a narrow FPN and head, small images, one image per process and step, fewer epochs, the
   milestones and warm-up scaled with them) and ``trainer=ddp trainer.accelerator=cpu trainer.devices=2
   trainer.precision=bf16-mixed`` (bf16 stands in for the GPU's 16-mixed). Everything else is r50's: BFP,
   SGD with warm-up and milestones, the phase switch at half the epochs, frozen stem and BatchNorm,
   padding to 128, 2 aspect-ratio groups, ``drop_empty=false``, the checkpoint callbacks;
3. SIGKILLs the whole run (both processes and their loader workers) in the middle of an epoch of phase 2,
   then resumes it from its ``last.ckpt`` to the end; the resumed run validates every epoch (the
   evaluation of both processes gathered on process 0) and writes the COCO results json, which is then
   loaded with pycocotools (``COCO.loadRes``);
4. prints and writes (``<out>/rehearsal.json``) what a GPU user wants to know: seconds per step, peak RSS
   per process and the PSS of its loader workers, the steps at which a process's batch held no training box,
   what the data module read, dropped and skipped (``summary.json``'s ``data_counts``), and the times.

It fails (exit 1, one line per failed check) when a run does not end as it should (a hang ends at
``timeout``), no step had one process's batch empty, the two processes' weights differ at the end,
the resumed run does not reach the last step, or the results json does not load.

Every ``sapd.train`` process runs ``python -m benchmarks.rehearse_train`` (``sapd.train``'s ``train`` plus
a recording callback) from the repository root, in a process group of its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .cli import option, parse
from .configs import REPO_ROOT
from .measure import log, machine_info

PROG = "python -m benchmarks suite=rehearse"

# what differs from experiment=r50: where the processes run, and sizes
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=bf16-mixed"]
SHRUNK = [
    "model.backbone.pretrained=false",  # from scratch: nothing to download
    "model.neck.out_channels=32",
    "model.head.feat_channels=32",
    "model.head.num_convs=2",
    "model.selection.channels=32",
    "data.min_size=128",
    "data.max_size=192",
    "data.batch_size=1",  # one image per process: an image without a training box is a batch without one
    "data.val_batch_size=2",
    "model.postprocess.score_thresh=0.001",  # a model trained for minutes scores low: detections to write
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.step_checkpoint.train_time_interval=null",
]

# form -> data set size, backbone, epochs, milestones, warm-up, loader workers, checkpoint period,
# step at which the first run is killed (mid-epoch, phase 2)
FORMS = {
    "short": {
        "num_train": 24, "num_val": 8, "backbone": "resnet10t", "epochs": 2, "milestones": [1], "warmup": 3,
        "workers": 0, "every": 3, "kill_at": 19, "timeout": 420,
    },
    "full": {
        "num_train": 200, "num_val": 40, "backbone": "resnet18d", "epochs": 4, "milestones": [2, 3], "warmup": 20,
        "workers": 2, "every": 20, "kill_at": 261, "timeout": 1800,
    },
}  # fmt: skip


@dataclass
class RehearseConfig:
    """Settings of the rehearsal (``python -m benchmarks suite=rehearse help``)."""

    form: str = option("full", "short (inside make test, ~2 min) or full (make rehearse)")
    out: str = option("outputs/rehearse", "folder of the data set, the runs and rehearsal.json (emptied first)")
    timeout: int = option(0, "seconds a run may take before it counts as hung (0: the form's)")
    overrides: tuple[str, ...] = option((), "further sapd.train overrides for both runs, e.g. [data.num_workers=4]")

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, not {self.form!r}")


def train_overrides(form: dict, data_root: Path) -> list[str]:
    """``sapd.train`` overrides of the rehearsal's runs."""
    return [
        "experiment=r50",
        *DDP_CPU,
        *SHRUNK,
        f"model.backbone.name={form['backbone']}",
        f"data.root={data_root}",
        f"data.num_workers={form['workers']}",
        f"trainer.max_epochs={form['epochs']}",
        f"optim.scheduler.milestones=[{','.join(map(str, form['milestones']))}]",
        f"optim.scheduler.warmup_iters={form['warmup']}",
        f"callbacks.step_checkpoint.every_n_train_steps={form['every']}",
    ]


def run_group(cmd: list[str], *, env: dict[str, str], timeout: float, log_file: Path) -> tuple[int, float]:
    """Runs ``cmd`` from the repository root in a process group of its own, output to ``log_file``;
    the whole group (the DDP processes and loader workers) is killed at ``timeout`` or when done.
    Returns (exit code, seconds); exit code None on timeout."""
    start = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError):  # what is left of the group (ours alone)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, time.perf_counter() - start


def read_steps(folder: Path, rank: int) -> list[dict]:
    path = folder / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def step_figures(rows: list[dict]) -> dict:
    """Median seconds per step (phase 1, phase 2, all) and the peak RSS of one process's steps."""
    timed = [r for r in rows if r["seconds"] is not None]
    out = {"steps": len(rows)}
    for name, sel in (
        ("s_per_step", timed),
        *((f"s_per_step_phase{p}", [r for r in timed if r["phase"] == p]) for p in (1, 2)),
    ):
        out[name] = round(statistics.median(r["seconds"] for r in sel), 3) if sel else None
    out["peak_rss_mib"] = max((r["peak_rss_mib"] for r in rows), default=None)
    out["workers_pss_mib"] = max((r["workers_pss_mib"] for r in rows), default=None)
    out["cpu_s_at_last_step"] = rows[-1]["cpu_s"] if rows else None
    return out


def empty_steps(runs: Sequence[list[list[dict]]]) -> list[dict]:
    """Steps at which one process's batch held no training box: ``{"run", "step", "rank", "other_boxes"}``."""
    found = []
    for run, ranks in enumerate(runs):
        by_step = [{r["step"]: r for r in rows} for rows in ranks]
        for rank, steps in enumerate(by_step):
            for step, row in sorted(steps.items()):
                if row["boxes"] == 0:
                    others = [s[step]["boxes"] for k, s in enumerate(by_step) if k != rank and step in s]
                    found.append({"run": run, "step": step, "rank": rank, "phase": row["phase"], "other_boxes": others})
    return found


def load_results(results: Path, ann_file: Path) -> dict:
    """The results json loaded by pycocotools against the val annotations: detections and images in it."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(str(results))
    return {"detections": len(dt.anns), "images": len({a["image_id"] for a in dt.anns.values()})}


def rehearse(cfg: RehearseConfig) -> dict:
    """Runs the rehearsal; returns what it writes to ``<out>/rehearsal.json``."""
    from sapd.data.coco_like import make_coco_like, quirks

    form = dict(FORMS[cfg.form])
    timeout = cfg.timeout or form["timeout"]
    out = Path(cfg.out).resolve()
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for old in ("killed", "resumed"):  # runs of an earlier rehearsal (the data set is reused)
        if (out / old).exists():
            shutil.rmtree(out / old)
    data_root = make_coco_like(out / "data", num_train=form["num_train"], num_val=form["num_val"])
    drawn = {split: quirks(data_root, split) for split in ("train", "val")}
    draw_s = time.perf_counter() - start
    log(f"rehearse ({cfg.form}): data set {data_root} drawn in {draw_s:.0f} s: {drawn['train']}")

    overrides = [*train_overrides(form, data_root), *cfg.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("LOCAL_RANK", None)
    runs, codes, seconds = {}, {}, {}
    killed, resumed = out / "killed", out / "resumed"
    results = resumed / "results_val.json"
    for name, folder, extra, kill_at in (
        ("killed", killed, [], form["kill_at"]),
        ("resumed", resumed, [f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"], -1),
    ):
        folder.mkdir(parents=True)
        run_env = {**env, "SAPD_REHEARSE_OUT": str(folder), "SAPD_REHEARSE_KILL_AT": str(kill_at)}
        run_env["SAPD_REHEARSE_RESULTS"] = str(folder / results.name)
        cmd = [sys.executable, "-m", "benchmarks.rehearse_train", *overrides, *extra, f"hydra.run.dir={folder}"]
        log(f"rehearse: {name} run: {' '.join(cmd[1:])}")
        codes[name], seconds[name] = run_group(cmd, env=run_env, timeout=timeout, log_file=folder / "run.log")
        runs[name] = [read_steps(folder, rank) for rank in range(2)]
        log(f"rehearse: {name} run ended with exit code {codes[name]} after {seconds[name]:.0f} s")
        if name == "killed" and not (killed / "checkpoints" / "last.ckpt").is_file():
            break

    steps_per_epoch = form["num_train"] // 2
    total_steps = steps_per_epoch * form["epochs"]
    failures = []
    if codes["killed"] != -signal.SIGKILL:
        failures.append(
            f"the killed run ended with exit code {codes['killed']}, not by SIGKILL at step {form['kill_at']}"
        )
    ckpt_step = None
    if (killed / "checkpoints" / "last.ckpt").is_file():
        import torch

        state = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        ckpt_step = int(state["global_step"])
    if codes.get("resumed") != 0:
        failures.append(f"the resumed run ended with exit code {codes.get('resumed')} (log: {resumed / 'run.log'})")
    ends = [json.loads(p.read_text()) for p in sorted(resumed.glob("rank*_end.json"))]
    if len(ends) != 2:
        failures.append(f"{len(ends)} of 2 processes of the resumed run finished")
    else:
        if ends[0]["checksum"] != ends[1]["checksum"] or not all(e["finite"] for e in ends):
            failures.append("the two processes' weights differ (or are not finite) at the end")
        if ends[0]["global_step"] != total_steps:
            failures.append(f"the resumed run ended at step {ends[0]['global_step']}, not {total_steps}")
    empty = empty_steps([runs.get("killed", [[], []]), runs.get("resumed", [[], []])])
    lone = [e for e in empty if e["other_boxes"] and all(b > 0 for b in e["other_boxes"])]
    if not lone:
        failures.append("no step had one process's batch without a training box while the other's had boxes")
    phases = {r["phase"] for run in runs.values() for rows in run for r in rows}
    if phases != {1, 2}:
        failures.append(f"phases trained: {sorted(phases)}, not 1 and 2")
    loaded = None
    try:
        loaded = load_results(results, data_root / "annotations" / "instances_val2017.json")
    except Exception as e:  # noqa: BLE001 - any failure to load is what is checked
        failures.append(f"the results json {results} does not load with pycocotools: {type(e).__name__}: {e}")
    summary_file = resumed / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}

    report = {
        "form": cfg.form,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info("cpu"),
        "command": f"{PROG} form={cfg.form}",
        "overrides": overrides,
        "drawn": drawn,
        "exit_codes": codes,
        "seconds": {"draw": round(draw_s, 1), **{k: round(v, 1) for k, v in seconds.items()}},
        "kill": {"at_step": form["kill_at"], "checkpoint_step": ckpt_step},
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "processes": {name: [step_figures(rows) for rows in ranks] for name, ranks in runs.items()},
        "ends": [{k: v for k, v in e.items() if k != "checksum"} for e in ends],
        "empty_batch_steps": empty,
        "data_counts": summary.get("data_counts", {}),
        "instance_counts": summary.get("instance_counts", {}),
        "seconds_per_step_summary": summary.get("seconds_per_step"),
        "metrics": {k: summary.get("metrics", {}).get(k) for k in ("map", "map_50")},
        "results": loaded,
        "failures": failures,
    }
    report["seconds"]["total"] = round(time.perf_counter() - start, 1)
    # CPU seconds of the busier process of each run (the two run side by side, one core each): about the
    # wall time of the runs on an otherwise idle machine with 2 cores, less the waits on each other
    killed_cpu = [p["cpu_s_at_last_step"] for p in report["processes"].get("killed", [])]
    resumed_cpu = [e.get("cpu_s") for e in ends]
    if all(v is not None for v in killed_cpu + resumed_cpu) and killed_cpu and resumed_cpu:
        report["seconds"]["cpu_busier_process"] = {"killed": max(killed_cpu), "resumed": max(resumed_cpu)}
    (out / "rehearsal.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    return report


def format_report(r: dict) -> str:
    """What a GPU user wants to know, as lines."""
    lines = [f"rehearsal ({r['form']}), {r['date']}, load average {r['machine'].get('load_average')}:"]
    for name, ranks in r["processes"].items():
        for rank, p in enumerate(ranks):
            lines.append(
                f"  {name} run, process {rank}: {p['steps']} steps, s/step {p['s_per_step']} "
                f"(phase 1 {p['s_per_step_phase1']}, phase 2 {p['s_per_step_phase2']}), "
                f"peak RSS {p['peak_rss_mib']} MiB, loader workers (PSS) {p['workers_pss_mib']} MiB"
            )
    lines.append(
        f"  killed at step {r['kill']['at_step']}, resumed from last.ckpt of step {r['kill']['checkpoint_step']}"
    )
    empty = r["empty_batch_steps"]
    shown = ", ".join(f"run {e['run']} step {e['step']} process {e['rank']}" for e in empty[:6])
    lines.append(f"  steps whose batch held no training box: {len(empty)} ({shown}{', ...' if len(empty) > 6 else ''})")
    for split, c in r["data_counts"].items():
        lines.append(
            f"  {split}: {c.get('images')} images ({c.get('no_annotations')} without annotations, "
            f"{c.get('empty_images')} without a training box, {c.get('dropped_empty')} dropped), "
            f"{c.get('boxes')} boxes, {c.get('crowd')} crowd, "
            f"{c.get('degenerate_boxes')} degenerate dropped ({c.get('zero_size_boxes')} zero-size), "
            f"{c.get('unknown_category')} unknown category, {c.get('skipped_images')} images skipped"
        )
    lines.append(f"  results json: {r['results']}; COCO AP {r['metrics'].get('map')}")
    lines.append(f"  seconds: {r['seconds']}")
    lines += [f"  FAILED: {f}" for f in r["failures"]] or ["  all checks passed"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> dict:
    cfg = parse(RehearseConfig, argv, prog=PROG, summary=__doc__.strip().splitlines()[0])
    report = rehearse(cfg)
    if report["failures"]:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

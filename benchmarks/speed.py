"""Speed and memory of SAPD against torchvision RetinaNet and FCOS, and the cost of every part.

``python -m benchmarks [key=value ...]`` (``make bench``, run from the repository root) measures, in one
process, interleaved, on the same backbone, input tensor and threads:

- inference latency at batch 1, network only and end to end, for SAPD (with and without BFP),
  RetinaNet and FCOS;
- one training step at batch 2 for SAPD phase 1, SAPD phase 2 and FCOS;
- the share of the SAPD step spent in targets + losses + selection network, and that loss part's cost
  with 1 ... 500 instances per image;
- peak extra memory of each (a fresh process per measurement by default);
- speed options (channels_last, bf16 autocast, bf16 weights, torch.compile) on SAPD inference;
- on CUDA (or with ``fps=true``): FPS of SAPD R-50 / R-101 / X-101-64x4d with and without DCN beside the
  paper's 1080Ti figures.

It prints the Markdown table, and writes it with the JSON (``out=``, default ``benchmarks/results.json``
and ``benchmarks/results.md``). How each number is taken is in :mod:`benchmarks.measure` and
:mod:`benchmarks.workloads`; the SAPD models are composed from the project's ``conf/``
(:mod:`benchmarks.configs`). ``python -m benchmarks help`` lists every key.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch  # OMP_WAIT_POLICY is set before this by the package (benchmarks/__init__.py)

from .cli import parse
from .configs import REPO_ROOT
from .measure import (
    frozen_heap,
    log,
    machine_info,
    measure_extra_memory,
    run_interleaved,
    summarize,
    time_call,
)
from .report import evaluate_goals, ratio, to_markdown, write_results
from .workloads import BenchConfig, Workbench, padded_size

INFER_MODELS = ("sapd", "sapd_bfp", "retinanet", "fcos")

QUICK = {
    "size": (128, 192),
    "backbone": "resnet18",
    "warmup": 1,
    "reps_infer": 2,
    "reps_train": 1,
    "reps_assign": 1,
    "share_instances": (10, 100),
    "assign_instances": (1, 10, 100),
    "assign_memory_size": (192, 256),
    "assign_memory_instances": 100,
    "memory": "inprocess",
    "fps_backbones": ("resnet18",),
    "fps_reps": 1,
}


CUDA = {
    "size": (800, 1333),
    "warmup": 3,
    "reps_infer": 20,
    "reps_train": 10,
    "reps_assign": 20,
    "amp_dtype": "float16",
    "memory": "inprocess",
    "fps": True,
}

PROG = "python -m benchmarks"


def _presets(cfg) -> list[dict]:
    """The CUDA sizes and repetitions for ``device=cuda``, then the ``quick=true`` ones; the command line wins."""
    return ([CUDA] if str(cfg.device).startswith("cuda") else []) + ([QUICK] if cfg.quick else [])


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    """``key=value`` command line -> :class:`BenchConfig` (``help`` prints every key)."""
    cfg = parse(
        BenchConfig,
        [] if argv is None else argv,
        prog=PROG,
        summary=__doc__.split("\n\n")[0] + "\nFull CPU run: ~7 min on an idle 2-core machine. Smoke run: quick=true.",
        presets=_presets,
    )
    if cfg.threads <= 0:
        cfg.threads = os.cpu_count() or 1
    return cfg


# --------------------------------------------------------------------------- sections


def _medians(samples: dict[str, list[float]]) -> dict[str, dict]:
    return {k: summarize(v) for k, v in samples.items()}


def _memory(cfg: BenchConfig, wb: Workbench, names: list[str]) -> dict[str, dict]:
    """Peak extra memory of each task, in a fresh process each (``subprocess``) or here."""
    out: dict[str, dict] = {}
    for i, name in enumerate(names):
        log(f"[memory] {i + 1}/{len(names)} {name} ({cfg.memory})")
        try:
            if cfg.memory == "subprocess":
                out[name] = _memory_subprocess(cfg, name)
            else:
                fn = wb.task(name)
                fn()  # warm-up: lazy initialisation and optimizer state exist before the measured call
                out[name] = measure_extra_memory(fn, wb.device)
        except Exception as err:  # a failed measurement must not lose the timings
            log(f"[memory] {name} failed: {type(err).__name__}: {err}")
            out[name] = {"extra_bytes": None, "error": f"{type(err).__name__}: {err}"}
    return out


def _memory_subprocess(cfg: BenchConfig, name: str) -> dict:
    request = json.dumps({"config": cfg.to_dict(), "task": name})
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_worker"],
        input=request,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path},
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _profile(wb: Workbench, names: list[str]) -> dict[str, dict]:
    """One profiled call of each task: the top operators by self CPU time and the ``sapd/*`` phases."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if wb.device.type == "cuda" else [])
    out = {}
    for name in names:
        fn = wb.task(name)
        fn()
        with profile(activities=acts) as prof:
            fn()
        avg = prof.key_averages()
        phases = {e.key: e.cpu_time_total / 1e3 for e in avg if e.key.startswith("sapd/")}
        table = avg.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=44)
        out[name] = {"phases": phases, "table": table}
    return out


def run(cfg: BenchConfig, command: str = PROG) -> dict:
    """Runs every section of the benchmark and returns the results dict (what is written as JSON).

    Sets the thread count and flush-denormal mode for the run and restores them afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # denormals would slow some models at random; same for all
    try:
        with frozen_heap():
            return _run(cfg, command)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def _run(cfg: BenchConfig, command: str) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    wb = Workbench(cfg)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
        "machine": machine_info(wb.device),
        "load_start": _load(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    log(f"machine: {meta['machine']['cpu']}, threads {cfg.threads}, device {cfg.device}")
    samples: dict[str, list[float]] = {}
    notes: list[str] = []

    # 1. inference, network only and end to end
    infer = [f"infer/{mode}/{m}" for mode in ("network", "e2e") for m in INFER_MODELS]
    log("[build] inference models")
    tasks = {n: wb.task(n) for n in infer}
    samples |= run_interleaved(tasks, reps=cfg.reps_infer, warmup=cfg.warmup, device=wb.device, label="inference")
    del tasks

    # 2. speed options on SAPD inference
    options: dict[str, dict] = {}
    if cfg.options:
        variants = wb.option_variants()
        tasks = {}
        for v in variants:
            try:
                tasks[v] = wb.task(f"option/{v}")
                first, _ = time_call(tasks[v], wb.device)  # compile time for compiled variants
                options[v] = {"first_call_s": first}
            except Exception as err:
                log(f"[options] {v} failed: {type(err).__name__}: {err}")
                notes.append(f"speed option {v} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                tasks.pop(v, None)
        opt_samples = run_interleaved(tasks, reps=cfg.reps_infer, warmup=cfg.warmup, device=wb.device, label="options")
        base = summarize(opt_samples.get("fp32", []))["median"]
        for v, s in opt_samples.items():
            st = summarize(s)
            options[v].update(st, speedup=ratio(base, st["median"]))
        del tasks

    # 3. training steps
    extra_share = [n for n in cfg.share_instances if n != cfg.train_instances]
    train = ["train/sapd_p1", "train/sapd_p2", *[f"train/sapd_p2@{n}" for n in extra_share], "train/fcos"]
    train += [f"assign/{n}" for n in cfg.share_instances]  # the share's numerator, in the same loop
    log("[build] training models")
    tasks = {n: wb.task(n) for n in train}
    samples |= run_interleaved(tasks, reps=cfg.reps_train, warmup=cfg.warmup, device=wb.device, label="training")
    del tasks

    # 4. the loss part alone, by instances per image (and the big input for memory)
    counts = sorted(set(cfg.assign_instances) | set(cfg.share_instances))
    tasks = {f"assign/{n}": wb.task(f"assign/{n}") for n in counts if n not in cfg.share_instances}
    samples |= run_interleaved(tasks, reps=cfg.reps_assign, warmup=cfg.warmup, device=wb.device, label="assignment")
    big = f"assign_big/{cfg.assign_memory_instances}"  # several seconds a call on CPU: 3 repetitions
    samples |= run_interleaved({big: wb.task(big)}, reps=min(3, cfg.reps_assign), warmup=1, device=wb.device, label=big)
    del tasks

    timings = _medians(samples)
    med = {k: v["median"] for k, v in timings.items()}

    # 5. memory
    memory: dict[str, dict] = {}
    if cfg.memory != "off":
        names = [f"infer/e2e/{m}" for m in INFER_MODELS] + ["train/sapd_p1", "train/sapd_p2", "train/fcos"]
        names += [f"assign/{n}" for n in counts] + [f"assign_big/{cfg.assign_memory_instances}"]
        memory = _memory(cfg, wb, names)

    # 6. FPS table (CUDA, or on request)
    fps: dict | None = None
    if cfg.fps:
        fps_names = [f"fps/{b}{suffix}" for b in cfg.fps_backbones for suffix in ("", "_dcn")]
        tasks = {}
        for n in fps_names:
            try:
                tasks[n] = wb.task(n)
            except Exception as err:
                notes.append(f"{n} not built: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        fps_samples = run_interleaved(tasks, reps=cfg.fps_reps, warmup=cfg.warmup, device=wb.device, label="fps")
        fps = {"_device": wb.device.type}
        for n, s in fps_samples.items():
            if "/" not in n.removeprefix("fps/"):
                fps[n.removeprefix("fps/")] = ratio(1.0, summarize(s)["median"])
        del tasks

    # 7. profiles
    profile = None
    if cfg.profile:
        log("[profile] SAPD phase-2 step, loss part, e2e inference")
        names = ["train/sapd_p2"] + [f"train/sapd_p2@{n}" for n in extra_share]
        names += [f"assign/{n}" for n in cfg.share_instances] + ["infer/e2e/sapd", "infer/e2e/fcos"]
        profile = _profile(wb, names)

    # ratios, shares, goals
    ratios: dict[str, float] = {}
    for mode in ("network", "e2e"):
        for a in ("sapd", "sapd_bfp"):
            for b in ("retinanet", "fcos"):
                ratios[f"infer/{mode}:{a}/{b}"] = ratio(med.get(f"infer/{mode}/{a}"), med.get(f"infer/{mode}/{b}"))
    for a in ("sapd_p1", "sapd_p2"):
        ratios[f"train:{a}/fcos"] = ratio(med.get(f"train/{a}"), med.get("train/fcos"))
    mem_x = {k: v.get("extra_bytes") for k, v in memory.items()}
    if memory:
        for b in ("retinanet", "fcos"):
            ratios[f"memory/infer/e2e:sapd/{b}"] = ratio(mem_x.get("infer/e2e/sapd"), mem_x.get(f"infer/e2e/{b}"))
        ratios["memory/train:sapd_p2/fcos"] = ratio(mem_x.get("train/sapd_p2"), mem_x.get("train/fcos"))
    share, share_in_step = {}, {}
    for n in cfg.share_instances:
        step = med.get("train/sapd_p2" if n == cfg.train_instances else f"train/sapd_p2@{n}")
        loss_fwd = med.get(("train/sapd_p2" if n == cfg.train_instances else f"train/sapd_p2@{n}") + "/loss_forward")
        share[str(n)] = ratio(med.get(f"assign/{n}"), step)
        share_in_step[str(n)] = ratio(loss_fwd, step)

    notes += [
        "Taken while other processes used the CPU; ratios come from interleaved samples of one loop.",
        "torchvision models use FrozenBatchNorm2d and trainable_layers=3 (their configuration with a pretrained "
        "backbone); their P6 is computed from P5, SAPD's from C5 (as in the paper).",
        f"SGD lr {cfg.lr} (tiny, keeps random weights stable; the work per step does not depend on it).",
        "Inference always under torch.inference_mode(); the SAPD feature-selection net never runs at inference.",
    ]
    if wb.device.type != "cuda":
        notes.append("GPU FPS (800x1333) not measured here: no CUDA device; run with device=cuda.")
    hp, wp = padded_size(cfg.size, cfg.pad)
    results = {
        "meta": meta,
        "config": cfg.to_dict(),
        "padded_size": [hp, wp],
        "assign_big_padded": list(padded_size(cfg.assign_memory_size, cfg.pad)),
        "params": {m: wb.num_parameters(m) for m in INFER_MODELS},
        "timings": timings,
        "ratios": ratios,
        "share": share,
        "share_in_step": share_in_step,
        "share_instances_extra": extra_share,
        "assign_instances_all": counts,
        "memory": memory,
        "memory_mode": cfg.memory,
        "options": options,
        "fps": fps,
        "profile": profile,
        "notes": notes,
    }
    results["goals"] = evaluate_goals(results)
    meta["load_end"] = _load()
    meta["wall_s"] = time.perf_counter() - t_start
    return results


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: run, print the Markdown table and the goals, write JSON + Markdown."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    command = PROG + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    results = run(cfg, command)
    json_path, md_path = write_results(results, Path(cfg.out))
    print(to_markdown(results))
    for g in results["goals"]:
        print(f"{g['status']:4s}  {g['goal']}: {g['value']} (target <= {g['target']} {g['unit']})")
    log(f"wrote {json_path} and {md_path} ({results['meta']['wall_s']:.0f} s)")
    return results

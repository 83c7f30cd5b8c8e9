"""Ratios, goals and the Markdown table of a speed run (the JSON is the results dict itself)."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Table 5 / Table 6 of the paper, FPS on one 1080Ti; SAPD rows include BFP.
PAPER_FPS = {
    "resnet50": 14.9,
    "resnet101": 11.2,
    "resnext101_64x4d": 6.1,
    "resnet50_dcn": 12.4,
    "resnet101_dcn": 9.1,
    "resnext101_64x4d_dcn": 4.5,
}
PAPER_RETINANET_R50_FPS = 11.6

MIB = 2**20
GIB = 2**30


def ratio(num: float | None, den: float | None) -> float:
    """``num / den``, NaN where either is missing or ``den`` is not positive."""
    if num is None or den is None or not den > 0 or not math.isfinite(num) or not math.isfinite(den):
        return float("nan")
    return num / den


def evaluate_goals(results: dict) -> list[dict]:
    """The speed goals as rows ``{goal, value, target, unit, status}`` (PASS / MISS / N/A)."""
    r = results["ratios"]
    share = results.get("share", {})
    mem = results.get("memory", {})
    big = results["config"]["assign_memory_instances"]
    big_mem = mem.get(f"assign_big/{big}", {}).get("extra_bytes")
    h, w = results["config"]["assign_memory_size"]
    rows = [
        ("SAPD inference (e2e) / RetinaNet", r.get("infer/e2e:sapd/retinanet"), 0.65, "x"),
        ("SAPD inference (e2e) / FCOS", r.get("infer/e2e:sapd/fcos"), 1.0, "x"),
        ("SAPD phase-2 training step / FCOS", r.get("train:sapd_p2/fcos"), 1.0, "x"),
    ]
    for n, target in ((10, 0.10), (100, 0.20)):
        rows.append((f"targets+losses+selection share of SAPD step, {n} inst/img", share.get(str(n)), target, "share"))
    rows.append(
        (f"assignment extra memory, {big} inst/img at {h}x{w}", None if big_mem is None else big_mem / GIB, 1.0, "GiB")
    )
    goals = []
    for name, value, target, unit in rows:
        ok = value is not None and math.isfinite(value)
        status = ("PASS" if value <= target else "MISS") if ok else "N/A"
        goals.append({"goal": name, "value": value if ok else None, "target": target, "unit": unit, "status": status})
    return goals


def _s(stats: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if not stats or not stats.get("n"):
        return "-"
    return f"{stats['median'] * scale:.{digits}f}"


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mib(mem: dict | None) -> str:
    if not mem or mem.get("extra_bytes") is None:
        return "-"
    return f"{mem['extra_bytes'] / MIB:.0f}"


def to_markdown(res: dict) -> str:
    """The whole run as Markdown (what ``python -m benchmarks`` prints and writes beside the JSON)."""
    cfg, meta, t = res["config"], res["meta"], res["timings"]
    m, mem, r = meta["machine"], res.get("memory", {}), res["ratios"]
    hp, wp = res["padded_size"]
    lines = [
        "# SAPD benchmarks",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu']} ({m['logical_cores']} logical / {m['physical_cores']} physical cores, "
        f"{m['memory_gib']} GiB, flags {', '.join(m['cpu_flags']) or '-'}); device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; torch threads {m['torch_threads']}",
        f"- software: torch {m['torch']}, torchvision {m['torchvision']}, timm {m['timm']}, Python {m['python']}",
        f"- load average at start / end: {meta.get('load_start')} / {meta.get('load_end')}; "
        f"OMP_WAIT_POLICY={meta.get('omp_wait_policy')}; "
        f"wall time of the run {meta.get('wall_s', 0):.0f} s",
        f"- backbone {cfg['backbone']} (random weights) + FPN 256 P3-P7 + 4x256 head for all; "
        f"input {cfg['size'][0]}x{cfg['size'][1]} padded to {hp}x{wp} (divisor {cfg['pad']}), the same tensor "
        f"for every model; {cfg['num_classes']} classes; post-processing mode `{cfg['post']}`; "
        f"channels_last={cfg['channels_last']}, amp={cfg['amp']}" + (f" ({cfg['amp_dtype']})" if cfg["amp"] else ""),
        "- SAPD composed from the project's conf/ (`model=sapd`, random weights"
        + (f"; overrides `{' '.join(cfg['overrides'])}`)" if cfg.get("overrides") else ")"),
        f"- repetitions (median of): inference {cfg['reps_infer']}, training {cfg['reps_train']}, "
        f"assignment {cfg['reps_assign']}; {cfg['warmup']} warm-up round(s) dropped; tasks interleaved round-robin",
        "",
        "## Goals",
        "",
        "| goal | measured | target | status |",
        "|---|---|---|---|",
    ]
    for g in res["goals"]:
        val = "-" if g["value"] is None else (f"{g['value']:.1%}" if g["unit"] == "share" else f"{g['value']:.3f}")
        tgt = f"{g['target']:.0%}" if g["unit"] == "share" else f"{g['target']} {g['unit']}"
        lines.append(f"| {g['goal']} | {val} | <= {tgt} | **{g['status']}** |")

    lines += [
        "",
        f"## Inference, batch 1 ({hp}x{wp}), `torch.inference_mode()`",
        "",
        "Network = backbone + FPN + head; e2e = padding + network + post-processing (+ anchor generation "
        "for torchvision) down to the final detections. Medians in seconds.",
        "",
        "| model | params (M) | network (s) | e2e (s) | detections | e2e extra memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("sapd", "sapd_bfp", "retinanet", "fcos"):
        det = t.get(f"infer/e2e/{name}/detections")
        lines.append(
            f"| {name} | {res['params'].get(name, 0) / 1e6:.1f} | {_s(t.get(f'infer/network/{name}'))} | "
            f"{_s(t.get(f'infer/e2e/{name}'))} | {_x(det['median'] if det else None, 0)} | "
            f"{_mib(mem.get(f'infer/e2e/{name}'))} |"
        )
    lines += ["", "| ratio | network | e2e |", "|---|---|---|"]
    for a in ("sapd", "sapd_bfp"):
        for b in ("retinanet", "fcos"):
            lines.append(f"| {a} / {b} | {_x(r.get(f'infer/network:{a}/{b}'))} | {_x(r.get(f'infer/e2e:{a}/{b}'))} |")

    lines += [
        "",
        f"## Training step, batch {cfg['train_batch']}, {cfg['train_instances']} instances per image",
        "",
        "Forward, targets, losses, backward, SGD step (momentum 0.9, weight decay 1e-4). `loss fwd` is the "
        "wall time of the `net.loss(...)` call inside the step (its backward is not separable there; see the "
        "share below).",
        "",
        "| model | step (s) | loss fwd in step (s) | extra memory (MiB) |",
        "|---|---|---|---|",
    ]
    for name in ["sapd_p1", "sapd_p2", *[f"sapd_p2@{n}" for n in res["share_instances_extra"]], "fcos"]:
        lines.append(
            f"| {name} | {_s(t.get(f'train/{name}'))} | {_s(t.get(f'train/{name}/loss_forward'))} | "
            f"{_mib(mem.get(f'train/{name}'))} |"
        )
    lines += [
        "",
        "| ratio | value |",
        "|---|---|",
        f"| sapd_p1 / fcos | {_x(r.get('train:sapd_p1/fcos'))} |",
        f"| sapd_p2 / fcos | {_x(r.get('train:sapd_p2/fcos'))} |",
        f"| sapd_p2 extra memory / fcos | {_x(r.get('memory/train:sapd_p2/fcos'))} |",
        "",
        "## Targets + losses + selection network",
        "",
        "Method: the loss part (`net.loss` = ownership, per-point losses, level selection, selection net, "
        "Eq. 6; phase 2) forward **and** backward, run on real head outputs of the same input size held as leaf "
        "tensors (the graph is cut at the head outputs, so the backward stops there), timed in the same "
        "interleaved loop as the training steps; share = its median / median of the full phase-2 step with the "
        "same instances.",
        "",
        "| instances/img | loss part fwd+bwd (ms) | SAPD p2 step (s) | share | loss fwd in step / step |",
        "|---|---|---|---|---|",
    ]
    for n in cfg["share_instances"]:
        step_key = "train/sapd_p2" if n == cfg["train_instances"] else f"train/sapd_p2@{n}"
        lines.append(
            f"| {n} | {_s(t.get(f'assign/{n}'), 1e3, 1)} | {_s(t.get(step_key))} | "
            f"{_x(res['share'].get(str(n)), 3)} | {_x(res['share_in_step'].get(str(n)), 3)} |"
        )
    lines += [
        "",
        f"## Assignment cost (loss part, forward + backward, batch {cfg['train_batch']}, phase 2)",
        "",
        "| input | instances/img | median (ms) | extra memory (MiB) |",
        "|---|---|---|---|",
    ]
    for n in res["assign_instances_all"]:
        lines.append(f"| {hp}x{wp} | {n} | {_s(t.get(f'assign/{n}'), 1e3, 1)} | {_mib(mem.get(f'assign/{n}'))} |")
    big, (bh, bw) = cfg["assign_memory_instances"], res["assign_big_padded"]
    big_key = f"assign_big/{big}"
    lines.append(f"| {bh}x{bw} | {big} | {_s(t.get(big_key), 1e3, 1)} | {_mib(mem.get(big_key))} |")
    if mem:
        method = next(iter(mem.values())).get("method", "")
        lines += ["", f"Memory: {res.get('memory_mode')} mode; {method}."]

    lines += ["", "## Speed options (SAPD inference, network only, batch 1)", ""]
    if res.get("options"):
        lines += ["| variant | median (s) | speed-up vs fp32 | first call (s) |", "|---|---|---|---|"]
        for v, row in res["options"].items():
            lines.append(f"| {v} | {_x(row['median'], 3)} | {_x(row['speedup'])} | {_x(row.get('first_call_s'), 1)} |")
        lines.append("")
        lines.append(
            "`first call` of a compiled variant is the compile time (plus one run). bf16 autocast keeps fp32 "
            "weights and casts per op; `bf16_weights` casts the model once (`model.bfloat16()`)."
        )
    else:
        lines.append("not measured (`options=false`).")

    lines += ["", "## GPU: FPS at 800x1333, batch 1 (SAPD with BFP, e2e)", ""]
    fps = res.get("fps")
    lines += ["| backbone | DCN | measured FPS | paper FPS (1080Ti) |", "|---|---|---|---|"]
    keys = list(PAPER_FPS) + [k for k in (fps or {}) if k not in PAPER_FPS and not k.startswith("_")]
    for key in keys:
        got = fps.get(key) if fps else None
        lines.append(
            f"| {key.removesuffix('_dcn')} | {'yes' if key.endswith('_dcn') else 'no'} | "
            f"{_x(got, 2) if got else 'not measured'} | {PAPER_FPS.get(key, '-')} |"
        )
    lines.append(f"| RetinaNet resnet50 | no | see ratios above | {PAPER_RETINANET_R50_FPS} |")
    if not fps or fps.get("_device") != "cuda":
        lines.append("")
        lines.append(
            "Not measured on a GPU here (no CUDA device on this machine); run "
            "`python -m benchmarks device=cuda` (800x1333, FPS and the same ratios)."
            + (" The FPS rows above were measured on the CPU." if fps else "")
        )
    if res.get("profile"):
        lines += ["", "## Profile (torch.profiler, one call each)", ""]
        for name, prof in res["profile"].items():
            lines.append(f"### {name}")
            lines.append("")
            if prof.get("phases"):
                lines += ["| phase | CPU total (ms) | share |", "|---|---|---|"]
                total = sum(prof["phases"].values())
                for k, v in prof["phases"].items():
                    lines.append(f"| {k} | {v:.1f} | {_x(ratio(v, total), 3)} |")
                lines.append("")
            lines.append("```")
            lines.append(prof["table"])
            lines.append("```")
            lines.append("")
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    """Writes ``out`` (JSON) and the Markdown beside it (same name, ``.md``); returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    out.write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    md.write_text(to_markdown(results))
    return out, md


def _clean(obj):
    """JSON-safe copy: NaN / inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

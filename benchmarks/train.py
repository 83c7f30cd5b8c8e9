"""Seconds per training step of the CPU models, as ``python -m sapd.train`` runs them.

``python -m benchmarks suite=train [steps=40] [warmup=5] [rounds=3] [cases=[sapd_p1,sapd_p2,fcos]]``
times SAPD (``model=tiny``) in phase 1 (FSAF selection) and in phase 2 (soft-selected levels), and the
FCOS peer (``model=fcos``: torchvision's head and loss on the same backbone and FPN) on the default
recipe: ``data=synthetic`` and ``trainer=laptop`` of the project's ``conf/`` (precision ``auto``,
channels-last, batches of 8 grouped by aspect ratio, the optimiser and gradient clipping of the run).

Each case is a Lightning fit of ``warmup + steps`` batches without validation, checkpoints or logger,
built from the composed config as ``sapd.train`` builds it. A callback notes the time at the end of
every batch; a step is the gap between two ends, so it holds loading the batch, forward, loss,
backward, clipping and the optimiser step: what a run's ``seconds_per_step`` (``summary.json``) holds,
less validation. The cases run round-robin ``rounds`` times, each round on a fresh model and the
same batches; the table gives the median over all timed steps and the median of each round.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import open_dict

from .cli import lists_to_tuples, option, parse
from .configs import compose_config
from .measure import log, machine_info

PROG = "python -m benchmarks suite=train"

# case -> (name in the table, overrides of conf/train.yaml)
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sapd_p1": ("SAPD phase 1 (model=tiny, FSAF selection)", ("model=tiny", "callbacks.phase_switch.switch_epoch=1")),
    "sapd_p2": ("SAPD phase 2 (model=tiny, soft selection)", ("model=tiny", "callbacks.phase_switch.switch_epoch=0")),
    "fcos": ("FCOS (model=fcos)", ("model=fcos",)),
}


@dataclass
class TrainStepConfig:
    """Settings of the training-step benchmark (``python -m benchmarks suite=train help``)."""

    cases: tuple[str, ...] = option(tuple(CASES), f"cases to time, of {', '.join(CASES)}")
    steps: int = option(40, "timed steps per case and round")
    warmup: int = option(5, "steps dropped at the start of every fit (first batches, allocator warm-up)")
    rounds: int = option(3, "round-robin rounds over the cases, a fresh model each")
    threads: int = option(0, "torch threads (0: all logical cores)")
    overrides: tuple[str, ...] = option((), "Hydra overrides of conf/ for every case, e.g. [data.batch_size=16]")
    out: str = option("benchmarks/results_train.json", "JSON of the figures (and .md beside it); empty: write nothing")
    quick: bool = option(
        False, "a tiny synthetic set in a temporary folder, batches of 2 at 128 px, 2 steps, 1 round (smoke runs)"
    )

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        unknown = [c for c in self.cases if c not in CASES]
        if unknown or not self.cases:
            raise ValueError(f"cases must be some of {', '.join(CASES)}, got {list(self.cases)}")
        if self.steps < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("steps and rounds must be >= 1 and warmup >= 0")


QUICK = {"steps": 2, "warmup": 1, "rounds": 1, "out": ""}
# a smoke run's data: a tiny drawn set, and batches of 2 small images instead of the recipe's 8 at 224 px
QUICK_DATA = (
    "data.synthetic.num_train=24",
    "data.synthetic.num_val=2",
    "data.synthetic.max_objects=4",
    "data.batch_size=2",
    "data.min_size=128",
    "data.max_size=192",
)


class StepClock(L.Callback):
    """The wall-clock time at the end of every training batch."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def fit_steps(case: str, cfg: TrainStepConfig, root: str, data_root: str | None) -> tuple[list[float], int | None]:
    """Seconds of each timed step of one fit of ``case`` (``warmup`` steps dropped), and the phase
    the detector trained in (None for a detector without phases)."""
    from sapd.build import build_module  # the package, imported once a case runs
    from sapd.utils import resolve_precision, set_threads

    overrides = [*CASES[case][1], "logger=none", "data.seed=0", "seed=0", *cfg.overrides]
    if data_root is not None:
        overrides += [f"data.root={data_root}", *QUICK_DATA]
    run = compose_config(overrides)
    set_threads(cfg.threads or None)
    L.seed_everything(0, workers=True, verbose=False)
    datamodule = instantiate(run.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(
        run, label_to_cat_id=list(datamodule.label_to_cat_id), class_names=list(datamodule.class_names)
    )
    clock = StepClock()
    callbacks = [instantiate(run.callbacks.phase_switch), clock]
    total = cfg.warmup + cfg.steps
    with open_dict(run):
        run.trainer.default_root_dir = root
    trainer = instantiate(
        run.trainer,
        callbacks=callbacks,
        logger=False,
        precision=resolve_precision(run.trainer.get("precision", "32-true"), str(run.trainer.get("accelerator"))),
        max_epochs=1,
        max_steps=total,
        limit_train_batches=total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    if len(clock.ends) < total:
        raise RuntimeError(f"{case}: the fit ran {len(clock.ends)} of {total} steps (a data set too small?)")
    phase = int(module.net.phase) if hasattr(module.net, "phase") else None
    ends = clock.ends[cfg.warmup - 1 :] if cfg.warmup else clock.ends
    steps = [b - a for a, b in zip(ends, ends[1:])]
    what = f"phase {phase}" if phase is not None else "no phases"
    log(f"[{case}] {what}: median {statistics.median(steps):.3f} s/step over {len(steps)} steps")
    return steps, phase


def run(cfg: TrainStepConfig) -> dict[str, dict]:
    """Steps of every case, round-robin; prints the markdown table and returns the figures per case."""
    samples: dict[str, list[list[float]]] = {case: [] for case in cfg.cases}
    phases: dict[str, int | None] = {}
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ...", tips: not the benchmark's
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = f"{tmp}/synthetic" if cfg.quick else None
        for rnd in range(cfg.rounds):
            order = list(cfg.cases[rnd % len(cfg.cases) :] + cfg.cases[: rnd % len(cfg.cases)])
            for case in order:
                steps, phases[case] = fit_steps(case, cfg, f"{tmp}/{case}_{rnd}", data_root)
                samples[case].append(steps)
    results = {}
    for case, rounds in samples.items():
        flat = [s for r in rounds for s in r]
        results[case] = {
            "name": CASES[case][0],
            "phase": phases[case],
            "median": statistics.median(flat),
            "round_medians": [statistics.median(r) for r in rounds],
            "steps": len(flat),
        }
    text = markdown(results, cfg)
    print(text)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        figures = {"config": asdict(cfg), "machine": machine_info("cpu"), "results": results}
        out.write_text(json.dumps(figures, indent=2) + "\n")
        args = " ".join(a for a in sys.argv[1:] if not a.startswith("suite="))
        out.with_suffix(".md").write_text(f"`{PROG} {args}`".replace(" `", "`") + "\n\n" + text + "\n")
        log(f"wrote {out} and {out.with_suffix('.md')}")
    return results


def markdown(results: dict[str, dict], cfg: TrainStepConfig) -> str:
    info = machine_info("cpu")
    base = next(iter(results.values()))["median"]
    what = (
        "Smoke run (quick=true: batches of 2 at 128 px, not the recipe's)"
        if cfg.quick
        else "Training step of the default recipe"
    )
    lines = [
        f"{what}, {info.get('cpu', 'cpu')}, torch {info.get('torch')}, "
        f"{info.get('torch_threads')} threads, load average {info.get('load_average')}; "
        f"{cfg.steps} steps x {cfg.rounds} rounds per case after {cfg.warmup} warm-up",
        "",
        "| case | s / step (median) | median of each round | steps | vs first row |",
        "|---|---|---|---|---|",
    ]
    for r in results.values():
        rounds = ", ".join(f"{v:.3f}" for v in r["round_medians"])
        lines.append(f"| {r['name']} | {r['median']:.3f} | {rounds} | {r['steps']} | {r['median'] / base:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    """Command-line entry."""
    cfg = parse(
        TrainStepConfig,
        [] if argv is None else argv,
        prog=PROG,
        summary=__doc__.split("\n\n")[0],
        presets=lambda c: [QUICK] if c.quick else [],
    )
    return run(cfg)

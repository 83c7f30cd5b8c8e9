"""Reading the runs a table is made of: every ``summary.json`` under the given folders, and what
identifies a run in it: its ablation (FSAF, +SW, +SS, +SW+SS, or a peer detector's class name), its
variant (the switches that differ from the paper's setting), its budget, its data and its commit.

Every training run writes ``summary.json`` into its folder (its overrides, seed, model switches, COCO
table and times; :func:`sapd.train.run_summary`); the run's ``report/errors.csv`` adds the AP50 each
TIDE error type costs. Runs of different budgets, data sets or commits are never pooled into one row
or compared (:mod:`sapd.report.table`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sapd.diagnostics.error_analysis import ERRORS_CSV, read_errors_csv
from sapd.models.settings import paper_setting

SUMMARY_FILE = "summary.json"

# The paper's setting of each switch (sapd.models.SAPDCriterion's defaults); a row's variant is the
# list of switches that differ from these.
PAPER_SETTING: dict[str, Any] = paper_setting()
# A run's value of an error type: "dAP_<error>", the AP50 that TIDE error type costs (report/errors.csv),
# on all objects; "dAP_<error>@<size>" on the objects of one of its other sizes (small, medium, large)
ERROR_KEY = "dAP_"
SIZE_MARK = "@"
DEFAULT_DATA = "default"  # the data label of a summary that records none (nor a data override)
# The variant column of a detector other than SAPD (model=fcos): no SAPD switch applies to it.
PEER_VARIANT = "-"
# Switches that do not change a row's computation: without SW, f := 1 (eta and its normalisation
# vanish, and sum w over positives is their number); without SS there is no top-k.
UNUSED = {
    "FSAF": {"eta", "soft_weight_norm", "normaliser", "topk"},
    "+SW": {"topk"},
    "+SS": {"eta", "soft_weight_norm"},
}


def error_key(error: str, size: str = "all") -> str:
    """The key of ``error``'s dAP on objects of ``size`` in a run's ``errors``: ``Loc``, ``Loc@medium``."""
    return error if size == "all" else f"{error}{SIZE_MARK}{size}"


def errors_by_key(by_size: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{error_key: dAP}`` of every size and error type of an errors.csv (:func:`read_errors_csv`)."""
    return {error_key(error, size): value for size, errors in by_size.items() for error, value in errors.items()}


def run_value(run: dict[str, Any], key: str) -> float:
    """A run's value of ``key`` in % (a COCO key of ``metrics``, or ``dAP_<error>`` /
    ``dAP_<error>@<size>`` from its errors.csv); NaN if it has none."""
    if key.startswith(ERROR_KEY):
        value = float(run.get("errors", {}).get(key.removeprefix(ERROR_KEY), math.nan))
        return 100 * value
    value = float(run.get("metrics", {}).get(key, -1))
    return 100 * value if value >= 0 else math.nan


def commit_name(run: dict[str, Any]) -> str | None:
    """The run's commit (12 hex digits, ``-dirty`` when the tree had changes), None when not recorded."""
    commit = run.get("commit")
    if not isinstance(commit, dict) or not commit.get("sha"):
        return None
    return str(commit["sha"])[:12] + ("-dirty" if commit.get("dirty") else "")


def data_key_and_label(run: dict[str, Any]) -> tuple[str, str]:
    """(a key equal for runs on the same data, a short label): from the summary's ``data`` or, for a
    summary that records none, from its ``data`` overrides (none: the default data of its day)."""
    data = run.get("data")
    if isinstance(data, dict) and data:
        label = str(data.get("name") or data.get("_target_") or "data")
        synthetic = data.get("synthetic")
        if isinstance(synthetic, dict) and synthetic.get("seed") is not None:
            label += f" (seed {synthetic['seed']})"
        return json.dumps(data, sort_keys=True, default=str), label
    overrides = sorted(
        o
        for o in run.get("overrides") or ()
        if o.split("=")[0].lstrip("+~") in ("data",) or o.lstrip("+~").startswith("data.")
    )
    return json.dumps(overrides), ", ".join(overrides) or DEFAULT_DATA


def find_summaries(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``summary.json`` under ``paths`` (files or folders), each with its ``path`` added, and
    ``errors`` (``{error type: dAP}`` on all objects, ``{error type@size: dAP}`` per object size) when its
    run's ``report/errors.csv`` exists."""
    runs = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: give a run, multirun or results folder")
        files = [root] if root.is_file() else sorted(root.rglob(SUMMARY_FILE))
        for f in files:
            try:
                run = json.loads(f.read_text())
            except ValueError as exc:
                raise ValueError(f"{f} is not a run summary (not json: {exc}); delete it or rerun that run") from None
            run["path"] = str(f.parent)
            errors = f.parent / "report" / ERRORS_CSV
            if errors.is_file():
                run["errors"] = errors_by_key(read_errors_csv(errors))
            runs.append(run)
    return runs


def is_sapd(model: dict[str, Any]) -> bool:
    return str(model.get("_target_") or "sapd.models.SAPD").endswith(".SAPD")


def peer_name(model: dict[str, Any]) -> str:
    """A detector other than SAPD by its class name, less a "Detector" suffix: FCOSDetector -> FCOS."""
    name = str(model.get("_target_")).rsplit(".", 1)[-1]
    return name.removesuffix("Detector") or name


def ablation_name(model: dict[str, Any]) -> str:
    """FSAF / +SW / +SS / +SW+SS from the switches, or the architecture's class name for other detectors."""
    if not is_sapd(model):
        return peer_name(model)
    sw, ss = bool(model.get("soft_weight", True)), bool(model.get("soft_select", True))
    return {(False, False): "FSAF", (True, False): "+SW", (False, True): "+SS", (True, True): "+SW+SS"}[(sw, ss)]


def variant_name(run: dict[str, Any]) -> str:
    """The switches that differ from the paper's setting and matter to the run's ablation ("paper": none)."""
    model = run.get("model", {})
    if not is_sapd(model):
        return PEER_VARIANT
    unused = UNUSED.get(ablation_name(model), set())
    parts = [f"{k}={model[k]}" for k, v in PAPER_SETTING.items() if k in model and k not in unused and model[k] != v]
    return ", ".join(parts) if parts else "paper"


def budget_name(run: dict[str, Any]) -> str:
    epochs, limit = run.get("max_epochs"), run.get("limit_train_batches")
    return f"{epochs} ep" + (f" x {limit} batches" if limit else "")

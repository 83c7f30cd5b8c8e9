"""The two kinds of file a report part writes: a csv of rows and a PNG figure.

A csv cell holds a float with 6 decimals (fractions, as in ``summary.json``), and nothing for NaN or
None; a figure is drawn without a GUI backend and without pyplot's global state.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def figure(width: float, height: float):
    """A matplotlib figure that needs no GUI backend and touches no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6f}" if isinstance(value, float) else value


def write_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> Path:
    """``rows`` as a csv with a header of ``columns``, one line per row."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r[k]) for k in columns})
    return path

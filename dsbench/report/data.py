"""The data a report draws from (every run's cells and series in two frames) and the small
formatting helpers every section and figure shares."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

from dsbench.metrics import METRICS
from dsbench.results import Results
from dsbench.schema import AXES

MIB = 2**20
# The headline metrics, in order: the ablation's columns, the cards' lines (dsbench/report/cards.py).
HEADLINE_METRICS = ("tokens_per_s_median", "step_time_ms_median", "peak_mem_bytes", "final_loss", "eval_loss",
                    "kv_cache_bytes_per_token", "mfu", "maxvio_global")
# A host-independent baseline (dsbench baseline) has no timings: its numeric host-dependent
# columns are empty, not missing, so the sections and figures read them the same way.
TIMED_COLUMNS = tuple(m.name for m in METRICS.values() if m.host_dependent and m.fmt not in ("text", "bool"))


@dataclass
class ReportData:
    runs: list[Results]
    keys: list[str]  # one unique name per run
    cells: pd.DataFrame  # every run's cells, with `run` and `name` (label, run-qualified when several)
    series: pd.DataFrame  # every run's series, with `run` and a `layer` column (null where absent)
    axis_order: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> pd.DataFrame:
        return self.cells[self.cells["status"] == "ok"]

    def has_column(self, column: str) -> bool:
        return column in self.cells and self.ok[column].notna().any()

    def has_series(self, metric: str) -> bool:
        return not self.series.empty and (self.series["metric"] == metric).any()

    def metric(self, metric: str) -> pd.DataFrame:
        return self.series[self.series["metric"] == metric]


def run_keys(runs: list[Results]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        key = str(r.run.get("run_id") or r.path.name)
        keys.append(key if key not in keys else f"{key}#{len(keys) + 1}")
    return keys


def prepare(runs: list[Results]) -> ReportData:
    keys = run_keys(runs)
    cells, series = [], []
    for key, r in zip(keys, runs):
        c = r.cells.copy()
        if "cell_index" in c:
            c = c.sort_values("cell_index", kind="stable")
        cells.append(c.assign(run=key))
        series.append(r.series.assign(run=key))
    cells = pd.concat(cells, ignore_index=True)
    cells["name"] = cells["label"].astype(str) if len(runs) == 1 else cells["run"] + ": " + cells["label"].astype(str)
    for col in AXES:
        if col not in cells:
            cells[col] = "n/a"
    for col in TIMED_COLUMNS:
        if col not in cells:
            cells[col] = float("nan")
    series = pd.concat(series, ignore_index=True) if series else pd.DataFrame()
    if "layer" not in series:
        series["layer"] = pd.array([pd.NA] * len(series), dtype="Int64")
    return ReportData(runs, keys, cells, series, axis_order(runs, cells))


def axis_order(runs: list[Results], cells: pd.DataFrame) -> dict[str, list[str]]:
    """Each axis's values in the order the specs list them (the first is the ablation's A)."""
    order: dict[str, list[str]] = {}
    for axis in AXES:
        values: list[str] = []
        for r in runs:
            values += [v for v in (r.run.get("spec", {}).get("axes", {}).get(axis) or []) if v not in values]
        values += [v for v in cells[axis].astype(str).unique() if v not in values]
        order[axis] = values
    return order


# --- small formatting helpers ---


def present(value) -> bool:
    if value is None or value is pd.NA:
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def speed_flag(row: pd.Series) -> str:
    """'emulated', 'noted' (a speed_note: numerics-only row) or ''."""
    if row.get("emulated") is True or row.get("emulated") == 1:
        return "emulated"
    note = row.get("speed_note")
    return "noted" if present(note) and note else ""


def display_name(row: pd.Series) -> str:
    flag = speed_flag(row)
    return str(row["name"]) + {"emulated": " (emulated)", "noted": " (numerics only)", "": ""}[flag]


def fmt_num(value, kind: str = "g") -> str:
    """A value in one of dsbench.metrics' display formats."""
    if not present(value):
        return "–"
    if kind in ("text", "bool"):
        return str(value)
    v = float(value)
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "mib":
        return f"{v / MIB:,.1f}"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "ratio":
        return f"×{v:.3f}"
    return f"{v:.4g}"


def short_shape(label: str) -> str:
    return label.split(" ", 1)[1] if " " in label else ""


def plain(value) -> str:
    """A config value as text: 8.0 → '8', missing → '–'."""
    if not present(value):
        return "–"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)[:80] or "run"

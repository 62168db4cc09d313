"""The ablation view: for each axis with two or more values, B ÷ A of the main metrics between
cells that dsbench.pairing pairs (equal in everything but that axis), A being the value the spec
lists first."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dsbench.metrics import METRICS
from dsbench.pairing import pairs
from dsbench.report.data import HEADLINE_METRICS, ReportData, present, short_shape, speed_flag
from dsbench.schema import AXES

MAIN_METRICS = HEADLINE_METRICS
# Speeds mean nothing on emulated rows and little on numerics-only ones: their ratios carry a caveat.
SPEED_METRICS = tuple(m for m in MAIN_METRICS if METRICS[m].group == "speed")
LONG = ["axis", "comparison", "context", "run", "metric", "a", "b", "ratio", "speed_caveat"]
SUMMARY = ["axis", "comparison", "metric", "geomean", "min", "max", "n", "speed_caveat"]


def side(row: pd.Series, axis: str) -> str:
    """A pair member's name along `axis`: its value, with its balance along ffn ('moe/aux')."""
    value = str(row[axis])
    return f"{value}/{row['balance']}" if axis == "ffn" and row["balance"] != "n/a" else value


def held_fixed(row: pd.Series, axis: str) -> str:
    """The other axes a pair shares: 'dense/mla/fp32' (along ffn, balance is part of the side)."""
    return "/".join(str(row[a]) for a in AXES if a != axis and str(row[a]) != "n/a" and not (axis == "ffn" and a == "balance"))


def context(row: pd.Series, axis: str) -> str:
    """What a pair holds fixed, for the table: 'dense/mla/fp32 b8×t128'."""
    return held_fixed(row, axis) + " " + short_shape(str(row["label"]))


def axis_pairs(data: ReportData) -> list[tuple[str, pd.Series, pd.Series]]:
    """(axis, A, B) for every axis with two values present, A the value the spec lists first."""
    ok, found = data.ok, []
    for axis in AXES:
        values = [v for v in data.axis_order[axis] if v != "n/a" and (ok[axis].astype(str) == v).any()]
        if len(values) >= 2:
            found += [(axis, a, b) for a, b in pairs(ok, axis, values[0])]
    return found


# A side below this share of its speed of light (dsbench/roofline.py light_columns) spends most
# of its step on what the implementation adds (dispatch, launches, copies), not on the FLOPs and
# bytes the architecture asks for: a speed ratio with such a side says more about our code than
# about the choice. A fifth: the best implementations run GEMM steps at 0.5–0.8 of the roof.
IMPLEMENTATION_BOUND = 0.2


def implementation_bound(row: pd.Series) -> bool:
    """Far from its light (sol_fraction < IMPLEMENTATION_BOUND), or launch-bound on a GPU."""
    sol, note = row.get("sol_fraction"), row.get("sol_note")
    return (present(sol) and float(sol) < IMPLEMENTATION_BOUND) or (present(note) and str(note).startswith("launch-bound"))


def speed_caveat(a: pd.Series, b: pd.Series) -> str:
    """Why a pair's speed ratio is not what the architecture buys: emulated, numerics only,
    implementation-bound; '' for a clean pair."""
    flags = (speed_flag(a), speed_flag(b))
    if "emulated" in flags:
        return "emulated"
    if "noted" in flags:
        return "numerics only"
    return "implementation-bound" if implementation_bound(a) or implementation_bound(b) else ""


def contended(a: pd.Series, b: pd.Series) -> str:
    """'contended' when either side did not get the CPU it asked for: its speed is left out."""
    return "contended" if any(present(r.get("contended")) and bool(r.get("contended")) for r in (a, b)) else ""


def ablation(data: ReportData) -> pd.DataFrame:
    """Long table: axis, comparison (B ÷ A), context, run, metric, A, B, ratio, speed_caveat
    (emulated / numerics only, on speed metrics of pairs with such a side)."""
    metrics = [m for m in MAIN_METRICS if m in data.ok]
    rows = []
    for axis, a, b in axis_pairs(data):
        caveat = speed_caveat(a, b)
        for m in metrics:
            if present(a[m]) and present(b[m]) and float(a[m]) != 0:
                rows.append({"axis": axis, "comparison": f"{side(b, axis)} ÷ {side(a, axis)}", "context": context(a, axis),
                             "run": a["run"], "metric": m, "a": float(a[m]), "b": float(b[m]), "ratio": float(b[m]) / float(a[m]),
                             "speed_caveat": caveat if m in SPEED_METRICS else ""})
    return pd.DataFrame(rows, columns=LONG)


def ablation_summary(long: pd.DataFrame) -> pd.DataFrame:
    """Per axis, comparison and metric: geometric mean of the ratios over contexts, min, max, n
    (speeds of pairs with an emulated or numerics-only side summarised apart)."""
    if long.empty:
        return pd.DataFrame(columns=SUMMARY)
    g = long[long["ratio"] > 0].groupby(["axis", "comparison", "metric", "speed_caveat"], sort=False)
    out = g["ratio"].agg(geomean=lambda r: float(np.exp(np.log(r).mean())), min="min", max="max", n="size")
    return out.reset_index()[SUMMARY]

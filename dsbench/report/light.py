"""The report's "Implementations and speed of light" section: per cell, which implementation of
each op family ran (and why), its bound, and how far its step is from the light-speed step
(dsbench/roofline.py light_columns); cells under the implementation-bound cut-off are named, as
their speed ratios are left out of the cards' verdicts (dsbench/report/ablation.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dsbench.report.ablation import IMPLEMENTATION_BOUND, implementation_bound
from dsbench.report.data import ReportData, fmt_num, present
from dsbench.report.render import Section, write_csv

LIGHT = ("sol_bound", "sol_step_ms", "step_time_ms_median", "sol_fraction", "mbu", "mfu", "s_mfu", "s_mbu", "gpu_busy_fraction", "sol_note")


def light_section(data: ReportData, tables: Path) -> Section | None:
    cells = data.ok
    if "sol_fraction" not in cells and not any(c.startswith("kernel_") for c in cells):
        return None  # results from before the speed-of-light columns
    families = sorted(c for c in cells if c.startswith("kernel_") and not c.endswith("_why"))
    keep = ["run", "label", *families, *(f"{f}_why" for f in families), *(c for c in LIGHT if c in cells)]
    write_csv(cells[keep], tables, "light")
    s = Section("Implementations and speed of light")
    s.text("Per cell: the implementation of each op family its calls ran (auto's measured pick, or a pin; "
           "tables/light.csv has why), the side that bounds it, the light-speed step (Σ over parts of "
           "max(FLOPs ÷ peak, bytes ÷ bandwidth) at this device's ceilings) against the measured median, and "
           f"their ratio. Cells under {IMPLEMENTATION_BOUND:.0%} of their light (or launch-bound) are "
           "implementation-bound: the cards leave their speed ratios out.")
    header = ["run", "cell", *(f.removeprefix("kernel_") for f in families), "bound", "light ms", "step ms", "of light", "MBU", "note"]
    rows, classes = [], []
    for _, r in cells.iterrows():
        note = r.get("sol_note") if present(r.get("sol_note")) else ("implementation-bound" if implementation_bound(r) else "")
        rows.append([str(r["run"]), str(r["label"]), *(str(r[f]) if present(r[f]) else "–" for f in families),
                     str(r.get("sol_bound")) if present(r.get("sol_bound")) else "–", fmt_num(r.get("sol_step_ms"), "g"),
                     fmt_num(r.get("step_time_ms_median"), "g"), fmt_num(r.get("sol_fraction"), "pct"),
                     fmt_num(r.get("mbu"), "pct"), str(note)])
        classes.append("noted" if implementation_bound(r) else "")
    s.table(header, rows, classes, sortable=True)
    return s

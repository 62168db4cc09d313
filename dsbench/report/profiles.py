"""Profiled cells (`dsbench run sweep --profile`): the Profiles section (trace and tables linked,
overhead, coverage, the largest parts) and the figure of where each step's time goes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib import colormaps

from dsbench.report.data import ReportData, display_name, fmt_num
from dsbench.report.figures import figure, new_figure
from dsbench.report.render import Section, write_csv


def _profiled(data: ReportData) -> list[tuple[pd.Series, dict]]:
    """(cell row, its profile summary) for every ok cell that kept a profile (run sweep --profile)."""
    if "profile_dir" not in data.ok:
        return []
    from dsbench.profile import load_profile  # imports torch: only when some cell was profiled

    roots = {key: run.path for key, run in zip(data.keys, data.runs)}
    found = []
    for _, row in data.ok[data.ok["profile_dir"].notna()].iterrows():
        folder = Path(roots[row["run"]]) / str(row["profile_dir"])
        if (folder / "profile.json").exists():
            found.append((row, load_profile(folder) | {"folder": folder}))
    return found


@figure("profile_breakdown", "Where the step time goes (profiles)", "Each profiled cell's step split by part (ms per step, "
        "forward and backward together), from `run sweep --profile`: ranges the model parts open, backward matched to "
        "forward by autograd sequence number. Times are under the profiler (its overhead is in the Profiles section).",
        columns=("profile_dir",))
def draw_profile_breakdown(data: ReportData):
    profiled = _profiled(data)
    if not profiled:
        return []
    parts = list(dict.fromkeys(p["part"] for _, summary in profiled for p in summary["parts"]))
    palette = colormaps["tab20"].colors + colormaps["tab20b"].colors  # 40 colours: every part its own
    colors = {part: palette[i % len(palette)] for i, part in enumerate(parts)}
    workloads = list(dict.fromkeys(row["workload"] for row, _ in profiled))  # one panel each: own time scale
    fig = new_figure(len(profiled) + 4, len(workloads))
    axes = fig.subplots(len(workloads), 1, squeeze=False,
                        height_ratios=[sum(r["workload"] == w for r, _ in profiled) for w in workloads])[:, 0]
    labelled = set()
    for ax, workload in zip(axes, workloads):
        cells = [(row, summary) for row, summary in profiled if row["workload"] == workload]
        for y, (row, summary) in enumerate(cells):
            left = 0.0
            for p in summary["parts"]:
                ax.barh(y, p["total_ms"], left=left, color=colors[p["part"]], label=None if p["part"] in labelled else p["part"])
                labelled.add(p["part"])
                left += p["total_ms"]
        ax.set_yticks(range(len(cells)), [display_name(r) for r, _ in cells], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(workload, fontsize=10, loc="left")
        ax.set_xlabel("ms per step (profiled)")
        ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=7, ncols=6, loc="outside lower center")
    return [("profile_breakdown", fig)]


def profiles_section(data: ReportData, out: Path, tables: Path) -> Section | None:
    """Each profiled cell: its trace and tables (linked), overhead, coverage, and its top parts."""
    profiled = _profiled(data)
    if not profiled:
        return None
    s = Section("Profiles")
    s.text("Cells profiled after their measured run (`dsbench run sweep --profile`). Open a trace in ui.perfetto.dev "
           "or chrome://tracing; parts.csv holds every part with its roofline place, memory.csv the memory breakdown.")
    rows, links, long = [], [], []
    for row, summary in profiled:
        top = sorted(summary["parts"], key=lambda p: -p["total_ms"])[:3]
        rows.append([display_name(row), f"{summary['breakdown_ms_per_step']:.3g}", fmt_num(summary["overhead"], "pct"),
                     fmt_num(summary["coverage"], "pct"), ", ".join(f"{p['part']} {p['share']:.0%}" for p in top)])
        rel = Path(os.path.relpath(summary["folder"], out))
        links.append((f"{display_name(row)}: trace", (rel / summary["trace"]).as_posix()))
        links.append((f"{display_name(row)}: parts.csv", (rel / "parts.csv").as_posix()))
        long += [{"run": row["run"], "cell_id": row["cell_id"], **p} for p in summary["parts"]]
    write_csv(pd.DataFrame(long), tables, "profile_parts")
    s.table(["cell", "ms/step (profiled)", "overhead", "named coverage", "largest parts"], rows)
    s.blocks.append(("links", links))
    return s

"""Figures: a registry of definitions. Each FigureDef names the cells columns and series metrics
it needs and is skipped when the results lack them, so a new metric needs only a new
`@figure(...)` definition. Speed figures grey and label emulated rows and hatch numerics-only
rows (speed_note). This module holds the registry and the per-cell figures; comparisons.py the
figures over pairs of cells, heatmaps.py the routing ones, profiles.py the profile breakdown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from dsbench.report.data import MIB, ReportData, display_name, speed_flag

GREY, HATCH_NOTED = "#b0b0b0", "//"
LINE_COLORS = colormaps["tab20"].colors  # 20 distinguishable line colours before any repeats


@dataclass(frozen=True)
class FigureDef:
    """A figure and what it needs; `draw` returns (file stem, Figure) pairs — none to skip."""

    name: str
    title: str
    caption: str
    draw: Callable[[ReportData], list[tuple[str, Figure]]]
    columns: tuple[str, ...] = ()  # cells columns with a value in at least one ok cell
    series: tuple[str, ...] = ()  # series metrics present

    def applies(self, data: ReportData) -> bool:
        return all(data.has_column(c) for c in self.columns) and all(data.has_series(m) for m in self.series)


FIGURES: list[FigureDef] = []


def figure(name: str, title: str, caption: str, columns: tuple = (), series: tuple = ()):
    """Decorator: register a draw function as a figure definition."""
    def register(draw):
        FIGURES.append(FigureDef(name, title, caption, draw, tuple(columns), tuple(series)))
        return draw

    return register


def bar_style(row: pd.Series) -> dict:
    flag = speed_flag(row)
    if flag == "emulated":
        return {"color": GREY, "edgecolor": "#777777"}
    if flag == "noted":
        return {"color": "#9ecae1", "hatch": HATCH_NOTED, "edgecolor": "#4a7fa8"}
    return {"color": "#3182bd"}


def barh(ax, rows: pd.DataFrame, values: pd.Series, err=None) -> None:
    y = np.arange(len(rows))
    for i, (_, row) in enumerate(rows.iterrows()):
        xerr = None if err is None else [[err[0].iloc[i]], [err[1].iloc[i]]]
        ax.barh(y[i], values.iloc[i], xerr=xerr, capsize=3, **bar_style(row))
    ax.set_yticks(y, [display_name(r) for _, r in rows.iterrows()], fontsize=8)
    for tick, (_, row) in zip(ax.get_yticklabels(), rows.iterrows()):
        if speed_flag(row) == "emulated":
            tick.set_color("#888888")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def new_figure(n_bars: int, n_panels: int = 1) -> Figure:
    return Figure(figsize=(10, 1.2 + 0.32 * n_bars + 0.6 * n_panels), layout="constrained")


@figure("throughput", "Throughput", "Median tokens/s per cell; bars span p10–p90 of the step times. "
        "Grey: emulated (its speed means nothing); hatched: numerics-only rows (speed_note).",
        columns=("tokens_per_s_median",))
def draw_throughput(data: ReportData):
    ok = data.ok[data.ok["tokens_per_s_median"].notna()]
    workloads = list(dict.fromkeys(ok["workload"]))
    fig = new_figure(len(ok), len(workloads))
    axes = fig.subplots(len(workloads), 1, squeeze=False, height_ratios=[max(1, (ok["workload"] == w).sum()) for w in workloads])[:, 0]
    for ax, w in zip(axes, workloads):
        rows = ok[ok["workload"] == w]
        med = rows["tokens_per_s_median"].astype(float)
        lo = (med - rows.get("tokens_per_s_p10", med).astype(float)).clip(lower=0).fillna(0)
        hi = (rows.get("tokens_per_s_p90", med).astype(float) - med).clip(lower=0).fillna(0)
        barh(ax, rows, med, (lo, hi))
        ax.set_title(w, fontsize=10, loc="left")
        ax.set_xlabel("tokens/s (median; error bars p10–p90)")
    return [("throughput", fig)]


@figure("peak_memory", "Peak memory", "Peak memory of each cell's process: CUDA max allocated on a GPU, peak RSS on a CPU.",
        columns=("peak_mem_bytes",))
def draw_memory(data: ReportData):
    ok = data.ok[data.ok["peak_mem_bytes"].notna()]
    fig = new_figure(len(ok))
    ax = fig.subplots()
    barh(ax, ok, ok["peak_mem_bytes"].astype(float) / MIB)
    ax.set_xlabel("peak memory (MiB)")
    return [("peak_memory", fig)]


@figure("mfu", "Model FLOP utilisation", "MFU = flops_per_token × tokens/s ÷ the peak FLOP/s of the arithmetic in use "
        "(datasheet or this machine's calibrated matmul rate: see peak_source). Grey: emulated.", columns=("mfu",))
def draw_mfu(data: ReportData):
    ok = data.ok[data.ok["mfu"].notna()]
    fig = new_figure(len(ok))
    ax = fig.subplots()
    barh(ax, ok, 100 * ok["mfu"].astype(float))
    ax.set_xlabel("MFU (% of peak FLOP/s)")
    return [("mfu", fig)]


def cell_names(data: ReportData) -> dict[tuple[str, str], str]:
    return {(r["run"], r["cell_id"]): str(r["name"]) for _, r in data.cells.iterrows()}


def line_figure(data: ReportData, metric: str, ylabel: str, layer_mean: bool = False) -> Figure:
    s = data.metric(metric)
    if layer_mean and s["layer"].isna().any():
        s = s[s["layer"].isna()]  # the cell-level series (mean over layers) where there is one
    names = cell_names(data)
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    ax.set_prop_cycle(color=LINE_COLORS)
    for (run, cell), g in s.groupby(["run", "cell_id"], sort=False):
        g = g.groupby("step")["value"].mean()
        ax.plot(g.index, g.values, label=names.get((run, cell), cell), linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


@figure("loss_curves", "Loss curves", "Training loss per step (mean cross-entropy of the batch, nats per token).", series=("loss",))
def draw_loss(data: ReportData):
    return [("loss_curves", line_figure(data, "loss", "training loss (nats/token)"))]


@figure("maxvio", "MaxVio over steps", "MaxVio_batch = (max expert load − mean load) ÷ mean load on each training batch, "
        "mean over routed layers (Wang et al. 2408.15664); 0 is perfect balance.", series=("maxvio_batch",))
def draw_maxvio(data: ReportData):
    return [("maxvio", line_figure(data, "maxvio_batch", "MaxVio_batch (dimensionless)", layer_mean=True))]


def render_figures(data: ReportData, folder: Path) -> list[dict]:
    """Draw every applicable figure into folder; returns [{file, title, caption}] in registry order."""
    drawn = []
    for fdef in FIGURES:
        if not fdef.applies(data):
            continue
        for stem, fig in fdef.draw(data):
            path = folder / f"{stem}.png"
            fig.savefig(path, dpi=90)
            drawn.append({"file": path, "title": fdef.title, "caption": fdef.caption, "name": fdef.name})
    return drawn

"""Figures: a registry of definitions. Each FigureDef names the cells columns and series metrics
it needs and is skipped when the results lack them, so a new metric needs only a new
`@figure(...)` definition. Speed figures grey and label emulated rows and hatch numerics-only
rows (speed_note). This module holds the registry and the figures of every comparison as small
multiples (throughput, memory, MFU, loss curves: one panel per axis and workload, the compared
values as colours, each pair a line); with no pair to draw they fall back to one bar or line per
cell. comparisons.py holds the figures over families of cells, heatmaps.py the routing ones,
profiles.py the profile breakdown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from dsbench.pairing import pairs
from dsbench.report.ablation import speed_caveat
from dsbench.report.cards import comparisons
from dsbench.report.data import MIB, ReportData, display_name, speed_flag
from dsbench.report.plain_text import save_figure
from dsbench.workloads import names_where

GREY, HATCH_NOTED = "#b0b0b0", "//"
LINE_COLORS = colormaps["tab20"].colors  # 20 distinguishable line colours before any repeats
VALUE_COLORS = colormaps["tab10"].colors  # one per compared value: A is the first


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


def by_axis(data: ReportData) -> dict[str, list[tuple]]:
    """{axis: [(comparison, its pairs)]} for every comparison with a pair (dsbench.report.cards' list)."""
    grouped: dict[str, list[tuple]] = {}
    for comparison, differ in comparisons(data):
        found = pairs(data.ok, comparison.column, comparison.a, comparison.b, differ=differ)
        if found:
            grouped.setdefault(comparison.axis, []).append((comparison, found))
    return grouped


def _panel(ax, found_by_b: list[tuple], metric: str, scale: float, flag: bool) -> int:
    """One axis's pairs in one panel: x = the values (A first), each pair a line from A to B,
    the median of each value a black bar; flagged speed pairs grey and dashed. Returns n pairs."""
    a_values, n = {}, 0
    for j, (comparison, found) in enumerate(found_by_b, start=1):
        b_values = []
        for a, b in found:
            if not (pd.notna(a.get(metric)) and pd.notna(b.get(metric))):
                continue
            ya, yb = float(a[metric]) / scale, float(b[metric]) / scale
            flagged = flag and bool(speed_caveat(a, b))
            ax.plot([0, j], [ya, yb], color=GREY, linewidth=0.6, linestyle="--" if flagged else "-", zorder=1)
            style = {"facecolors": "none", "edgecolors": GREY} if flagged else {"color": VALUE_COLORS[j % 10]}
            ax.scatter([j], [yb], s=14, zorder=2, **style)
            a_style = {"facecolors": "none", "edgecolors": GREY} if flag and speed_flag(a) else {"color": VALUE_COLORS[0]}
            ax.scatter([0], [ya], s=14, zorder=2, **a_style)
            a_values[(a["run"], a["cell_id"])] = ya
            b_values.append(yb)
            n += 1
        if b_values:
            ax.plot([j - 0.25, j + 0.25], [np.median(b_values)] * 2, color="black", linewidth=1.5, zorder=3)
    if a_values:
        ax.plot([-0.25, 0.25], [np.median(list(a_values.values()))] * 2, color="black", linewidth=1.5, zorder=3)
    labels = [str(found_by_b[0][0].a)] + [str(c.b) for c, _ in found_by_b]
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    return n


def paired_figure(data: ReportData, metric: str, ylabel: str, scale: float = 1.0, flag: bool = True) -> Figure | None:
    """Small multiples: a row per workload, a column per axis; None when no comparison has a pair."""
    grouped = by_axis(data)
    workloads = [w for w in dict.fromkeys(data.ok["workload"]) if data.ok.loc[data.ok["workload"] == w, metric].notna().any()]
    if not grouped or not workloads:
        return None
    fig = Figure(figsize=(max(6, 2.6 * len(grouped)), 0.6 + 2.3 * len(workloads)), layout="constrained")
    axes = fig.subplots(len(workloads), len(grouped), squeeze=False)
    for r, w in enumerate(workloads):
        for c, (axis, comps) in enumerate(grouped.items()):
            ax = axes[r, c]
            mine = [(comp, [(a, b) for a, b in found if a["workload"] == w]) for comp, found in comps]
            n = _panel(ax, mine, metric, scale, flag)
            ax.set_title(f"{w} · {axis}, n = {n}", fontsize=9, loc="left")
            if n:
                ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3, which="both")
            if c == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    return fig


PAIRED_CAPTION = ("One panel per swept axis (columns) and workload (rows); n: pairs in the panel. Each grey line joins "
                  "a pair of cells equal in everything but that axis (dsbench/pairing.py), from A (the first value, left) "
                  "to B; dots coloured by value, black bars the median over the pairs; log scale.")
FLAG_CAPTION = " Hollow grey dots and dashed lines: an emulated or numerics-only side (its speed means nothing here)."


@figure("throughput", "Throughput", "Median tokens/s (tokens_per_step ÷ the median step). " + PAIRED_CAPTION + FLAG_CAPTION
        + " Without any pair: one bar per cell, spanning p10–p90; grey emulated, hatched numerics-only.",
        columns=("tokens_per_s_median",))
def draw_throughput(data: ReportData):
    fig = paired_figure(data, "tokens_per_s_median", "tokens/s (median)")
    return [("throughput", fig if fig is not None else throughput_bars(data))]


def throughput_bars(data: ReportData) -> Figure:
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
    return fig


def cell_bars(data: ReportData, metric: str, xlabel: str, scale: float) -> Figure:
    ok = data.ok[data.ok[metric].notna()]
    fig = new_figure(len(ok))
    ax = fig.subplots()
    barh(ax, ok, ok[metric].astype(float) / scale)
    ax.set_xlabel(xlabel)
    return fig


@figure("peak_memory", "Peak memory", "Peak memory of each cell's process (MiB): CUDA max allocated on a GPU, peak RSS on "
        "a CPU. " + PAIRED_CAPTION + " Without any pair: one bar per cell.", columns=("peak_mem_bytes",))
def draw_memory(data: ReportData):
    fig = paired_figure(data, "peak_mem_bytes", "peak memory (MiB)", scale=MIB, flag=False)
    return [("peak_memory", fig if fig is not None else cell_bars(data, "peak_mem_bytes", "peak memory (MiB)", MIB))]


@figure("mfu", "Model FLOP utilisation", "MFU = flops_per_token × tokens/s ÷ the peak FLOP/s of the arithmetic in use "
        "(datasheet or this machine's calibrated matmul rate: see peak_source), in %. " + PAIRED_CAPTION + FLAG_CAPTION,
        columns=("mfu",))
def draw_mfu(data: ReportData):
    fig = paired_figure(data, "mfu", "MFU (% of peak FLOP/s)", scale=0.01)
    return [("mfu", fig if fig is not None else cell_bars(data, "mfu", "MFU (% of peak FLOP/s)", 0.01))]


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
    fig.legend(fontsize=7, loc="outside lower center", ncols=3, frameon=False)  # below the axes: never on a line
    return fig


def loss_curve(data: ReportData, row: pd.Series) -> pd.Series:
    s = data.metric("loss")
    return s[(s["run"] == row["run"]) & (s["cell_id"] == row["cell_id"])].groupby("step")["value"].mean()


def smooth(curve: pd.Series) -> pd.Series:
    """A centred running mean over 5% of the steps: one batch's loss is noisy, the trend is the point."""
    return curve.rolling(max(1, len(curve) // 20), center=True, min_periods=1).mean()


def _loss_column(data: ReportData, top, bottom, comps: list[tuple]) -> int:
    """One axis: every paired cell's loss (top, coloured by value) and B − A per pair (bottom, thin),
    with the median over pairs per step (bold). Returns n pairs."""
    drawn_a, n = set(), 0
    for j, (comparison, found) in enumerate(comps, start=1):
        gaps = []
        for a, b in found:
            ca, cb = loss_curve(data, a), loss_curve(data, b)
            if ca.empty or cb.empty:
                continue
            if (a["run"], a["cell_id"]) not in drawn_a:
                top.plot(ca.index, smooth(ca), color=VALUE_COLORS[0], linewidth=0.7, alpha=0.6)
                drawn_a.add((a["run"], a["cell_id"]))
            top.plot(cb.index, smooth(cb), color=VALUE_COLORS[j % 10], linewidth=0.7, alpha=0.6)
            gap = smooth((cb - ca).dropna())
            bottom.plot(gap.index, gap.values, color=VALUE_COLORS[j % 10], linewidth=0.5, alpha=0.35)
            gaps.append(gap)
            n += 1
        if gaps:
            median = pd.concat(gaps, axis=1).median(axis=1)
            bottom.plot(median.index, median.values, color=VALUE_COLORS[j % 10], linewidth=2,
                        label=f"{comparison.axis}: {comparison.b} − {comparison.a} (median of {len(gaps)})")
    bottom.axhline(0, color="black", linewidth=0.8)
    return n


def loss_panels(data: ReportData) -> Figure | None:
    """A column per swept axis: loss curves of its train pairs over the difference curves."""
    trained = names_where("trains")
    grouped = {axis: [(c, [(a, b) for a, b in found if a["workload"] in trained]) for c, found in comps]
               for axis, comps in by_axis(data).items()}
    grouped = {axis: comps for axis, comps in grouped.items() if any(found for _, found in comps)}
    if not grouped:
        return None
    fig = Figure(figsize=(max(6, 3.2 * len(grouped)), 6.2), layout="constrained")
    axes = fig.subplots(2, len(grouped), squeeze=False, sharex="col", height_ratios=[3, 2])
    for c, (axis, comps) in enumerate(grouped.items()):
        top, bottom = axes[0, c], axes[1, c]
        n = _loss_column(data, top, bottom, comps)
        top.set_title(f"{axis} (n = {n} pairs)", fontsize=9, loc="left")
        values = [str(comps[0][0].a)] + [str(comp.b) for comp, _ in comps]
        for j, v in enumerate(values):
            bottom.plot([], [], color=VALUE_COLORS[j % 10], linewidth=0.7, label=f"curves of {v}" + (" (A)" if j == 0 else ""))
        bottom.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)  # below: never on a curve
        bottom.set_xlabel("training step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if c == 0:
            top.set_ylabel("training loss (nats/token)")
            bottom.set_ylabel("B − A (nats/token)")
    return fig


@figure("loss_curves", "Loss curves", "Training loss per step (mean cross-entropy of the batch, nats/token), smoothed by a "
        "centred running mean over 5% of the steps. One column per swept axis (n: its train pairs): top, every paired "
        "cell's curve coloured by its value; bottom, B − A of each pair (thin) and the median over the pairs (bold): "
        "below 0, B trains to a lower loss. Without any pair: one line per cell.", series=("loss",))
def draw_loss(data: ReportData):
    fig = loss_panels(data)
    return [("loss_curves", fig if fig is not None else line_figure(data, "loss", "training loss (nats/token)"))]


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
            save_figure(fig, path, dpi=90)
            drawn.append({"file": path, "title": fdef.title, "caption": fdef.caption, "name": fdef.name})
    return drawn

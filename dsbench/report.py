"""Reports people read: results folders → reports/<run>/{index.html, index.md, figures/*.png, tables/*.csv}.

    build_report(["results/cpu-small"])                        # → reports/cpu-small
    build_report(["results/a", "results/b"], out="reports/ab", baseline="results/ci-baseline")

index.html is self-contained (figures inline as data: URIs; opens from disk); index.md is for
GitHub and CI job summaries and links figures/. Sections: environment and spec, failures, the
cells, the ablation view (for each axis, B ÷ A of every main metric with all else fixed), the
comparison with a baseline (dsbench.check), and the figures.

Figures come from a registry: each FigureDef names the cells columns and series metrics it
needs and is skipped when a run does not have them, so a new metric needs only a new entry.
Speed figures grey and label emulated rows (FP8 without FP8 tensor cores) and hatch rows with a
speed_note (bf16 on a CPU). All user-supplied text is escaped in the HTML and the Markdown.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from dsbench import __version__
from dsbench.check import check, fmt_value, load_checked, md_escape
from dsbench.contention import measurement_warnings
from dsbench.results import Results, ResultsError

AXES = ("workload", "ffn", "attention", "precision", "balance")
SHAPE = ("batch_size", "seq_len", "context_len", "new_tokens", "steps", "replicate")  # held fixed with the axes
# The ablation's main metrics, and which of them are speeds (meaningless on emulated rows).
MAIN_METRICS = ("tokens_per_s_median", "step_time_ms_median", "peak_mem_bytes", "final_loss", "eval_loss",
                "kv_cache_bytes_per_token", "mfu", "maxvio_global")
SPEED_METRICS = ("tokens_per_s_median", "step_time_ms_median", "mfu")
MIB = 2**20
MAX_HEATMAP_CELLS = 8  # expert-load / routing figures: one per routed train cell, at most this many
MAX_HEATMAP_LAYERS = 8
GREY, HATCH_NOTED = "#b0b0b0", "//"
LINE_COLORS = colormaps["tab20"].colors  # 20 distinguishable line colours before any repeats


# --- the data a report draws from ---


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


TIMED_COLUMNS = ("tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90", "step_time_ms_median", "step_time_ms_p10",
                 "step_time_ms_p90", "peak_mem_bytes", "mfu", "model_flops_per_s", "energy_j_per_token")


def prepare(runs: list[Results]) -> ReportData:
    keys = run_keys(runs)
    cells, series = [], []
    for key, r in zip(keys, runs):
        c = r.cells.copy()
        if "cell_index" in c:
            c = c.sort_values("cell_index", kind="stable")
        c["run"] = key
        cells.append(c)
        s = r.series.copy()
        s["run"] = key
        series.append(s)
    cells = pd.concat(cells, ignore_index=True)
    cells["name"] = cells["label"].astype(str) if len(runs) == 1 else cells["run"] + ": " + cells["label"].astype(str)
    for col in AXES:
        if col not in cells:
            cells[col] = "n/a"
    for col in TIMED_COLUMNS:  # a host-independent baseline (dsbench baseline) has no timings: empty, not missing
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
    if not present(value):
        return "–"
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


# --- the ablation view ---


def _norm(value) -> str:
    if not present(value):
        return "–"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _pairs(ok: pd.DataFrame, axis: str, a_value: str) -> list[tuple[pd.Series, pd.Series]]:
    """(A cell, B cell) pairs identical in everything but `axis`. Along ffn, a dense cell's
    balance n/a pairs with every balance of a routed cell; routed cells pair balance to balance."""
    ok = ok.copy()
    if "memory_budget_bytes" in ok:  # the largest batch that fits a budget: the budget is fixed, the batch is the outcome
        ok["batch_size"] = ok["batch_size"].astype(object).where(ok["memory_budget_bytes"].isna(), "max")
    fixed = [c for c in (*AXES, *SHAPE, "memory_budget_bytes", "run") if c in ok and c != axis and not (axis == "ffn" and c == "balance")]
    key = ok[fixed].apply(lambda r: "|".join(_norm(v) for v in r), axis=1) if fixed else pd.Series("", index=ok.index)
    a_rows = ok[ok[axis].astype(str) == a_value]
    pairs = []
    for i, b in ok[ok[axis].astype(str) != a_value].iterrows():
        for _, a in a_rows[key[a_rows.index] == key[i]].iterrows():
            if axis == "ffn" and "n/a" not in (a["balance"], b["balance"]) and a["balance"] != b["balance"]:
                continue
            pairs.append((a, b))
    return pairs


def _side(row: pd.Series, axis: str) -> str:
    value = str(row[axis])
    return f"{value}/{row['balance']}" if axis == "ffn" and row["balance"] != "n/a" else value


def _context(row: pd.Series, axis: str) -> str:
    parts = [str(row[a]) for a in AXES if a != axis and str(row[a]) != "n/a" and not (axis == "ffn" and a == "balance")]
    return "/".join(parts) + " " + short_shape(str(row["label"]))


def ablation(data: ReportData) -> pd.DataFrame:
    """Long table: axis, comparison (B ÷ A), context, run, metric, A, B, ratio, speed_caveat
    (emulated / numerics only, on speed metrics of pairs with such a side)."""
    ok, rows = data.ok, []
    metrics = [m for m in MAIN_METRICS if m in ok]
    for axis in AXES:
        values = [v for v in data.axis_order[axis] if v != "n/a" and (ok[axis].astype(str) == v).any()]
        if len(values) < 2:
            continue
        for a, b in _pairs(ok, axis, values[0]):
            flags = (speed_flag(a), speed_flag(b))
            caveat = "emulated" if "emulated" in flags else ("numerics only" if "noted" in flags else "")
            for m in metrics:
                if present(a[m]) and present(b[m]) and float(a[m]) != 0:
                    rows.append({"axis": axis, "comparison": f"{_side(b, axis)} ÷ {_side(a, axis)}", "context": _context(a, axis),
                                 "run": a["run"], "metric": m, "a": float(a[m]), "b": float(b[m]), "ratio": float(b[m]) / float(a[m]),
                                 "speed_caveat": caveat if m in SPEED_METRICS else ""})
    return pd.DataFrame(rows, columns=["axis", "comparison", "context", "run", "metric", "a", "b", "ratio", "speed_caveat"])


def ablation_summary(long: pd.DataFrame) -> pd.DataFrame:
    """Per axis, comparison and metric: geometric mean of the ratios over contexts, min, max, n
    (speeds of pairs with an emulated or numerics-only side summarised apart)."""
    if long.empty:
        return pd.DataFrame(columns=["axis", "comparison", "metric", "geomean", "min", "max", "n", "speed_caveat"])
    g = long[long["ratio"] > 0].groupby(["axis", "comparison", "metric", "speed_caveat"], sort=False)
    out = g["ratio"].agg(geomean=lambda r: float(np.exp(np.log(r).mean())), min="min", max="max", n="size")
    return out.reset_index()[["axis", "comparison", "metric", "geomean", "min", "max", "n", "speed_caveat"]]


# --- figures: a registry of definitions ---


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


def _bar_style(row: pd.Series) -> dict:
    flag = speed_flag(row)
    if flag == "emulated":
        return {"color": GREY, "edgecolor": "#777777"}
    if flag == "noted":
        return {"color": "#9ecae1", "hatch": HATCH_NOTED, "edgecolor": "#4a7fa8"}
    return {"color": "#3182bd"}


def _barh(ax, rows: pd.DataFrame, values: pd.Series, err=None) -> None:
    y = np.arange(len(rows))
    for i, (_, row) in enumerate(rows.iterrows()):
        xerr = None if err is None else [[err[0].iloc[i]], [err[1].iloc[i]]]
        ax.barh(y[i], values.iloc[i], xerr=xerr, capsize=3, **_bar_style(row))
    ax.set_yticks(y, [display_name(r) for _, r in rows.iterrows()], fontsize=8)
    for tick, (_, row) in zip(ax.get_yticklabels(), rows.iterrows()):
        if speed_flag(row) == "emulated":
            tick.set_color("#888888")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def _new_figure(n_bars: int, n_panels: int = 1) -> Figure:
    return Figure(figsize=(10, 1.2 + 0.32 * n_bars + 0.6 * n_panels), layout="constrained")


@figure("throughput", "Throughput", "Median tokens/s per cell; bars span p10–p90 of the step times. "
        "Grey: emulated (its speed means nothing); hatched: numerics-only rows (speed_note).",
        columns=("tokens_per_s_median",))
def draw_throughput(data: ReportData):
    ok = data.ok[data.ok["tokens_per_s_median"].notna()]
    workloads = list(dict.fromkeys(ok["workload"]))
    fig = _new_figure(len(ok), len(workloads))
    axes = fig.subplots(len(workloads), 1, squeeze=False, height_ratios=[max(1, (ok["workload"] == w).sum()) for w in workloads])[:, 0]
    for ax, w in zip(axes, workloads):
        rows = ok[ok["workload"] == w]
        med = rows["tokens_per_s_median"].astype(float)
        lo = (med - rows.get("tokens_per_s_p10", med).astype(float)).clip(lower=0).fillna(0)
        hi = (rows.get("tokens_per_s_p90", med).astype(float) - med).clip(lower=0).fillna(0)
        _barh(ax, rows, med, (lo, hi))
        ax.set_title(w, fontsize=10, loc="left")
        ax.set_xlabel("tokens/s (median; error bars p10–p90)")
    return [("throughput", fig)]


@figure("peak_memory", "Peak memory", "Peak memory of each cell's process: CUDA max allocated on a GPU, peak RSS on a CPU.",
        columns=("peak_mem_bytes",))
def draw_memory(data: ReportData):
    ok = data.ok[data.ok["peak_mem_bytes"].notna()]
    fig = _new_figure(len(ok))
    ax = fig.subplots()
    _barh(ax, ok, ok["peak_mem_bytes"].astype(float) / MIB)
    ax.set_xlabel("peak memory (MiB)")
    return [("peak_memory", fig)]


@figure("mfu", "Model FLOP utilisation", "MFU = flops_per_token × tokens/s ÷ the peak FLOP/s of the arithmetic in use "
        "(datasheet or this machine's calibrated matmul rate: see peak_source). Grey: emulated.", columns=("mfu",))
def draw_mfu(data: ReportData):
    ok = data.ok[data.ok["mfu"].notna()]
    fig = _new_figure(len(ok))
    ax = fig.subplots()
    _barh(ax, ok, 100 * ok["mfu"].astype(float))
    ax.set_xlabel("MFU (% of peak FLOP/s)")
    return [("mfu", fig)]


def _names(data: ReportData) -> dict[tuple[str, str], str]:
    return {(r["run"], r["cell_id"]): str(r["name"]) for _, r in data.cells.iterrows()}


def _lines(data: ReportData, metric: str, ylabel: str, layer_mean: bool = False) -> Figure:
    s = data.metric(metric)
    if layer_mean and s["layer"].isna().any():
        s = s[s["layer"].isna()]  # the cell-level series (mean over layers) where there is one
    names = _names(data)
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
    return [("loss_curves", _lines(data, "loss", "training loss (nats/token)"))]


@figure("maxvio", "MaxVio over steps", "MaxVio_batch = (max expert load − mean load) ÷ mean load on each training batch, "
        "mean over routed layers (Wang et al. 2408.15664); 0 is perfect balance.", series=("maxvio_batch",))
def draw_maxvio(data: ReportData):
    return [("maxvio", _lines(data, "maxvio_batch", "MaxVio_batch (dimensionless)", layer_mean=True))]


def _layers(s: pd.DataFrame) -> list:
    layers = sorted(s["layer"].dropna().unique().tolist())
    return layers[:MAX_HEATMAP_LAYERS] if layers else [None]


def _of_layer(s: pd.DataFrame, layer) -> pd.DataFrame:
    return s[s["layer"].isna()] if layer is None else s[s["layer"] == layer]


def _heatmaps(data: ReportData, metric: str, build, xlabel: str, ylabel: str, bar: str) -> list[tuple[str, Figure]]:
    """One figure per cell (at most MAX_HEATMAP_CELLS), one panel per layer."""
    out, names = [], _names(data)
    for (run, cell), s in list(data.metric(metric).groupby(["run", "cell_id"], sort=False))[:MAX_HEATMAP_CELLS]:
        layers = _layers(s)
        fig = Figure(figsize=(4 * min(len(layers), 4), 3.2 * math.ceil(len(layers) / 4) + 0.5), layout="constrained")
        axes = np.atleast_1d(fig.subplots(math.ceil(len(layers) / 4), min(len(layers), 4), squeeze=False)).flatten()
        for ax, layer in zip(axes, layers):
            matrix, yticks = build(_of_layer(s, layer))
            im = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_title("all layers" if layer is None else f"layer {layer}", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if yticks is not None:
                ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
            fig.colorbar(im, ax=ax, label=bar, shrink=0.8)
        for ax in axes[len(layers):]:
            ax.set_visible(False)
        fig.suptitle(names.get((run, cell), cell), fontsize=10)
        out.append((f"{metric}_{_safe(run)}_{cell}", fig))
    return out


def _load_matrix(s: pd.DataFrame):
    """(steps × experts) load ÷ that step's mean load: 1 everywhere is perfect balance."""
    m = s.pivot_table(index="step", columns="index", values="value", aggfunc="sum").sort_index()
    m = m.div(m.mean(axis=1).replace(0, np.nan), axis=0)
    return m.to_numpy(dtype=float), None


def _domain_matrix(s: pd.DataFrame):
    """(domains × experts) share of each domain's routed tokens, at the last recorded step."""
    s = s[s["step"] == s["step"].max()]
    m = s.pivot_table(index="domain", columns="index", values="value", aggfunc="mean")
    return m.to_numpy(dtype=float), [str(d) for d in m.index]


@figure("expert_load", "Expert load per layer", "Tokens each expert received per training step, ÷ the step's mean "
        "(1 = balanced), one panel per routed layer (first 8 layers, first 8 routed cells).", series=("expert_load",))
def draw_expert_load(data: ReportData):
    return _heatmaps(data, "expert_load", _load_matrix, "expert id", "training step", "load ÷ mean load")


@figure("routing_by_domain", "Routing by data domain", "Share of each data domain's routed tokens that each expert "
        "received (rows sum to 1): specialised experts show as bright cells.", series=("routing_by_domain",))
def draw_routing(data: ReportData):
    return _heatmaps(data, "routing_by_domain", _domain_matrix, "expert id", "data domain", "share of the domain's tokens")


def _profiled(data: ReportData) -> list[tuple[pd.Series, dict]]:
    """(cell row, its profile summary) for every ok cell that kept a profile (run sweep --profile)."""
    from dsbench.profile import load_profile

    if "profile_dir" not in data.ok:
        return []
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
    fig = _new_figure(len(profiled) + 4, len(workloads))
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


def _variant(row: pd.Series) -> str:
    parts = [str(row[a]) for a in ("ffn", "attention", "precision", "balance") if str(row[a]) != "n/a"]
    budget = row.get("memory_budget_bytes")
    batch = f" max batch in {float(budget) / MIB:.4g} MiB" if present(budget) else f" b{_norm(row.get('batch_size'))}"
    return "/".join(parts) + batch


@figure("kv_context", "KV cache and decode speed vs context length", "Left: KV-cache bytes one sequence holds at that "
        "context (kv_cache_bytes_per_token × context length). Right: decode tokens/s (batch ÷ step time). "
        "Grey dashed: emulated.", columns=("context_len", "kv_cache_bytes_per_token"))
def draw_kv_context(data: ReportData):
    ok = data.ok[(data.ok["workload"] == "decode") & data.ok["context_len"].notna()]
    if ok.empty:
        return []
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        ax.set_prop_cycle(color=LINE_COLORS)
    for (run, variant), g in ok.groupby([ok["run"], ok.apply(_variant, axis=1)], sort=False):
        g = g.sort_values("context_len")
        label = variant if len(data.keys) == 1 else f"{run}: {variant}"
        left.plot(g["context_len"], g["kv_cache_bytes_per_token"].astype(float) * g["context_len"] / MIB, marker="o", label=label)
        emulated = any(speed_flag(r) == "emulated" for _, r in g.iterrows())
        style = {"color": GREY, "linestyle": "--"} if emulated else {}
        right.plot(g["context_len"], g["tokens_per_s_median"], marker="o", label=label + (" (emulated)" if emulated else ""), **style)
    left.set(xlabel="context length (tokens)", ylabel="KV cache per sequence (MiB)")
    right.set(xlabel="context length (tokens)", ylabel="decode tokens/s")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return [("kv_context", fig)]


def _fp8_pairs(data: ReportData) -> list[tuple[pd.Series, pd.Series]]:
    ok = data.ok[data.ok["workload"] == "train"]
    return [(a, b) for a, b in _pairs(ok, "precision", "bf16") if str(b["precision"]).startswith("fp8")] if "precision" in ok else []


@figure("fp8_loss_gap", "FP8 − BF16 loss gap", "Training loss of each FP8 cell minus that of the BF16 cell identical in "
        "everything else, per step (nats/token); DeepSeek-V3 §3.3 reports a relative gap below 0.25%.", series=("loss",))
def draw_fp8_gap(data: ReportData):
    pairs = _fp8_pairs(data)
    if not pairs:
        return []
    loss = data.metric("loss")
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.set_prop_cycle(color=LINE_COLORS)
    for a, b in pairs:
        la = loss[(loss["run"] == a["run"]) & (loss["cell_id"] == a["cell_id"])].groupby("step")["value"].mean()
        lb = loss[(loss["run"] == b["run"]) & (loss["cell_id"] == b["cell_id"])].groupby("step")["value"].mean()
        gap = (lb - la).dropna()
        ax.plot(gap.index, gap.values, label=f"{b['precision']} − bf16: {_context(a, 'precision')}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="training step", ylabel="loss gap fp8 − bf16 (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [("fp8_loss_gap", fig)]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)[:80] or "run"


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


# --- tables ---


def environment_table(data: ReportData) -> pd.DataFrame:
    fields = [("status", lambda r: r.run.get("status")), ("created", lambda r: r.run.get("created_at")),
              ("spec", lambda r: r.run.get("spec_source")),
              ("git", lambda r: f"{(r.run.get('git') or {}).get('sha') or '?'}"[:12] + (" (dirty)" if (r.run.get("git") or {}).get("dirty") else "")),
              ("dsbench", lambda r: r.run.get("dsbench_version"))]
    env_keys = ("platform", "python_version", "torch_version", "torch_cuda_version", "triton_version", "driver_version",
                "gpu_name", "gpu_count", "gpu_total_memory_bytes", "cpu_model", "cpu_count_logical", "torch_num_threads", "ram_total_bytes")
    rows = []
    for key, r in zip(data.keys, data.runs):
        env = r.run.get("environment") or {}
        row = {"run": key, "name": r.run.get("name"), **{k: f(r) for k, f in fields}}
        row.update({k: env.get(k) for k in env_keys})
        rows.append(row)
    return pd.DataFrame(rows)


def spec_table(data: ReportData) -> pd.DataFrame:
    rows = []
    for key, r in zip(data.keys, data.runs):
        spec = r.run.get("spec") or {}
        row = {"run": key, "description": spec.get("description"), "device": spec.get("device"), "size": spec.get("size"),
               "model overrides": _kv(spec.get("model")), "axes": "; ".join(f"{a}: {', '.join(map(str, v))}" for a, v in (spec.get("axes") or {}).items())}
        axes_workloads = (spec.get("axes") or {}).get("workload") or []
        for section in ("train", "prefill", "decode"):
            if section in axes_workloads:
                row[section] = _kv(spec.get(section))
        row["measure"] = _kv(spec.get("measure"))
        rows.append(row)
    return pd.DataFrame(rows)


def _kv(d) -> str:
    return ", ".join(f"{k}={v}" for k, v in (d or {}).items()) or "–"


def failures_table(data: ReportData) -> pd.DataFrame:
    bad = data.cells[data.cells["status"] != "ok"]
    return pd.DataFrame({"run": bad["run"], "cell": bad["label"], "cell_id": bad["cell_id"], "status": bad["status"],
                         "error": bad["error"] if "error" in bad else None})


CELL_COLUMNS = (("tokens/s", "tokens_per_s_median", "int"), ("tokens/s p10", "tokens_per_s_p10", "int"),
                ("tokens/s p90", "tokens_per_s_p90", "int"), ("step ms", "step_time_ms_median", "g"),
                ("peak MiB", "peak_mem_bytes", "mib"), ("MFU", "mfu", "pct"), ("final loss", "final_loss", "g"),
                ("eval loss", "eval_loss", "g"), ("MaxVio", "maxvio_global", "g"), ("KV B/token", "kv_cache_bytes_per_token", "int"),
                ("params active", "params_active", "int"))


def cells_table(data: ReportData) -> tuple[list[str], list[list[str]], list[str]]:
    """Formatted rows of the cells table and a CSS class per row (emulated / noted / failed)."""
    cols = [c for c in CELL_COLUMNS if c[1] in data.cells]
    header = ["cell", "status", *[c[0] for c in cols]]
    rows, classes = [], []
    for _, r in data.cells.iterrows():
        values = [fmt_num(r.get(col), kind) if r["status"] == "ok" else "–" for _, col, kind in cols]
        rows.append([display_name(r), r["status"], *values])
        classes.append("failed" if r["status"] != "ok" else speed_flag(r))
    return header, rows, classes


# --- rendering ---


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.emulated td { color: #999; background: #f4f4f4; }
tr.noted td { background: #f4f8fc; }
tr.failed td { background: #fdecea; }
tr.fail td { background: #fdecea; font-weight: bold; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.muted { color: #777; font-size: 13px; }
"""


def html_table(header: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    esc = html.escape
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{esc(classes[i])}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc('' if v is None else str(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_escape(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def frame_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    return list(frame.columns), [[fmt_value(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else ("–" if not present(v) else str(v))
                                  for v in row] for row in frame.itertuples(index=False)]


@dataclass
class Section:
    """One report section, written once and rendered to both HTML and Markdown."""

    title: str
    blocks: list = field(default_factory=list)  # ("text", str) | ("table", header, rows, classes) | ("details", summary, [blocks]) | ("figure", dict)

    def text(self, s: str) -> "Section":
        self.blocks.append(("text", s))
        return self

    def table(self, header, rows, classes=None) -> "Section":
        self.blocks.append(("table", header, rows, classes))
        return self


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="muted">dsbench {html.escape(__version__)} · generated {html.escape(_now())}</p>']
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [_html_block(b) for b in s.blocks]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_block(block) -> str:
    kind = block[0]
    if kind == "text":
        return f"<p>{html.escape(block[1])}</p>"
    if kind == "table":
        return html_table(block[1], block[2], block[3])
    if kind == "details":
        return f"<details><summary>{html.escape(block[1])}</summary>\n" + "\n".join(_html_block(b) for b in block[2]) + "\n</details>"
    if kind == "links":
        return "<ul>" + "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for text, href in block[1]) + "</ul>"
    fig = block[1]
    data = base64.b64encode(fig["file"].read_bytes()).decode("ascii")
    return (f'<figure><h3>{html.escape(fig["title"])}</h3><img alt="{html.escape(fig["title"])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(fig['caption'])}</figcaption></figure>")


def render_md(title: str, sections: list[Section], root: Path) -> str:
    out = [f"# {md_escape(title)}", "", f"dsbench {__version__} · generated {_now()}", ""]
    for s in sections:
        out += [f"## {md_escape(s.title)}", ""]
        out += [_md_block(b, root) for b in s.blocks]
    return "\n".join(out) + "\n"


def _md_block(block, root: Path) -> str:
    kind = block[0]
    if kind == "text":
        return md_escape(block[1]) + "\n"
    if kind == "table":
        return md_table(block[1], block[2]) + "\n"
    if kind == "details":
        return f"<details><summary>{md_escape(block[1])}</summary>\n\n" + "\n".join(_md_block(b, root) for b in block[2]) + "\n</details>\n"
    if kind == "links":
        return "\n".join(f"- [{md_escape(text)}]({href.replace(' ', '%20')})" for text, href in block[1]) + "\n"
    fig = block[1]
    rel = fig["file"].relative_to(root).as_posix()
    return f"### {md_escape(fig['title'])}\n\n![{md_escape(fig['title'])}]({rel})\n\n{md_escape(fig['caption'])}\n"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- the report ---


def build_report(results: list, out: str | Path | None = None, baseline: str | Path | None = None) -> Path:
    """Render one or more results folders (paths or Results) into `out` (default reports/<run>); returns out."""
    if not results:
        raise ResultsError("report: pass at least one results folder")
    runs = [r if isinstance(r, Results) else load_checked(r, "report") for r in results]
    data = prepare(runs)
    out = Path(out) if out else Path("reports") / _safe("+".join(data.keys))
    figures_dir, tables_dir = out / "figures", out / "tables"
    for d in (figures_dir, tables_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in [*d.glob("*.png"), *d.glob("*.csv")]:  # a re-render leaves no stale figure behind
            old.unlink()
    sections = [overview_section(data, tables_dir), failures_section(data, tables_dir), cells_section(data, tables_dir),
                ablation_section(data, tables_dir)]
    if baseline is not None:
        sections.append(baseline_section(data, Path(baseline), tables_dir))
    claims = claims_section(runs, tables_dir)  # only when the runs hold evidence for an empirical claim
    if claims is not None:
        sections.append(claims)
    profiles = profiles_section(data, out, tables_dir)  # only when cells were profiled
    if profiles is not None:
        sections.append(profiles)
    sections.append(figures_section(data, figures_dir))
    title = f"dsbench report: {', '.join(data.keys)}"
    (out / "index.html").write_text(render_html(title, sections), encoding="utf-8")
    (out / "index.md").write_text(render_md(title, sections, out), encoding="utf-8")
    return out


def _csv(frame: pd.DataFrame, folder: Path, name: str) -> None:
    frame.to_csv(folder / f"{name}.csv", index=False)


def overview_section(data: ReportData, tables: Path) -> Section:
    env, spec = environment_table(data), spec_table(data)
    _csv(env, tables, "environment")
    _csv(spec, tables, "spec")
    s = Section("Environment and spec")
    n = data.cells["status"].value_counts().to_dict()
    s.text(f"{len(data.runs)} run(s), {len(data.cells)} cells: " + ", ".join(f"{v} {k}" for k, v in n.items()) + ".")
    warnings = [f"{key}: {line}" if len(data.runs) > 1 else line for key, run in zip(data.keys, data.runs)
                for line in measurement_warnings(run.cells)]
    if warnings:
        s.text(f"{len(warnings)} measurement(s) contended or noisy — compare their timings with care (what each cell "
               "competed with: the cpu_share, cpu_others_cores, cpu_steal_fraction columns; dsbench/contention.py states the limits):")
        s.table(["cell", "why"], [w.split(": ", 1) if ": " in w else [w, ""] for w in warnings], ["failed"] * len(warnings))
    s.table(*_transpose(env))
    s.table(*_transpose(spec))
    return s


def _transpose(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """A few runs' fields read better as rows: field | run 1 | run 2 …"""
    header = ["field", *[str(v) for v in frame["run"]]]
    rows = [[col, *[("–" if not present(v) else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)))
                    for v in frame[col]]] for col in frame.columns if col != "run"]
    return header, rows


def failures_section(data: ReportData, tables: Path) -> Section:
    failures = failures_table(data)
    _csv(failures, tables, "failures")
    s = Section("Failures")
    if failures.empty:
        return s.text("Every cell finished ok.")
    s.text(f"{len(failures)} cell(s) did not finish ok: oom (out of memory), error (an exception; its last line), "
           "timeout (killed after measure.timeout_s), diverged (NaN/inf loss or logits). Full logs: <results>/logs/<cell_id>.log.")
    header, rows = frame_rows(failures if len(data.runs) > 1 else failures.drop(columns="run"))
    return s.table(header, rows, ["failed"] * len(rows))


def cells_section(data: ReportData, tables: Path) -> Section:
    keep = [c for c in ("run", "cell_id", "label", "status", "workload", "ffn", "attention", "precision", "balance",
                        *(c[1] for c in CELL_COLUMNS), "step_time_ms_p10", "step_time_ms_p90", "emulated", "speed_note") if c in data.cells]
    _csv(data.cells[keep], tables, "cells")
    header, rows, classes = cells_table(data)
    s = Section("Cells")
    s.text("Medians over the timed steps (warm-up excluded). Grey rows: emulated (speed means nothing); "
           "blue rows: numerics only on this device.")
    s.table(header, rows, classes)
    notes = [str(n) for n in data.cells.get("speed_note", pd.Series(dtype=object)).dropna().unique() if n]
    for note in notes:
        s.text(f"Note: {note}")
    return s


def ablation_section(data: ReportData, tables: Path) -> Section:
    long = ablation(data)
    summary = ablation_summary(long)
    _csv(long, tables, "ablation")
    _csv(summary, tables, "ablation_summary")
    s = Section("Ablation: B ÷ A with everything else fixed")
    if long.empty:
        return s.text("No axis has two values with cells identical in everything else; nothing to compare.")
    s.text("For each axis, A is the first value the spec lists; each ratio divides a metric of cell B by the same metric "
           "of cell A, the two identical in every other axis and shape. tokens/s and MFU: above 1 is faster; "
           "step time, memory, loss, KV bytes, MaxVio: below 1 is less. Geometric mean over the contexts, with min–max.")
    rows, classes = [], []
    for _, r in summary.iterrows():
        spread = f"{r['min']:.3f}–{r['max']:.3f}" if r["n"] > 1 else ""
        note = {"emulated": "emulated: speed means nothing", "numerics only": "numerics only: speed not representative"}.get(r["speed_caveat"], "")
        rows.append([r["axis"], r["comparison"], r["metric"], f"×{r['geomean']:.3f}", spread, str(r["n"]), note])
        classes.append({"emulated": "emulated", "numerics only": "noted"}.get(r["speed_caveat"], ""))
    s.table(["axis", "B ÷ A", "metric", "ratio", "min–max", "contexts", "note"], rows, classes)
    detail = long.pivot_table(index=["axis", "comparison", "context", "run"], columns="metric", values="ratio", sort=False).reset_index()
    if len(data.runs) == 1:
        detail = detail.drop(columns="run")
    header = list(detail.columns)
    detail_rows = [[str(v) if isinstance(v, str) else fmt_num(v, "ratio") for v in row] for row in detail.itertuples(index=False)]
    s.blocks.append(("details", f"Every pair ({len(detail)} rows)", [("table", header, detail_rows, None)]))
    return s


def baseline_section(data: ReportData, baseline: Path, tables: Path) -> Section:
    s = Section(f"Against the baseline {baseline}")
    for key, run in zip(data.keys, data.runs):
        result = check(baseline, run.path)
        frame = result.frame()
        _csv(frame, tables, f"check_{_safe(key)}")
        verdict = "FAIL" if result.exit_code else "PASS"
        s.text(f"{key}: {verdict} — {len(result.failures)} failing of {len(result.rows)} checks (policy {result.policy.source})."
               + (f" Timing reference {result.reference}: this run's time is ×{result.machine_factor:.3f} the baseline's." if result.reference else ""))
        shown = [r for r in result.rows if r.verdict != "ok"] or result.rows[:0]
        header = ["cell", "metric", "rule", "verdict", "baseline", "current", "change", "limit", "note"]
        rows = [[r.cell, r.metric, r.rule, r.verdict, fmt_value(r.baseline), fmt_value(r.current),
                 fmt_num(r.change, "ratio"), r.limit, r.note] for r in shown]
        if rows:
            s.table(header, rows, ["fail" if r.fails else "" for r in shown])
        all_rows = [[r.cell, r.metric, r.rule, r.verdict, fmt_value(r.baseline), fmt_value(r.current), fmt_num(r.change, "ratio"), r.limit, r.note]
                    for r in result.rows]
        s.blocks.append(("details", f"All {len(all_rows)} checks", [("table", header, all_rows, None)]))
    return s


def claims_section(runs: list[Results], tables: Path) -> Section | None:
    from dsbench.claims import report_section  # claims builds its Section from this module

    return report_section(runs, tables)


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
    _csv(pd.DataFrame(long), tables, "profile_parts")
    s.table(["cell", "ms/step (profiled)", "overhead", "named coverage", "largest parts"], rows)
    s.blocks.append(("links", links))
    return s


def figures_section(data: ReportData, folder: Path) -> Section:
    s = Section("Figures")
    drawn = render_figures(data, folder)
    if not drawn:
        return s.text("No figure applies to these results.")
    skipped = [f.title for f in FIGURES if f.name not in {d["name"] for d in drawn}]
    if skipped:
        s.text("Not drawn (these results lack their data): " + ", ".join(skipped) + ".")
    s.blocks += [("figure", d) for d in drawn]
    return s

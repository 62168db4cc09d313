"""Figures over pairs and families of cells: KV cache and decode speed against context length, the
FP8 − BF16 loss gap per step (dsbench.compare), and B ÷ A against model size (dsbench.pairing)."""

from __future__ import annotations

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from dsbench.compare import loss_gaps
from dsbench.report.ablation import axis_pairs, held_fixed, side, speed_caveat
from dsbench.report.data import MIB, ReportData, plain, present, speed_flag
from dsbench.report.figures import GREY, LINE_COLORS, figure
from dsbench.workloads import names_where

DISTINCT = colormaps["tab10"].colors


def _variant(row: pd.Series) -> str:
    parts = [str(row[a]) for a in ("ffn", "attention", "precision", "balance") if str(row[a]) != "n/a"]
    budget = row.get("memory_budget_bytes")
    batch = f" max batch in {float(budget) / MIB:.4g} MiB" if present(budget) else f" b{plain(row.get('batch_size'))}"
    return "/".join(parts) + batch


def _two_panels(width: float = 11) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, 4.5), layout="constrained")
    axes = list(fig.subplots(1, 2))
    for ax in axes:
        ax.set_prop_cycle(color=LINE_COLORS)
    return fig, axes


def _finish(fig: Figure, axes: list) -> None:
    """Grids, and one legend for both panels (the left one's lines; the colours match) below them,
    the figure grown to hold it: a legend never covers data."""
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.set_figheight(fig.get_figheight() + 0.16 * -(-len(handles) // 2))
        fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=2, frameon=False)


@figure("kv_context", "KV cache and decode speed vs context length", "Left: KV-cache bytes one sequence holds at that "
        "context (kv_cache_bytes_per_token × context length). Right: decode tokens/s (batch ÷ step time). "
        "Grey dashed: emulated.", columns=("context_len", "kv_cache_bytes_per_token"))
def draw_kv_context(data: ReportData):
    ok = data.ok[data.ok["workload"].isin(names_where("context_curve")) & data.ok["context_len"].notna()]
    if ok.empty:
        return []
    fig, (left, right) = _two_panels()
    for (run, variant), g in ok.groupby([ok["run"], ok.apply(_variant, axis=1)], sort=False):
        g = g.sort_values("context_len")
        label = variant if len(data.keys) == 1 else f"{run}: {variant}"
        left.plot(g["context_len"], g["kv_cache_bytes_per_token"].astype(float) * g["context_len"] / MIB, marker="o", label=label)
        emulated = any(speed_flag(r) == "emulated" for _, r in g.iterrows())
        style = {"color": GREY, "linestyle": "--"} if emulated else {}
        right.plot(g["context_len"], g["tokens_per_s_median"], marker="o", label=label + (" (emulated)" if emulated else ""), **style)
    left.set(xlabel="context length (tokens)", ylabel="KV cache per sequence (MiB)")
    right.set(xlabel="context length (tokens)", ylabel="decode tokens/s")
    _finish(fig, [left, right])
    return [("kv_context", fig)]


def fp8_gaps(data: ReportData) -> pd.DataFrame:
    """Per step, every FP8 recipe's training loss minus its BF16 pair's (dsbench.compare)."""
    recipes = sorted({str(p) for p in data.ok["precision"] if str(p).startswith("fp8")})
    gaps = [loss_gaps(data.cells, data.series, "bf16", r).per_step.assign(recipe=r) for r in recipes]
    gaps = [g for g in gaps if not g.empty]
    return pd.concat(gaps, ignore_index=True) if gaps else pd.DataFrame()


@figure("fp8_loss_gap", "FP8 − BF16 loss gap", "Training loss of each FP8 cell minus that of the BF16 cell identical in "
        "everything else, per step (nats/token); DeepSeek-V3 §3.3 reports a relative gap below 0.25%.", series=("loss",))
def draw_fp8_gap(data: ReportData):
    gaps = fp8_gaps(data)
    if gaps.empty:
        return []
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.set_prop_cycle(color=LINE_COLORS)
    for (run, recipe, _), g in gaps.groupby(["run", "recipe", "cell_id_a"], sort=False):
        label = f"{recipe} − bf16: {g['label'].iloc[0]}"
        ax.plot(g["step"], g["gap"], label=label if len(data.keys) == 1 else f"{run}: {label}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="training step", ylabel="loss gap fp8 − bf16 (nats/token)")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center", ncols=2, frameon=False)  # below the axes: never on a line
    return [("fp8_loss_gap", fig)]


def _shape(row: pd.Series) -> str:
    """The workload shape from its columns (a label may come to name the model size too)."""
    if present(row.get("context_len")):
        return f"b{plain(row.get('batch_size'))}×ctx{plain(row['context_len'])}+{plain(row.get('new_tokens'))}"
    return f"b{plain(row.get('batch_size'))}×t{plain(row.get('seq_len'))}"


def _ratio(a: pd.Series, b: pd.Series, metric: str) -> float:
    if metric not in a or not (present(a[metric]) and present(b[metric])) or float(a[metric]) == 0:
        return float("nan")
    return float(b[metric]) / float(a[metric])


def scaling_points(data: ReportData) -> pd.DataFrame:
    """One row per pair: its comparison line (axis, B ÷ A, what is held fixed but the size), the
    size (the A cell's activated parameters), and B ÷ A of tokens/s and final loss; only lines
    measured at two or more sizes."""
    rows = []
    for axis, a, b in axis_pairs(data):
        if not present(a.get("params_active")):
            continue
        rows.append({"run": a["run"], "line": f"{side(b, axis)} ÷ {side(a, axis)}: {held_fixed(a, axis)} {_shape(a)}",
                     "size": float(a["params_active"]), "throughput_ratio": _ratio(a, b, "tokens_per_s_median"),
                     "loss_ratio": _ratio(a, b, "final_loss"), "caveat": speed_caveat(a, b)})
    points = pd.DataFrame(rows, columns=["run", "line", "size", "throughput_ratio", "loss_ratio", "caveat"])
    sizes = points.groupby(["run", "line"])["size"].transform("nunique")
    return points[sizes >= 2].sort_values(["run", "line", "size"], kind="stable")


@figure("scaling", "B ÷ A against model size", "For each comparison the pairing rule finds at two or more model sizes: "
        "B ÷ A of tokens/s (left: above 1, B is faster) and of the final training loss (right: below 1, B reaches a lower "
        "loss), against the activated parameters of the A cell (log scale). Grey dashed: a side is emulated or numerics "
        "only (its speed does not mean what it says).", columns=("params_active", "tokens_per_s_median"))
def draw_scaling(data: ReportData):
    points = scaling_points(data)
    if points.empty:
        return []
    fig, (left, right) = _two_panels(12)
    for i, ((run, line), g) in enumerate(points.groupby(["run", "line"], sort=False)):
        label = line if len(data.keys) == 1 else f"{run}: {line}"
        color = DISTINCT[i % len(DISTINCT)]  # one colour per comparison, the same in both panels
        caveat = g["caveat"].iloc[0]
        style = {"color": GREY, "linestyle": "--"} if caveat else {"color": color}
        left.plot(g["size"], g["throughput_ratio"], marker="o", label=label + (f" ({caveat})" if caveat else ""), **style)
        if g["loss_ratio"].notna().sum() >= 2:
            right.plot(g["size"], g["loss_ratio"], marker="o", label=label, color=color)
    for ax, what in ((left, "tokens/s"), (right, "final training loss")):
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set(xlabel="model size: activated parameters of A (log scale)", ylabel=f"{what}, B ÷ A")
    _finish(fig, [left, right])
    return [("scaling", fig)]

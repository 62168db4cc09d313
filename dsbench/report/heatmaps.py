"""Routing heatmaps: expert load per layer over the training steps, and routing by data domain.
One figure per routed cell (at most MAX_HEATMAP_CELLS), one panel per layer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dsbench.report.data import ReportData, safe_name
from dsbench.report.figures import cell_names, figure

MAX_HEATMAP_CELLS = 8  # one figure per routed train cell, at most this many
MAX_HEATMAP_LAYERS = 8


def _layers(s: pd.DataFrame) -> list:
    layers = sorted(s["layer"].dropna().unique().tolist())
    return layers[:MAX_HEATMAP_LAYERS] if layers else [None]


def _of_layer(s: pd.DataFrame, layer) -> pd.DataFrame:
    return s[s["layer"].isna()] if layer is None else s[s["layer"] == layer]


def _heatmaps(data: ReportData, metric: str, build, xlabel: str, ylabel: str, bar: str) -> list[tuple[str, Figure]]:
    """One figure per cell (at most MAX_HEATMAP_CELLS), one panel per layer."""
    out, names = [], cell_names(data)
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
        out.append((f"{metric}_{safe_name(run)}_{cell}", fig))
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

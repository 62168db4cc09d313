"""The report's first screen: the cards (dsbench.report.cards) as blocks the renderers draw, each
with its small figure: one dot per pair's B ÷ A, per headline metric. Several runs: one card per
comparison with a column per run and the change from the first run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from dsbench.report.cards import Card, Headline, by_comparison, cards, moved, unpaired
from dsbench.report.data import ReportData, present, safe_name
from dsbench.report.comparisons import DISTINCT
from dsbench.report.figures import GREY
from dsbench.report.render import Section, write_csv
from dsbench.report.plain_text import save_figure

CARD_CAPTION = ("Dots: one pair's B ÷ A (log scale); bar: the median; hollow grey: a pair with an emulated or "
                "numerics-only side, left out of the speed claim. Right of the line at ×1: B is higher.")


def headline_cell(h: Headline | None, with_n: bool) -> str:
    """'×0.952 [0.94–0.97]' (' n=12' with several runs), 'not claimed' (every pair flagged: the verdict
    counts them) or '–'."""
    if h is None:
        return "–"
    if not h.ratios:
        return "not claimed"
    return h.spread() + (f" n={h.n}" if with_n else "")


def change_cell(first: Headline | None, other: Headline | None) -> str:
    """How far the median moved, in points of B ÷ A − 1: '+1.6 pp'."""
    if first is None or other is None or not first.ratios or not other.ratios:
        return "–"
    return f"{100 * (other.median - first.median):+.1f} pp"


def rows_of(group: list[Card]) -> tuple[list[str], list[list[str]], list[str]]:
    """One table for a comparison's cards: metric, B ÷ A per run, the change from the first run."""
    labels = list(dict.fromkeys(h.label for c in group for h in c.headlines))
    by = [{h.label: h for h in c.headlines} for c in group]
    several = len(group) > 1
    header = ["metric", *([c.run for c in group] if several else ["B ÷ A [min–max]", "n"]),
              *([f"change {c.run}" for c in group[1:]] if several else [])]
    rows, classes = [], []
    for label in labels:
        cells = [headline_cell(b.get(label), several) for b in by]
        changes = [change_cell(by[0].get(label), b.get(label)) for b in by[1:]]
        n = [] if several else [str(by[0][label].n or "–")]
        rows.append([label, *cells, *n, *changes])
        classes.append("noted" if all(b.get(label) is None or not b[label].ratios for b in by) else "")
    return header, rows, classes


def draw_card(group: list[Card]) -> Figure:
    """Per headline, each pair's B ÷ A as a dot (log10 axis labelled as ×ratio), one colour per run."""
    labels = list(dict.fromkeys(h.label for c in group for h in c.headlines))
    several = len(group) > 1
    fig = Figure(figsize=(3.4, 0.7 + 0.2 * len(labels)) if several else (2.4, 0.45 + 0.17 * len(labels)), layout="constrained")
    ax = fig.subplots()
    offsets = np.linspace(-0.18, 0.18, len(group)) if len(group) > 1 else [0.0]
    for k, c in enumerate(group):
        color = DISTINCT[k % len(DISTINCT)]
        for y, label in enumerate(labels):
            h = next((h for h in c.headlines if h.label == label), None)
            if h is None:
                continue
            yy = y + offsets[k]
            flagged = [r for rs in h.flagged.values() for r in rs]
            ax.scatter(np.log10(flagged), [yy] * len(flagged), s=10, facecolors="none", edgecolors=GREY, linewidths=0.7)
            ax.scatter(np.log10(h.ratios), [yy] * len(h.ratios), s=10, color=color, alpha=0.7, linewidths=0,
                       label=c.run if several and y == labels.index(h.label) and h is c.headlines[0] else None)
            if h.ratios:
                ax.plot([math.log10(h.median)] * 2, [yy - 0.3, yy + 0.3], color="black", linewidth=1.4)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6.5)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"×{10 ** v:.3g}"))
    ax.tick_params(axis="x", labelsize=6.5)
    ax.set_xlabel("B ÷ A per pair", fontsize=6.5)
    ax.grid(axis="x", alpha=0.3)
    if several:
        fig.legend(fontsize=6, loc="outside lower center", ncols=len(group), frameon=False)  # below: never on the dots
    return fig


def card_block(group: list[Card], folder: Path, n_runs: int) -> dict:
    first = group[0]
    runs = f"{len(group)} runs" if len(group) > 1 else first.device + (f" · only in {first.run}" if n_runs > 1 else "")
    subtitle = f"A = {first.comparison.a}, B = {first.comparison.b} · " + ", ".join(
        f"{c.n_pairs} pairs" + (f" in {c.run}" if len(group) > 1 else "") for c in group) + f" · {runs}"
    header, rows, classes = rows_of(group)
    lines = [c.verdict() if len(group) == 1 else f"{c.run}: {c.verdict()}" for c in group]
    if len(group) > 1:
        lines.append(moved(group))
    path = folder / f"card_{safe_name(first.title)}.png"
    save_figure(draw_card(group), path, dpi=100)
    return {"title": first.title, "subtitle": subtitle, "header": header, "rows": rows, "classes": classes,
            "lines": lines, "figure": {"file": path, "title": first.title, "caption": CARD_CAPTION}}


def card_frame(found: list[Card]) -> pd.DataFrame:
    """tables/cards.csv: one row per card and headline."""
    return pd.DataFrame([{"comparison": c.title, "run": c.run, "pairs": c.n_pairs, "device": c.device, "metric": h.metric,
                          "label": h.label, "median": h.median, "min": min(h.ratios, default=float("nan")),
                          "max": max(h.ratios, default=float("nan")), "n": h.n, "left_out": h.excluded(),
                          "judgement": h.judgement(), "verdict": c.verdict()} for c in found for h in c.headlines])


def summary_line(data: ReportData, n_cards: int) -> str:
    counts = data.cells["status"].value_counts().to_dict()
    cells = f"{len(data.cells)} cells (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")"
    failed = " — failed cells: see Failures below" if set(counts) - {"ok"} else ""
    return f"{len(data.runs)} run(s): {', '.join(data.keys)} · {cells}{failed} · {n_cards} comparison(s)."


def health_line(data: ReportData) -> str:
    """The run's health above the cards: what the verdicts below leave out, and where to look."""
    ok, counts = data.ok, []
    for column, what, where in (("contended", "contended (their speed is left out of every verdict)", "Environment and spec"),
                                ("emulated", "emulated (speed not claimed)", "Cells")):
        if column in ok:
            n = int(sum(present(v) and bool(v) for v in ok[column]))
            counts.append(f"{n} cell(s) {what}" + (f", see {where}" if n else ""))
    if "speed_note" in ok:
        n = int(sum(present(v) and bool(v) for v in ok["speed_note"]))
        counts.append(f"{n} numerics-only cell(s) (speed not claimed)" + (", see Cells" if n else ""))
    failed = int((data.cells["status"] != "ok").sum())
    counts.append(f"{failed} failed cell(s)" + (", see Failures" if failed else ""))
    return "Run health: " + "; ".join(counts) + "."


def cards_section(data: ReportData, figures: Path, tables: Path) -> Section:
    found = cards(data)
    write_csv(card_frame(found), tables, "cards")
    groups = by_comparison(found)
    s = Section("What each choice buys")
    s.text(summary_line(data, len(groups)))
    s.text(health_line(data))
    if not groups:
        return s.text("No axis has two values with cells identical in everything else (dsbench/pairing.py): nothing to compare.")
    ordered = sorted(groups.values(), key=lambda g: -len(g))  # those in several runs first: did the verdict move?
    s.blocks.append(("cards", [card_block(g, figures, len(data.runs)) for g in ordered]))
    notes = [f"Swept but never paired (its cells differ in more than {a}): {a}." for a in unpaired(data)]
    s.text("Each card pairs cells equal in everything but its axis (dsbench/pairing.py) and gives B ÷ A over the pairs: "
           "median [min–max], n. Speed and memory are per workload. " + CARD_CAPTION + " " + " ".join(notes)
           + (" 'change': the median's move from the first run, in percentage points of B ÷ A." if len(data.runs) > 1 else ""))
    return s


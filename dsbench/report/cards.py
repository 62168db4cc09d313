"""The first screen: one card per comparison the results hold (ffn, attention, precision, balance,
and every dotted axis swept, model.mtp included). A card pairs cells along one axis with
dsbench.pairing's rule (B against A, the value the spec lists first), and gives per metric the
median of B ÷ A over the pairs with its min–max, how many pairs, which pairs a speed claim
leaves out (emulated or numerics-only sides), the device, and a one-line verdict that says what
the numbers do and do not support.

    cards(data)                      # [Card, ...], one per (comparison, run)
    by_comparison(cards(data))       # {comparison title: [Card per run]}: several runs side by side
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dsbench.claims.mtp import MTP_DIFFER
from dsbench.metrics import METRICS, dotted_axis
from dsbench.pairing import norm, pairs
from dsbench.report.ablation import IMPLEMENTATION_BOUND, contended, speed_caveat

CAVEATS = ("numerics only", "emulated", "implementation-bound", "contended")  # speed_caveat's values, and contention
from dsbench.report.data import HEADLINE_METRICS, ReportData, present
from dsbench.schema import AXES
from dsbench.stats import TIMING_NOISE, RatioInterval, ratio_interval
from dsbench.workloads import names_where

# Headline metrics, in card order, with the card's label. Host-dependent ones (speed, memory)
# mean different things per workload, so they get one line per workload; the others are pooled.
# A card leaves out what restates tokens/s (step time, MFU); a line's label is the metric's short name
# unless a card words it out.
CARD_LABELS = {"peak_mem_bytes": "peak memory", "kv_cache_bytes_per_token": "KV bytes/token"}
HEADLINES = tuple((m, CARD_LABELS.get(m, METRICS[m].short)) for m in HEADLINE_METRICS if METRICS[m].group != "speed" or m == "tokens_per_s_median")
# The noise band of a metric the registry gives no relative tolerance (absolute-rule and analytic
# ones): 1%, twice the check policy's seeded-loss tolerance (0.5%).
NOISE = 0.01


def noise_band(metric: str) -> float:
    """How far the interval of B ÷ A must clear ×1 before a card calls it a difference: the
    registry's relative tolerance, the timing band for speed, else NOISE."""
    m = METRICS[metric]
    if m.group == "speed":
        return TIMING_NOISE
    return m.tolerance if m.check == "relative" and m.tolerance > 0 else NOISE
# Along a dotted axis whose field is also a config column, the pair is made along that column;
# these columns follow from its value (V3's MTP modules: λ, their parameters and FLOPs).
DIFFER = {"mtp": MTP_DIFFER}


@dataclass(frozen=True)
class Comparison:
    axis: str  # what the spec swept ("ffn", "model.mtp")
    column: str  # the cells column pairs differ in ("ffn", "mtp")
    a: object
    b: object

    @property
    def title(self) -> str:
        return f"{self.axis}: {self.b} vs {self.a}"


@dataclass
class Headline:
    """B ÷ A of one metric over a card's pairs; speed ratios of flagged pairs kept apart."""

    metric: str
    label: str
    ratios: list[float] = field(default_factory=list)
    flagged: dict[str, list[float]] = field(default_factory=dict)  # caveat → ratios left out of the claim

    @property
    def n(self) -> int:
        return len(self.ratios)

    @property
    def median(self) -> float:
        return float(np.median(self.ratios)) if self.ratios else float("nan")

    def spread(self) -> str:
        """'×0.952 [0.940, 0.970]' (the median and its 90% interval, dsbench.stats.ratio_interval),
        '×0.250' (every pair the same to 3 digits) or '–'."""
        if not self.ratios:
            return "–"
        iv = self.interval()
        lo, hi = f"{iv.low:.3f}", f"{iv.high:.3f}"
        return f"×{iv.median:.3f}" + ("" if lo == hi == f"{iv.median:.3f}" else f" [{lo}, {hi}]")

    def excluded(self) -> str:
        """'12 numerics-only, 12 emulated' or ''."""
        return ", ".join(f"{len(r)} {'numerics-only' if c == 'numerics only' else c}" for c, r in self.flagged.items() if r)

    def interval(self) -> RatioInterval:
        return ratio_interval(self.ratios)

    def judgement(self) -> str:
        """better | worse | same | '' (no pair): B against A, by the registry's direction. A
        difference only where the 90% interval of B ÷ A clears ×1 by more than the metric's noise
        band (dsbench.stats.ratio_interval, the rule claims share); 'same' otherwise."""
        if not self.ratios:
            return ""
        side = self.interval().excludes_one(noise_band(self.metric))
        if side == 0:
            return "same"
        return "better" if (side > 0) == (METRICS[self.metric].better == "higher") else "worse"

    @property
    def exact_tie(self) -> bool:
        """Every ratio exactly 1 (an analytic quantity the axis does not touch)."""
        return bool(self.ratios) and all(r == 1 for r in self.ratios)


@dataclass
class Card:
    comparison: Comparison
    run: str
    n_pairs: int
    device: str
    headlines: list[Headline]
    sizes: int  # distinct model sizes (d_model, n_layers) among the pairs
    steps: list[int]  # train steps among the pairs

    @property
    def title(self) -> str:
        return self.comparison.title

    def verdict(self) -> str:
        return verdict(self)


# --- which comparisons ---


def swept_axes(data: ReportData) -> list[str]:
    """The axes a card can compare: the named ones but workload, then each dotted axis some spec swept."""
    dotted: list[str] = []
    for r in data.runs:
        dotted += [a for a in (r.run.get("spec", {}).get("axes") or {}) if dotted_axis(a) and a not in dotted]
    return [a for a in AXES if a != "workload"] + [a for a in dotted if a in data.cells]


def values_of(data: ReportData, axis: str) -> list:
    """The axis's values in the specs' order, those some ok cell has (A first)."""
    order: list = list(data.axis_order.get(axis, []))
    for r in data.runs:
        order += [v for v in (r.run.get("spec", {}).get("axes", {}).get(axis) or []) if v not in order]
    held = {norm(v) for v in data.ok[axis]}
    return [v for v in order if norm(v) is not None and norm(v) in held]


def pair_column(data: ReportData, axis: str) -> tuple[str, tuple[str, ...]]:
    """(column to pair along, columns allowed to differ): a dotted axis pairs along its field's
    config column where there is one (model.mtp → mtp)."""
    field_name = axis.partition(".")[2]
    if dotted_axis(axis) and field_name in data.cells:
        return field_name, (axis, *DIFFER.get(field_name, ()))
    return axis, ()


def comparisons(data: ReportData) -> list[tuple[Comparison, tuple[str, ...]]]:
    found = []
    for axis in swept_axes(data):
        values = values_of(data, axis)
        column, differ = pair_column(data, axis)
        found += [(Comparison(axis, column, values[0], b), differ) for b in values[1:]]
    return found


# --- one card ---


def _ratio(a: pd.Series, b: pd.Series, metric: str) -> float | None:
    if metric not in a or not (present(a[metric]) and present(b[metric])) or float(a[metric]) == 0:
        return None
    return float(b[metric]) / float(a[metric])


def headlines(found: list[tuple[pd.Series, pd.Series]], columns) -> list[Headline]:
    """One Headline per metric present (per workload for host-dependent metrics), in HEADLINES order."""
    workloads = list(dict.fromkeys(str(a["workload"]) for a, _ in found))  # named always: runs compare by label
    out = []
    for metric, label in HEADLINES:
        if metric not in columns:
            continue
        for w in (workloads if METRICS[metric].host_dependent else [None]):
            h = Headline(metric, f"{label} ({w})" if w else label)
            for a, b in found:
                r = _ratio(a, b, metric)
                if r is None or (w and str(a["workload"]) != w):
                    continue
                caveat = speed_caveat(a, b) or contended(a, b) if METRICS[metric].group == "speed" else ""
                (h.flagged.setdefault(caveat, []) if caveat else h.ratios).append(r)
            if h.ratios or h.flagged:
                out.append(h)
    return out


def device_of(data: ReportData, run: str, found) -> str:
    """'cpu', or 'cuda (NVIDIA H100 80GB HBM3)' from the run's environment."""
    devices = sorted({str(a.get("device")) for a, _ in found if present(a.get("device"))}) or ["?"]
    env = (data.runs[data.keys.index(run)].run.get("environment") or {}) if run in data.keys else {}
    gpu = env.get("gpu_name")
    return ", ".join(f"{d} ({gpu})" if d == "cuda" and gpu else d for d in devices)


def card(data: ReportData, comparison: Comparison, run: str, found) -> Card:
    sizes = {(norm(a.get("d_model")), norm(a.get("n_layers"))) for a, _ in found}
    steps = sorted({int(norm(a["steps"])) for a, _ in found if str(a["workload"]) in names_where("trains") and present(a.get("steps"))})
    return Card(comparison, run, len(found), device_of(data, run, found), headlines(found, data.ok.columns),
                len(sizes), steps)


def cards(data: ReportData) -> list[Card]:
    """Every comparison with at least one pair, one card per run that holds pairs, comparison order."""
    ok, out = data.ok, []
    for comparison, differ in comparisons(data):
        found = pairs(ok, comparison.column, comparison.a, comparison.b, differ=differ)
        for run in data.keys:
            mine = [(a, b) for a, b in found if a["run"] == run]
            if mine:
                out.append(card(data, comparison, run, mine))
    return out


def unpaired(data: ReportData) -> list[str]:
    """Swept axes with two values present but no pair (their cells differ in more than that axis)."""
    made = {c.comparison.axis for c in cards(data)}
    return [a for a in swept_axes(data) if len(values_of(data, a)) >= 2 and a not in made]


def by_comparison(found: list[Card]) -> dict[str, list[Card]]:
    grouped: dict[str, list[Card]] = {}
    for c in found:
        grouped.setdefault(c.title, []).append(c)
    return grouped


# --- the verdict, in words ---

WORDS = {"higher": {"better": "higher", "worse": "lower"}, "lower": {"better": "lower", "worse": "higher"}}


def _pairs(n: int) -> str:
    return f"{n} pair{'s' * (n != 1)}"


def phrase(h: Headline) -> str:
    """'final loss 2.1% lower [×0.975, ×0.983] (12 pairs)', 'tokens/s (prefill) ×0.798 [×0.798, ×0.798]
    (1 pair: too few for a 90% interval)'."""
    j, iv = h.judgement(), h.interval()
    bounds = f"[×{iv.low:.3f}, ×{iv.high:.3f}]"
    if j == "same":
        why = (f"{_pairs(h.n)}: too few for a 90% interval" if iv.confidence < 0.9 - 1e-9
               else f"{_pairs(h.n)}, noise band ±{noise_band(h.metric):.0%}")
        return f"{h.label} ×{iv.median:.3f} {bounds} ({why})"
    change = iv.median - 1
    return f"{h.label} {abs(change):.1%} {'higher' if change > 0 else 'lower'} {bounds} ({_pairs(h.n)})"


def subject(c: Card) -> str:
    """'mla vs mha'; a dotted axis names itself: 'model.mtp = 1 vs 0'."""
    axis = c.comparison.axis
    return f"{axis} = {c.comparison.b} vs {c.comparison.a}" if "." in axis else f"{c.comparison.b} vs {c.comparison.a}"


def verdict(c: Card) -> str:
    """One line: what B does against A on these numbers, and what they do not support."""
    claimed = [h for h in c.headlines if h.ratios and not h.exact_tie]
    groups = (("better", ("better",)), ("worse", ("worse",)), ("no clear difference", ("same",)))
    parts = [f"{subject(c)}, {_pairs(c.n_pairs)} on {c.device}:"]
    for word, kinds in groups:
        said = [phrase(h) for h in claimed if h.judgement() in kinds]
        if said:
            parts.append(f"{word}: {'; '.join(said)}.")
    parts.append("Not supported: " + "; ".join(limits(c)) + ".")
    return " ".join(parts)


def limits(c: Card) -> list[str]:
    """What the numbers cannot say: speeds with an emulated or numerics-only side, one model size,
    short training."""
    unclaimed = [h for h in c.headlines if h.flagged and not h.ratios]
    out = []
    if unclaimed:
        flagged = Headline("", "", flagged={k: [r for h in unclaimed for r in h.flagged.get(k, [])] for k in CAVEATS})
        bound = flagged.flagged.get("implementation-bound")
        kinds = "an emulated, numerics-only or implementation-bound" if bound else "an emulated or numerics-only"
        why = f"; implementation-bound: under {IMPLEMENTATION_BOUND:.0%} of its speed of light, or launch-bound" if bound else ""
        out.append(f"{', '.join(h.label for h in unclaimed)}: every pair has {kinds} side ({flagged.excluded()} pairs{why})")
    out += [f"{h.label} beyond its clean pairs ({h.excluded()} left out)" for h in c.headlines if h.flagged and h.ratios]
    if c.sizes == 1:
        out.append("a trend with model size (one size)")
    if c.steps and max(c.steps) < 1000:
        out.append(f"converged quality ({'/'.join(map(str, c.steps))} train steps)")
    return out or ["nothing beyond these pairs"]


def moved(cards_of_runs: list[Card]) -> str:
    """Two or more runs of one comparison: which metrics' verdicts moved from the first run."""
    first, changes = cards_of_runs[0], []
    for other in cards_of_runs[1:]:
        theirs = {h.label: h.judgement() for h in other.headlines}
        for h in first.headlines:
            j = theirs.get(h.label)
            if j is not None and j != h.judgement():
                changes.append(f"{h.label}: {h.judgement() or 'not claimed'} → {j or 'not claimed'} ({other.run})")
    return ("Verdict moved: " + "; ".join(changes) + ".") if changes else "Verdict unchanged across the runs."

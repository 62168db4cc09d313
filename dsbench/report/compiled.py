"""The compiled-measurement view (dsbench/compiled.py): compiled ÷ eager per variant, what
compiling cost, and whether an architecture choice's B ÷ A changes once both sides compile."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dsbench.pairing import pairs
from dsbench.report.ablation import axis_pairs, held_fixed, side
from dsbench.report.data import ReportData, fmt_num, present, short_shape
from dsbench.report.render import Section, write_csv

AXIS = "measure.compile"
EAGER = "eager"
PER_VARIANT = ["cell", "workload", "mode", "eager tokens/s", "compiled tokens/s", "compiled ÷ eager", "compile_s",
               "graph breaks", "steps that compiled (timed)", "settled", "CUDA graphs"]


def mode_of(row: pd.Series) -> str:
    return str(row["compile_mode"]) if present(row.get("compile_mode")) else EAGER


def per_variant(data: ReportData) -> pd.DataFrame:
    """One row per (eager cell, compiled cell) pair: throughputs, their ratio, the compile columns."""
    rows = []
    for a, b in pairs(data.ok, AXIS, EAGER) if AXIS in data.ok else []:
        ratio = b["tokens_per_s_median"] / a["tokens_per_s_median"] if a["tokens_per_s_median"] else np.nan
        rows.append({
            "cell": f"{held_fixed(a, 'workload')} {short_shape(str(a['label']))}", "workload": a["workload"], "mode": mode_of(b),
            "eager tokens/s": a["tokens_per_s_median"], "compiled tokens/s": b["tokens_per_s_median"], "compiled ÷ eager": ratio,
            "compile_s": b.get("compile_s"), "graph breaks": b.get("graph_breaks"),
            "steps that compiled (timed)": f"{_int(b.get('compile_steps'))} ({_int(b.get('timed_compile_steps'))})",
            "settled": b.get("compile_settled"), "CUDA graphs": b.get("cudagraph_recordings"),
        })
    return pd.DataFrame(rows, columns=PER_VARIANT)


def choice_by_mode(data: ReportData) -> pd.DataFrame:
    """For each architecture axis: B ÷ A tokens/s (median over its pairs) among eager pairs and
    among each compiled mode's pairs (pairing holds the mode fixed, so each pair is one mode)."""
    rows: dict[tuple, dict] = {}
    for axis, a, b in axis_pairs(data):
        if not (present(a["tokens_per_s_median"]) and present(b["tokens_per_s_median"]) and a["tokens_per_s_median"]):
            continue
        key = (axis, f"{side(b, axis)} ÷ {side(a, axis)}", a["workload"])
        rows.setdefault(key, {}).setdefault(mode_of(a), []).append(b["tokens_per_s_median"] / a["tokens_per_s_median"])
    modes = sorted({m for by_mode in rows.values() for m in by_mode}, key=lambda m: (m != EAGER, m))
    table = [{"axis": axis, "B ÷ A": comparison, "workload": workload,
              **{m: float(np.median(by_mode[m])) if m in by_mode else np.nan for m in modes}}
             for (axis, comparison, workload), by_mode in rows.items() if len(by_mode) > 1]
    return pd.DataFrame(table, columns=["axis", "B ÷ A", "workload", *modes])


def compiled_section(data: ReportData, tables) -> Section | None:
    """None unless some cell ran compiled."""
    if "compile_mode" not in data.cells or not data.cells["compile_mode"].map(present).any():
        return None
    s = Section("Compiled measurement")
    s.text("Compiled cells run the model under torch.compile (inductor; compile-graphs adds CUDA graphs). "
           "Steps during which something compiled are not samples: their wall time is compile_s. Graph breaks are "
           "code that ran eager between compiled graphs. A cell that was still compiling after its extra rounds "
           "is not settled, and has fewer samples than asked.")
    variants = per_variant(data)
    write_csv(variants, tables, "compiled_per_variant")
    if not variants.empty:
        kinds = {"eager tokens/s": "int", "compiled tokens/s": "int", "compiled ÷ eager": "ratio", "compile_s": "g", "graph breaks": "int",
                 "CUDA graphs": "int"}
        s.table(PER_VARIANT, [[fmt_num(r[c], kinds[c]) if c in kinds else _text(r[c]) for c in PER_VARIANT]
                              for _, r in variants.iterrows()])
    choices = choice_by_mode(data)
    write_csv(choices, tables, "compiled_choice_by_mode")
    if not choices.empty:
        s.text("Does compiling change what a choice buys? B ÷ A tokens/s (median over its pairs), eager pairs against compiled pairs.")
        modes = [c for c in choices.columns if c not in ("axis", "B ÷ A", "workload")]
        s.table(["axis", "B ÷ A", "workload", *modes],
                [[r["axis"], r["B ÷ A"], r["workload"], *(fmt_num(r[m], "ratio") for m in modes)] for _, r in choices.iterrows()])
    return s


def _int(value) -> str:
    return str(int(value)) if present(value) else "–"


def _text(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value) if present(value) else "–"

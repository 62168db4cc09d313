"""The report's sections, each built from the ReportData (and writing its tables/*.csv):
environment and spec, failures, the cells, the ablation, the baseline check, the claims, the
figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dsbench import claims
from dsbench.check import fmt_value
from dsbench.contention import measurement_warnings
from dsbench.metrics import METRICS, table_columns
from dsbench.report.ablation import MAIN_METRICS, ablation, ablation_summary
from dsbench.report.data import ReportData, display_name, fmt_num, present, safe_name, speed_flag
from dsbench.report.figures import FIGURES, render_figures
from dsbench.report.render import Section, frame_rows, write_csv
from dsbench.results import Results
from dsbench.schema import AXES

# The cells table: (header, column, display format), from the metric registry.
CELL_COLUMNS = tuple((m.short, m.name, m.fmt) for m in table_columns())


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
        for section in (spec.get("axes") or {}).get("workload") or []:  # each workload's own section, as recorded
            if isinstance(spec.get(section), dict):
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


def overview_section(data: ReportData, tables: Path) -> Section:
    env, spec = environment_table(data), spec_table(data)
    write_csv(env, tables, "environment")
    write_csv(spec, tables, "spec")
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
    write_csv(failures, tables, "failures")
    s = Section("Failures")
    if failures.empty:
        return s.text("Every cell finished ok.")
    s.text(f"{len(failures)} cell(s) did not finish ok: oom (out of memory), error (an exception; its last line), "
           "timeout (killed after measure.timeout_s), diverged (NaN/inf loss or logits); on Slurm also preempted, cancelled "
           "and node_fail (the job ended without a result). Full logs: <results>/logs/<cell_id>.log.")
    header, rows = frame_rows(failures if len(data.runs) > 1 else failures.drop(columns="run"))
    return s.table(header, rows, ["failed"] * len(rows))


def cells_section(data: ReportData, tables: Path) -> Section:
    keep = [c for c in ("run", "cell_id", "label", "status", *AXES,
                        *(c[1] for c in CELL_COLUMNS), "step_time_ms_p10", "step_time_ms_p90", "emulated", "speed_note") if c in data.cells]
    write_csv(data.cells[keep], tables, "cells")
    header, rows, classes = cells_table(data)
    s = Section("Cells")
    s.text("Medians over the timed steps (warm-up excluded). Grey rows: emulated (speed means nothing); "
           "blue rows: numerics only on this device. Click a header to sort.")
    s.table(header, rows, classes, sortable=True)
    notes = [str(n) for n in data.cells.get("speed_note", pd.Series(dtype=object)).dropna().unique() if n]
    for note in notes:
        s.text(f"Note: {note}")
    return s


def ablation_section(data: ReportData, tables: Path) -> Section:
    long = ablation(data)
    summary = ablation_summary(long)
    write_csv(long, tables, "ablation")
    write_csv(summary, tables, "ablation_summary")
    s = Section("Ablation: B ÷ A with everything else fixed")
    if long.empty:
        return s.text("No axis has two values with cells identical in everything else; nothing to compare.")
    s.text("For each axis, A is the first value the spec lists; each ratio divides a metric of cell B by the same metric "
           "of cell A, the two equal in every other axis, config column and shape (dsbench/pairing.py states the rule). "
           f"{_better_text()} Geometric mean over the contexts, with min–max.")
    rows, classes = [], []
    for _, r in summary.iterrows():
        spread = f"{r['min']:.3f}–{r['max']:.3f}" if r["n"] > 1 else ""
        note = {"emulated": "emulated: speed means nothing", "numerics only": "numerics only: speed not representative",
                "implementation-bound": "implementation-bound: a side far from its speed of light"}.get(r["speed_caveat"], "")
        rows.append([r["axis"], r["comparison"], r["metric"], f"×{r['geomean']:.3f}", spread, str(r["n"]), note])
        classes.append({"emulated": "emulated", "numerics only": "noted", "implementation-bound": "noted"}.get(r["speed_caveat"], ""))
    s.table(["axis", "B ÷ A", "metric", "ratio", "min–max", "contexts", "note"], rows, classes)
    detail = long.pivot_table(index=["axis", "comparison", "context", "run"], columns="metric", values="ratio", sort=False).reset_index()
    if len(data.runs) == 1:
        detail = detail.drop(columns="run")
    header = list(detail.columns)
    detail_rows = [[str(v) if isinstance(v, str) else fmt_num(v, "ratio") for v in row] for row in detail.itertuples(index=False)]
    s.blocks.append(("details", f"Every pair ({len(detail)} rows)", [("table", header, detail_rows, None)]))
    return s


def _better_text() -> str:
    """Which way each ablation metric is better, from the metric registry."""
    by = {way: [m for m in MAIN_METRICS if METRICS[m].better == way] for way in ("higher", "lower")}
    return f"Above 1 is better for {', '.join(by['higher'])}; below 1 for {', '.join(by['lower'])}."


def baseline_section(data: ReportData, baseline: Path, tables: Path, results: list) -> Section:
    """results: each run's dsbench.check result against the baseline (checked before the report is written)."""
    s = Section(f"Against the baseline {baseline}")
    for key, result in zip(data.keys, results):
        frame = result.frame()
        write_csv(frame, tables, f"check_{safe_name(key)}")
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
    """The papers' claims (dsbench.claims evaluates, this renders), or None when the runs hold
    no evidence for any empirical claim."""
    rows = claims.evaluate(runs)
    if not claims.has_evidence(rows):
        return None
    claims.frame(rows).to_csv(tables / "claims.csv", index=False)
    s = Section("Claims: the papers' efficiency claims")
    s.text("Analytic claims come from the official model configs; empirical ones from these results "
           "(dsbench claims RESULTS prints the same table). Direction-only verdicts are small-scale evidence.")
    s.table(["id", "claim", "source", "expected", "measured", "verdict", "detail"],
            [[r.claim.id, r.claim.statement, f"{r.claim.paper} {r.claim.where}", r.claim.expected, r.evidence.measured,
              r.evidence.verdict, r.evidence.detail] for r in rows])
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

"""Regression check: a current results folder against a baseline, cell by cell, metric by
metric, under a policy (dsbench/policy.py: the shipped dsbench/policies/default.toml, whose
comments state every rule, with the metric registry's per-column defaults).

    result = check("results/ci-baseline", "results/ci-now")   # the default policy
    result.exit_code        # 0 clean, 1 regression
    print(result.markdown())

Rules: `exact` for deterministic quantities (parameters, FLOPs, KV bytes), `relative` or
`absolute` tolerances for seeded quantities (losses, MaxVio) and memory, and two timing rules:
- samples (both sides ran the cell in several processes, as `dsbench ab` does on one machine):
  an exact one-sided Mann–Whitney rank test over the processes' step times and the
  Hodges–Lehmann ratio (dsbench/stats.py); a regression needs both the ratio above the
  threshold and the test significant;
- reference (one process a side): the ratio to a reference cell of the same run, with a
  threshold widened by the samples' spread — a machine uniformly faster or slower than the
  baseline's cancels out, a variant that slowed down alone does not. Only comparable on one
  kind of machine: CPUs of other ISAs slow cells unevenly.
Contended or noisy measurements (measure.py's contention columns) are flagged, never silently
compared. Cells pair up by label, so new config fields (which change every cell_id) do not
orphan a baseline.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dsbench.contention import flag, measurement_warnings
from dsbench.metrics import host_dependent_columns, metric_of
# The policy lives in dsbench.policy; callers (cli, ab, scripts, tests) import these from here too.
from dsbench.policy import MetricRule, Policy, PolicyError, TimingRule, load_policy  # noqa: F401
from dsbench.results import Results, ResultsError, load_results
from dsbench.stats import compare_samples

EXACT_RTOL = 1e-9  # "exact" on floats written through JSON and parquet: round-off only


# --- the result ---


@dataclass
class CheckRow:
    cell: str
    metric: str
    rule: str
    verdict: str  # ok | regression | improved | missing | failed | new | fixed | skipped | reference
    baseline: object = None
    current: object = None
    change: float | None = None  # current ÷ baseline; for timing, the reference-normalised ratio
    limit: str = ""
    note: str = ""
    fails: bool = False


@dataclass
class CheckResult:
    baseline: Path
    current: Path
    policy: Policy
    rows: list[CheckRow] = field(default_factory=list)
    reference: str | None = None
    machine_factor: float | None = None  # the reference cell's raw current ÷ baseline time
    warnings: list[str] = field(default_factory=list)  # contended or noisy measurements, by cell

    @property
    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if r.fails]

    @property
    def compared(self) -> int:
        """Rows that compared a value of both runs (not notes, failures, new or missing cells)."""
        return sum(r.verdict in COMPARED for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures or not self.compared else 0  # a gate that compared nothing has not passed

    def counts(self) -> dict[str, int]:
        return pd.Series([r.verdict for r in self.rows], dtype=object).value_counts().to_dict()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.rows], columns=list(CheckRow.__dataclass_fields__))

    def to_json(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "verdict": "regression" if self.exit_code else "clean",
            "baseline": str(self.baseline),
            "current": str(self.current),
            "policy": self.policy.source,
            "reference": self.reference,
            "machine_factor": _finite(self.machine_factor),
            "counts": self.counts(),
            "warnings": self.warnings,
            "rows": [{k: _finite(v) for k, v in asdict(r).items()} for r in self.rows],
        }

    def markdown(self) -> str:
        return render_markdown(self)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value.item() if hasattr(value, "item") else value


# --- loading ---


def load_checked(path: str | Path, role: str) -> Results:
    """load_results with the two problems a user meets first, each in one line."""
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{role}: {str(path)!r} does not exist; pass a results folder written by `dsbench run sweep`")
    if not path.is_dir():
        raise ResultsError(f"{role}: {str(path)!r} is not a folder; pass a results folder written by `dsbench run sweep`")
    results = load_results(path)
    if results.cells.empty:
        raise ResultsError(f"{role}: {str(path)!r} holds no cells (an empty or unstarted run); run the sweep first")
    return results


def cell_keys(cells: pd.DataFrame, match: str) -> pd.Series:
    """The key each cell pairs up by; repeated labels are told apart by their cell_id."""
    if match == "cell_id":
        return cells["cell_id"].astype(str)
    labels = cells["label"].astype(str)
    repeated = labels.duplicated(keep=False)
    return labels.where(~repeated, labels + " [" + cells["cell_id"].astype(str) + "]")


def collapse_replicates(cells: pd.DataFrame, timing_metric: str) -> pd.DataFrame:
    """Replicates of a cell (measure.replicates, each its own process) become one row: the
    first replicate's values, with the step times of the fastest replicate (best of N processes:
    a process slowed by another one's burst of work does not count), and the first failure's
    status if any replicate failed."""
    if "replicate" not in cells or not (cells["replicate"].fillna(0) > 0).any():
        if SAMPLE in cells:
            cells = cells.copy()
            cells[SAMPLES] = [[float(v)] if _present(v) and s == "ok" else [] for v, s in zip(cells[SAMPLE], cells["status"])]
        return cells
    base = cells["label"].astype(str).str.replace(r" #\d+$", "", regex=True)
    rows = []
    for _, group in cells.groupby(base, sort=False):
        row = group.iloc[0].copy()
        row["label"] = base[group.index[0]]
        failed = group[group["status"] != "ok"]
        if not failed.empty:
            row["status"], row["error"] = failed.iloc[0]["status"], failed.iloc[0].get("error")
        elif timing_metric in group and group[timing_metric].notna().any():
            fastest = group.loc[group[timing_metric].astype(float).idxmin()]
            row[timing_metric] = group[timing_metric].astype(float).min()
            for col in [c for c in group.columns if c.startswith(("step_time_ms_", "tokens_per_s_")) and c != timing_metric]:
                row[col] = fastest[col]  # the spread is the fastest process's
        row["replicates"] = len(group)
        if "contended" in group:
            row["contended_processes"] = int(sum(flag(v) for v in group["contended"]))
        if SAMPLE in group:
            row[SAMPLES] = group.loc[group["status"] == "ok", SAMPLE].dropna().astype(float).tolist()
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


STEP_MIN = "step_time_ms_min"
SAMPLE, SAMPLES = "_sample", "_samples"  # one process's value of timing.samples_metric; a cell's list of them


def with_step_min(cells: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """Add `step_time_ms_min`, each cell's fastest timed step (series.parquet); a cell without
    step-time series falls back to its step_time_ms_p10 (and says so in `step_time_source`)."""
    cells = cells.copy()
    steps = series[series["metric"] == "step_time_ms"] if not series.empty else series
    fastest = steps.groupby("cell_id")["value"].min() if not steps.empty else pd.Series(dtype=float)
    cells[STEP_MIN] = cells["cell_id"].map(fastest).astype(float)
    missing = cells[STEP_MIN].isna()
    cells["step_time_source"] = "min of the series"
    if "step_time_ms_p10" in cells:
        cells.loc[missing, STEP_MIN] = cells.loc[missing, "step_time_ms_p10"]
        cells.loc[missing, "step_time_source"] = "p10 (no step-time series)"
    return cells


def _indexed(results: Results, policy: Policy) -> pd.DataFrame:
    cells = results.cells
    if "cell_index" in cells:
        cells = cells.sort_values("cell_index", kind="stable")
    if STEP_MIN in (policy.timing.metric, policy.timing.samples_metric) and STEP_MIN not in cells:
        cells = with_step_min(cells, results.series)
    if policy.timing.samples_metric in cells:
        cells = cells.assign(**{SAMPLE: pd.to_numeric(cells[policy.timing.samples_metric], errors="coerce")})
    cells = collapse_replicates(cells, policy.timing.metric)
    return cells.set_index(pd.Index(cell_keys(cells, policy.match).tolist()))


# --- the check ---


def check(baseline: str | Path, current: str | Path, policy: Policy | None = None) -> CheckResult:
    """Compare `current` with `baseline` under `policy` (default: the shipped policy)."""
    policy = policy or load_policy()
    base_run, cur_run = load_checked(baseline, "--baseline"), load_checked(current, "--current")
    base, cur = _indexed(base_run, policy), _indexed(cur_run, policy)
    result = CheckResult(Path(baseline), Path(current), policy)
    comparable = environment_rows(result, base_run.run.get("environment") or {}, cur_run.run.get("environment") or {})
    if policy.timing.enabled and "baseline_of" in base_run.run:
        result.rows.append(CheckRow("(all cells)", "timing", "timing", "skipped", note="a host-independent baseline holds no "
                                    "timings; compare timings on one machine with `dsbench ab`"))
        comparable = False
    for key in base.index:
        if key not in cur.index:
            result.rows.append(CheckRow(key, "cell", "present", "missing", "present", "absent",
                                        note="in the baseline, not in the current run", fails=policy.missing == "fail"))
    for key in cur.index.difference(base.index, sort=False):
        result.rows.append(CheckRow(key, "cell", "present", "new", "absent", "present", note="only in the current run"))
    paired = [k for k in base.index if k in cur.index]
    ok = [k for k in paired if _status_rows(result, k, base.loc[k], cur.loc[k])]
    for key in ok:
        for metric, rule in policy.metrics.items():
            row = compare_metric(key, metric, rule, base.loc[key].get(metric), cur.loc[key].get(metric))
            if row is not None:
                result.rows.append(row)
    if policy.timing.enabled and comparable:
        sampled = [k for k in ok if _sampled(policy.timing, base.loc[k]) and _sampled(policy.timing, cur.loc[k])]
        for key in sampled:
            result.rows.append(compare_timing_samples(policy.timing, key, base.loc[key], cur.loc[key]))
        if len(sampled) < len(ok):
            check_timing(result, base, cur, [k for k in ok if k not in sampled])
    result.warnings = contention_warnings(base_run, "baseline") + contention_warnings(cur_run, "current")
    return result


ENVIRONMENT_NOTES = ("cpu_model", "cpu_count_logical", "gpu_name", "torch_version", "python_version")


def environment_rows(result: CheckResult, base: dict, cur: dict) -> bool:
    """Note environment differences; False (timings not comparable) when the thread counts differ."""
    for key in ENVIRONMENT_NOTES:
        if key in base and key in cur and base[key] != cur[key]:
            result.rows.append(CheckRow("(environment)", key, "note", "changed", base[key], cur[key], note="timings may not transfer"))
    b, c = base.get("torch_num_threads"), cur.get("torch_num_threads")
    if b is None or c is None or b == c or not result.policy.timing.enabled:
        return True
    result.rows.append(CheckRow("(environment)", "torch_num_threads", "equal", "regression", b, c, fails=True,
                                note="timings not compared: record the baseline with the thread count the check runs "
                                     "(.ci/run sets OMP_NUM_THREADS=1)"))
    return False


def _status_rows(result: CheckResult, key: str, b: pd.Series, c: pd.Series) -> bool:
    """Rows for cells that failed on either side; True when both sides are ok."""
    if b["status"] == "ok" and c["status"] == "ok":
        return True
    if b["status"] == "ok":
        result.rows.append(CheckRow(key, "status", "ok", "failed", "ok", c["status"], note=str(c.get("error") or ""),
                                    fails=result.policy.missing == "fail"))
    elif c["status"] == "ok":
        result.rows.append(CheckRow(key, "status", "ok", "fixed", b["status"], "ok", note="failed in the baseline"))
    else:
        result.rows.append(CheckRow(key, "status", "ok", "skipped", b["status"], c["status"], note="failed in both runs"))
    return False


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def compare_metric(key: str, metric: str, rule: MetricRule, b, c) -> CheckRow | None:
    """One metric of one cell; None when the baseline does not have it (nothing to hold to)."""
    if not _present(b):
        return None
    if not _present(c):
        return CheckRow(key, metric, rule.describe(), "missing", b, None, note="absent from the current run", fails=True)
    try:
        b, c = float(b), float(c)
    except (TypeError, ValueError):  # a text column named in the policy: equal or not
        same = str(b) == str(c)
        return CheckRow(key, metric, "exact", "ok" if same else "regression", b, c, None, "equal", fails=not same)
    change = c / b if b else (1.0 if c == 0 else math.inf)
    delta = c - b
    if rule.rule == "exact":
        same = delta == 0 or abs(delta) <= EXACT_RTOL * max(abs(b), abs(c))
        return CheckRow(key, metric, "exact", "ok" if same else "regression", b, c, change,
                        "equal", "" if same else f"changed by {delta:+.6g}", fails=not same)
    allowed = rule.tolerance * abs(b) if rule.rule == "relative" else rule.tolerance
    beyond = abs(delta) > allowed
    worse = beyond and (rule.worse == "both" or (rule.worse == "higher") == (delta > 0))
    verdict = "regression" if worse else ("improved" if beyond else "ok")
    note = f"{delta / b:+.2%}" if rule.rule == "relative" and b else f"{delta:+.4g}"
    return CheckRow(key, metric, rule.describe(), verdict, b, c, change, rule.describe(), note, fails=worse)


# --- timing ---


def speed_class(row: pd.Series) -> str:
    """'emulated' (never timed), 'noted' (looser threshold) or 'real'."""
    emulated = row.get("emulated")
    if emulated is True or (_present(emulated) and not isinstance(emulated, str) and emulated == 1):
        return "emulated"
    return "noted" if _present(row.get("speed_note")) and row.get("speed_note") else "real"


def _spread(row: pd.Series) -> float:
    p10, p90 = row.get("step_time_ms_p10"), row.get("step_time_ms_p90")
    if not (_present(p10) and _present(p90)) or p10 <= 0:
        return 1.0
    return float(p90) / float(p10)


def _timeable(timing: TimingRule, b: pd.Series, c: pd.Series) -> bool:
    return speed_class(b) == "real" and speed_class(c) == "real" and _present(b.get(timing.metric)) and _present(c.get(timing.metric))


def find_reference(timing: TimingRule, base: pd.DataFrame, cur: pd.DataFrame, ok: list[str]) -> tuple[str | None, str | None]:
    """(the reference cell's key, the cell the reference itself is timed against): the first
    and second timeable ok cells, or the cell the policy names and the first other one."""
    timeable = [k for k in ok if _timeable(timing, base.loc[k], cur.loc[k])]
    if timing.reference != "first":
        named = [k for k in base.index if k == timing.reference or str(base.loc[k, "cell_id"]) == timing.reference]
        if not named:
            raise PolicyError(f"policy.timing.reference: {timing.reference!r} names no cell of the baseline; "
                              "give a label or cell_id from it, or \"first\"")
        if named[0] not in ok:
            return None, None
        timeable = [named[0]] + [k for k in timeable if k != named[0]]
    return (timeable + [None, None])[0], (timeable + [None, None])[1]


def check_timing(result: CheckResult, base: pd.DataFrame, cur: pd.DataFrame, ok: list[str]) -> None:
    """Every cell against the reference; the reference against the next timeable cell, so a
    slowdown of the reference alone fails there (and shows as every other cell improving)."""
    timing = result.policy.timing
    metric = timing.metric
    ref, alt = find_reference(timing, base, cur, ok)
    if ref is None:
        result.rows.append(CheckRow("(all cells)", metric, "timing", "skipped", note="no reference cell ok in both runs; timings not compared"))
        return
    rb, rc = float(base.loc[ref, metric]), float(cur.loc[ref, metric])
    result.reference, result.machine_factor = ref, rc / rb
    for key in ok:
        other = ref if key != ref else alt
        if other is None:
            result.rows.append(CheckRow(ref, metric, "timing", "reference", rb, rc, rc / rb, note="the reference; no other timeable cell to time it against"))
            continue
        row = compare_timing(timing, key, base.loc[key], cur.loc[key], base.loc[other], cur.loc[other])
        if row is not None and key == ref:
            row.note = f"the reference (machine factor ×{rc / rb:.3f}), itself timed against {alt}: " + row.note
        if row is not None:
            result.rows.append(row)


def _sampled(timing: TimingRule, row: pd.Series) -> bool:
    samples = row.get(SAMPLES)
    return isinstance(samples, list) and len(samples) >= timing.min_processes


def compare_timing_samples(timing: TimingRule, key: str, b: pd.Series, c: pd.Series) -> CheckRow:
    """The samples rule: each side's per-process values of timing.samples_metric, a one-sided
    exact rank test and the Hodges–Lehmann ratio. A regression needs both: the ratio above
    samples_threshold (an effect worth failing CI for) and p(slower) ≤ alpha (not noise)."""
    metric = timing.samples_metric
    kinds = {speed_class(b), speed_class(c)}
    base_values, current_values = b[SAMPLES], c[SAMPLES]
    tb, tc = float(np.median(base_values)), float(np.median(current_values))
    if kinds != {"real"}:
        why = "emulated: its speed means nothing" if "emulated" in kinds else "numerics-only row (speed_note): not timed"
        return CheckRow(key, metric, "timing (rank test)", "skipped", tb, tc, note=why)
    cmp = compare_samples(base_values, current_values, confidence=1 - 2 * timing.alpha)
    limit = f"> ×{timing.samples_threshold:.3f} and p ≤ {timing.alpha:g}"
    if cmp.ratio > timing.samples_threshold and cmp.p_slower <= timing.alpha:
        verdict = "regression"
    elif cmp.ratio < 1 / timing.samples_threshold and cmp.p_faster <= timing.alpha:
        verdict = "improved"
    else:
        verdict = "ok"
    note = cmp.describe() + _contention_note(b, c)
    return CheckRow(key, metric, "timing (rank test)", verdict, tb, tc, cmp.ratio, limit, note, fails=verdict == "regression")


def _contention_note(b: pd.Series, c: pd.Series) -> str:
    counts = [int(r.get("contended_processes", 1 if flag(r.get("contended")) else 0) or 0) for r in (b, c)]
    if not any(counts):
        return ""
    return f"; CONTENDED: {counts[0]} baseline and {counts[1]} current process(es) did not get the CPU they asked for"


def contention_warnings(results: Results, role: str) -> list[str]:
    return [f"{role} {line}" for line in measurement_warnings(results.cells)]


def agreeing(a: float, b: float) -> float:
    """Two estimates of current ÷ baseline: the one closer to 1 when both point the same way, else 1."""
    if a > 1 and b > 1:
        return min(a, b)
    if a < 1 and b < 1:
        return max(a, b)
    return 1.0


def compare_timing(timing: TimingRule, key: str, b: pd.Series, c: pd.Series, rb: pd.Series, rc: pd.Series) -> CheckRow | None:
    """ratio = (c / rc) / (b / rb); fails above threshold × spread^weight, and (confirm_absolute)
    only if c / b is above it too (see default.toml)."""
    metric = timing.metric
    if not _present(b.get(metric)):
        return None
    if not _present(c.get(metric)):
        return CheckRow(key, metric, "timing", "missing", b.get(metric), None, note="absent from the current run", fails=True)
    kind = "emulated" if "emulated" in (speed_class(b), speed_class(c)) else \
        ("noted" if "noted" in (speed_class(b), speed_class(c)) else "real")
    tb, tc = float(b[metric]), float(c[metric])
    if kind == "emulated":
        return CheckRow(key, metric, "timing", "skipped", tb, tc, note="emulated: its speed means nothing")
    relative = (tc / float(rc[metric])) / (tb / float(rb[metric]))
    absolute = tc / tb
    spread = max(_spread(row) for row in (b, c, rb, rc))
    limit = timing.limit(spread, kind == "noted")
    ratio = agreeing(relative, absolute) if timing.confirm_absolute else relative
    verdict = "regression" if ratio > limit else ("improved" if ratio < 1 / limit else "ok")
    note = f"×{relative:.3f} vs the reference, ×{absolute:.3f} absolute; spread {spread:.2f}"
    note += " (numerics-only row: looser threshold)" if kind == "noted" else ""
    fallback = [str(r.get("step_time_source")) for r in (b, c) if str(r.get("step_time_source", "")).startswith("p10")]
    note += f"; {fallback[0]}" if fallback else ""
    return CheckRow(key, metric, "timing", verdict, tb, tc, ratio, f"≤ ×{limit:.3f}", note, fails=verdict == "regression")


# --- the committed baseline: host-independent quantities only ---

# Columns that depend on the machine (or on its load) and never belong in a baseline shared
# between machines: timings, rates, memory peaks, energy, contention, threads, wall times.
HOST_DEPENDENT_SERIES = ("step_time_ms", "prefill_time_ms")


def host_dependent() -> tuple[str, ...]:
    """Every host-dependent column, the variants' own included: registering the variants declares
    their columns (moe_dispatch is host-dependent), so this loads them (and torch) when first asked."""
    from dsbench.variants import registry  # noqa: F401

    return host_dependent_columns()


def __getattr__(name: str):
    if name == "HOST_DEPENDENT":  # on use: `check` itself imports without torch (tests/test_schema.py)
        return host_dependent()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_baseline(results: str | Path, out: str | Path) -> Path:
    """A copy of a results folder with only what another machine can reproduce: the exact
    quantities (params, FLOPs, KV bytes, tokens per step) and the seeded losses and balance.
    `dsbench check` against it compares those; timings are compared by `dsbench ab`.
    A run with a failed or missing cell is refused: a baseline holds every cell, measured."""
    from dsbench.folders import check_new_folder, new_folder

    src = Path(results)
    run = load_checked(src, "RESULTS")
    check_new_folder(Path(out), "--out")
    _check_complete(run, src)
    # An unregistered column could be host-dependent too: only what the registry vouches for travels.
    dropped = host_dependent()
    keep = [c for c in run.cells.columns if metric_of(c) and c not in dropped]
    unknown = [c for c in run.cells.columns if not metric_of(c)]
    series = run.series[~run.series["metric"].isin(HOST_DEPENDENT_SERIES)] if not run.series.empty else run.series
    info = dict(run.run)
    info.pop("probe", None)
    info["baseline_of"] = {"run_id": info.get("run_id"), "dropped": "host-dependent columns (dsbench.metrics)",
                           "dropped_unregistered": unknown}
    with new_folder(out, "--out") as folder:
        try:
            run.cells[keep].to_parquet(folder.path / "cells.parquet", index=False)
            series.to_parquet(folder.path / "series.parquet", index=False)
            (folder.path / "run.json").write_text(json.dumps(info, indent=1, default=str))
        except OSError as e:  # a full disk: nothing half-written stays
            raise ResultsError(f"--out: cannot write the baseline in {str(out)!r} ({e.strerror or type(e).__name__})") from None
        folder.keep()
    return Path(out)


def _check_complete(run: Results, src: Path) -> None:
    """Every cell of the run recorded, and ok: one line naming the first that is not."""
    bad = run.cells[run.cells["status"] != "ok"]
    if len(bad):
        row = bad.iloc[0]
        raise ResultsError(f"RESULTS: {str(src)!r} has {len(bad)} cell(s) not ok, first {row['cell_id']} ({row['label']}): "
                           f"{row['status']}; a baseline needs every cell measured: rerun it (--resume --rerun-failed) first")
    expected = run.run.get("n_cells")
    if isinstance(expected, int) and len(run.cells) < expected:
        missing = _missing_cells(run)
        named = f", first {missing}" if missing else ""
        raise ResultsError(f"RESULTS: {str(src)!r} holds {len(run.cells)} of its {expected} cells{named}; the sweep did not "
                           "finish: --resume it first, so the baseline holds every cell")


def _missing_cells(run: Results) -> str | None:
    """'<id> (<label>)' of the first cell the run's spec has and its folder lacks, where the spec still expands."""
    try:
        from dsbench import spec as spec_lib

        spec = spec_lib.SweepSpec.from_dict(run.run["spec"])
        cells = spec_lib.expand(spec, (run.run.get("probe") or {}).get("device") or "cpu")
    except Exception:  # noqa: BLE001 — an old or plug-in spec: the count alone is named
        return None
    recorded = set(run.cells["cell_id"])
    return next((f"{c.cell_id} ({c.label()})" for c in cells if c.cell_id not in recorded), None)


# --- Markdown ---


def md_escape(text) -> str:
    """Table-cell text for GitHub Markdown: no pipes, no HTML, no line breaks."""
    s = "" if text is None else str(text)
    for old, new in (("\\", "\\\\"), ("|", "\\|"), ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("\r", " "), ("\n", " "), ("`", "\\`")):
        s = s.replace(old, new)
    return s


COMPARED = ("ok", "regression", "improved", "reference")  # verdicts of a value compared between the runs


def fmt_value(value) -> str:
    if not _present(value):
        return "–"
    if isinstance(value, str):
        return value
    value = float(value)
    if value.is_integer() and abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.6g}" if value.is_integer() else f"{value:.4g}"


def md_table(rows: list[CheckRow]) -> list[str]:
    lines = ["| cell | metric | rule | verdict | baseline | current | change | limit | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        change = f"×{r.change:.3f}" if _present(r.change) and math.isfinite(r.change) else "–"
        cells = [r.cell, r.metric, r.rule, r.verdict.upper() if r.fails else r.verdict, fmt_value(r.baseline), fmt_value(r.current), change, r.limit, r.note]
        lines.append("| " + " | ".join(md_escape(x) for x in cells) + " |")
    return lines


def render_markdown(result: CheckResult) -> str:
    failures = result.failures
    counts = result.counts()
    head = "FAIL" if failures else ("PASS" if result.compared else "NOTHING COMPARED")
    lines = [f"## dsbench check: {head}", ""]
    lines.append(f"baseline `{md_escape(result.baseline)}` · current `{md_escape(result.current)}` · policy `{md_escape(result.policy.source)}`")
    lines.append("")
    summary = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    lines.append(f"{len(result.rows)} checks: {summary}. {len(failures)} fail.")
    if result.warnings:
        lines += ["", f"**{len(result.warnings)} measurement(s) contended or noisy** (compare them with care):", ""]
        lines += [f"- {md_escape(w)}" for w in result.warnings]
    if result.reference:
        lines.append(f"Timing reference: `{md_escape(result.reference)}`; the current run's reference time is ×{result.machine_factor:.3f} "
                     "the baseline's (a machine-wide factor, divided out of every other cell).")
    lines.append("")
    if failures:
        lines += ["### Failures", "", *md_table(failures), ""]
    notable = [r for r in result.rows if not r.fails and r.verdict not in ("ok",)]
    if notable:
        lines += ["### Notes", "", *md_table(notable), ""]
    lines += ["<details><summary>All checks</summary>", "", *md_table(result.rows), "", "</details>", ""]
    return "\n".join(lines)

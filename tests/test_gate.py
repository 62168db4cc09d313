"""The CI gate that holds on any machine: the rank test and its estimate (dsbench/stats.py), the
samples rule of `dsbench check`, host-independent baselines, and `dsbench ab` end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixture_results import ci_cells, write_results
from typer.testing import CliRunner

from dsbench.ab import AbError, combine, resolve_ref, run_ab, spec_file
from dsbench.check import HOST_DEPENDENT, check, load_policy, write_baseline
from dsbench.cli import app
from dsbench.stats import compare_samples, mann_whitney_u, u_null_counts, u_tail

# --- the statistics ---


@pytest.mark.parametrize("m, n", [(1, 1), (2, 3), (3, 4), (4, 4), (5, 5), (3, 7)])
def test_u_null_distribution_matches_enumeration(m, n):
    counts = [0] * (m * n + 1)
    for first in itertools.combinations(range(m + n), m):
        second = [i for i in range(m + n) if i not in first]
        counts[int(mann_whitney_u(np.array(first), np.array(second)))] += 1
    assert tuple(counts) == u_null_counts(m, n)
    assert sum(counts) == math.comb(m + n, m)


def test_complete_separation_gives_the_smallest_p():
    base = [10.0, 10.2, 9.9, 10.1, 10.05]
    cmp = compare_samples(base, [1.1 * x for x in base])
    assert cmp.ratio == pytest.approx(1.1)  # every value scaled: the median pairwise ratio is the factor
    assert cmp.p_slower == pytest.approx(1 / math.comb(10, 5))
    assert cmp.p_faster == pytest.approx(1.0)
    assert cmp.low <= 1.1 <= cmp.high and cmp.low > 1.0


def test_identical_samples_are_not_significant():
    base = [10.0, 10.2, 9.9, 10.1, 10.05]
    cmp = compare_samples(base, list(base))
    assert cmp.ratio == pytest.approx(1.0)
    assert cmp.p_slower > 0.4 and cmp.p_faster > 0.4
    assert cmp.low < 1.0 < cmp.high


def test_interval_coverage_on_simulated_noise():
    """The interval's stated coverage holds on log-normal noise with a known ratio."""
    rng = np.random.default_rng(1)
    hits, trials = 0, 400
    for _ in range(trials):
        a = np.exp(rng.normal(0, 0.05, 5))
        b = 1.08 * np.exp(rng.normal(0, 0.05, 5))
        cmp = compare_samples(a.tolist(), b.tolist(), confidence=0.90)
        hits += cmp.low <= 1.08 <= cmp.high
    assert cmp.confidence >= 0.90
    assert hits / trials >= 0.86  # 0.90 stated; 400 trials put the rate within about ±0.03


def test_large_samples_use_the_normal_approximation():
    assert u_tail(30, 30, 450) == pytest.approx(0.5, abs=0.01)
    assert u_tail(30, 30, 900) < 1e-10


def test_compare_samples_refuses_empty_or_non_positive():
    with pytest.raises(ValueError):
        compare_samples([], [1.0])
    with pytest.raises(ValueError):
        compare_samples([1.0, 0.0], [1.0])


# --- the samples rule of dsbench check ---


def processes(factor: float = 1.0, jitter=(1.0, 1.01, 0.99, 1.005, 0.995), label_prefix: str = "", **extra) -> list[dict]:
    """ci_cells run in len(jitter) processes (replicates), cells matching label_prefix × factor."""
    cells = []
    for c in ci_cells():
        for r, j in enumerate(jitter):
            scale = j * (factor if c["label"].startswith(label_prefix) else 1.0)
            row = {**c, **extra, "replicate": r, "label": c["label"] + (f" #{r}" if r else ""), "cell_id": f"{c['cell_id']}{r}"}
            for key in ("step_time_ms_median", "step_time_ms_p10", "step_time_ms_p90", "step_time_ms_mean"):
                row[key] = c[key] * scale
            cells.append(row)
    return cells


def timing_rows(result) -> dict:
    return {r.cell: r for r in result.rows if r.rule == "timing (rank test)"}


def test_samples_rule_catches_a_ten_percent_slowdown(tmp_path):
    base = write_results(tmp_path / "a", processes())
    cur = write_results(tmp_path / "b", processes(1.10, label_prefix="decode/dense/mha/fp32"))
    result = check(base, cur)
    rows = timing_rows(result)
    slow = rows["decode/dense/mha/fp32 b4×ctx128+32"]
    assert slow.fails and slow.verdict == "regression"
    assert slow.change == pytest.approx(1.10, rel=0.01)
    assert "p(slower) = 0.00397" in slow.note and "5 vs 5 processes" in slow.note  # 1 / C(10, 5): how sure
    assert slow.limit == "> ×1.050 and p ≤ 0.05"
    assert [r.cell for r in result.failures] == ["decode/dense/mha/fp32 b4×ctx128+32"]
    assert "×1.100" in result.markdown()


def test_samples_rule_passes_same_code_and_small_changes(tmp_path):
    base = write_results(tmp_path / "a", processes())
    same = write_results(tmp_path / "b", processes(jitter=(1.004, 0.996, 1.0, 1.012, 0.99)))
    assert check(base, same).exit_code == 0
    # significant but below the effect threshold (3%): not a regression
    small = write_results(tmp_path / "c", processes(1.03, label_prefix="train/dense/mha/fp32"))
    row = timing_rows(check(base, small))["train/dense/mha/fp32 b8×t128"]
    assert row.verdict == "ok" and row.change == pytest.approx(1.03, rel=0.01)


def test_samples_rule_needs_significance_not_just_a_large_ratio(tmp_path):
    """One process in five far slower moves the median ratio little and the rank test not at all."""
    base = write_results(tmp_path / "a", processes())
    noisy = write_results(tmp_path / "b", processes(jitter=(3.0, 1.01, 0.99, 1.005, 0.995)))
    assert check(base, noisy).exit_code == 0
    # a big but overlapping change: ratio above threshold, p too large to call it
    spread = (0.8, 1.25, 0.9, 1.3, 1.0)
    overlapping = write_results(tmp_path / "c", processes(1.08, jitter=spread, label_prefix="prefill/dense/mha/fp32"))
    row = timing_rows(check(write_results(tmp_path / "d", processes(jitter=spread)), overlapping))["prefill/dense/mha/fp32 b8×t128"]
    assert row.change > 1.05 and not row.fails


def test_samples_rule_skips_numerics_only_and_emulated_rows(tmp_path):
    base = write_results(tmp_path / "a", processes())
    cur = write_results(tmp_path / "b", processes(2.0, label_prefix="train/dense/mha/bf16"))  # bf16 on CPU: speed_note
    row = timing_rows(check(base, cur))["train/dense/mha/bf16 b8×t128"]
    assert row.verdict == "skipped" and "numerics-only" in row.note
    assert check(base, cur).exit_code == 0


def test_single_process_runs_keep_the_reference_rule(tmp_path):
    base, cur = write_results(tmp_path / "a", ci_cells()), write_results(tmp_path / "b", ci_cells())
    result = check(base, cur)
    assert not timing_rows(result)
    assert result.reference == "train/dense/mha/fp32 b8×t128"


def test_contended_processes_are_named_not_silently_compared(tmp_path):
    base = write_results(tmp_path / "a", processes())
    cells = processes()
    cells[0].update(contended=True, contention="got 41% of the CPU its 1 thread(s) asked for (limit 90%)")
    cur = write_results(tmp_path / "b", cells)
    result = check(base, cur)
    assert any("train/dense/mha/fp32 b8×t128: contended (got 41%" in w for w in result.warnings)
    row = timing_rows(result)["train/dense/mha/fp32 b8×t128"]
    assert "CONTENDED: 0 baseline and 1 current process(es)" in row.note
    assert "contended or noisy" in result.markdown()
    assert result.to_json()["warnings"] == result.warnings


def test_policy_rejects_bad_samples_settings(tmp_path):
    from dsbench.check import PolicyError

    for text, key in (("alpha = 0.7", "policy.timing.alpha"), ("min_processes = 1", "policy.timing.min_processes"),
                      ("samples_threshold = 0.9", "policy.timing.samples_threshold")):
        path = tmp_path / "p.toml"
        path.write_text(f"[timing]\n{text}\n")
        with pytest.raises(PolicyError, match=key):
            load_policy(path)


# --- the host-independent baseline ---


def test_baseline_keeps_only_host_independent_columns(tmp_path):
    src = write_results(tmp_path / "run", ci_cells())
    out = write_baseline(src, tmp_path / "baseline")
    cells, series = pd.read_parquet(out / "cells.parquet"), pd.read_parquet(out / "series.parquet")
    assert not [c for c in cells.columns if c.startswith(HOST_DEPENDENT)]
    assert {"params_total", "flops_per_token", "kv_cache_bytes_per_token", "tokens_per_step", "final_loss"} <= set(cells.columns)
    assert "step_time_ms" not in set(series["metric"]) and "loss" in set(series["metric"])
    assert json.loads((out / "run.json").read_text())["baseline_of"]["run_id"] == "run"


def test_check_against_a_baseline_compares_exact_and_losses_not_timings(tmp_path):
    baseline = write_baseline(write_results(tmp_path / "run", ci_cells()), tmp_path / "baseline")
    slower = [{**c, "step_time_ms_median": 10 * c["step_time_ms_median"]} for c in ci_cells()]  # another, slower host
    result = check(baseline, write_results(tmp_path / "slow", slower))
    assert result.exit_code == 0
    assert any(r.verdict == "skipped" and "dsbench ab" in r.note for r in result.rows)
    changed = [{**c, "final_loss": c["final_loss"] * 1.01} if c["label"].startswith("train/dense/mha/bf16") else c for c in ci_cells()]
    result = check(baseline, write_results(tmp_path / "loss", changed))
    assert [(r.cell, r.metric) for r in result.failures] == [("train/dense/mha/bf16 b8×t128", "final_loss")]
    flops = [{**c, "flops_per_token": c["flops_per_token"] + 1} for c in ci_cells()]
    assert check(baseline, write_results(tmp_path / "flops", flops)).exit_code == 1


def test_baseline_cli_and_bad_input(tmp_path):
    src = write_results(tmp_path / "run", ci_cells())
    runner = CliRunner()
    done = runner.invoke(app, ["baseline", str(src), "--out", str(tmp_path / "b")])
    assert done.exit_code == 0 and (tmp_path / "b" / "cells.parquet").exists()
    again = runner.invoke(app, ["baseline", str(src), "--out", str(tmp_path / "b")])
    assert again.exit_code == 2 and "not empty" in again.output and "Traceback" not in again.output


# --- dsbench ab ---


def test_combine_makes_rounds_into_processes(tmp_path):
    from dsbench.ab import Side

    rounds = [write_results(tmp_path / f"r{i}", ci_cells()) for i in range(3)]
    out = combine(rounds, tmp_path / "all", Side("base", "abc", None))
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells) == 3 * len(ci_cells()) and cells["cell_id"].is_unique
    assert sorted(cells["replicate"].unique()) == [0, 1, 2]
    assert (cells["label"].str.endswith(" #2")).sum() == len(ci_cells())
    series = pd.read_parquet(out / "series.parquet")
    assert set(series["cell_id"]) == set(cells["cell_id"])


def test_ab_usage_errors(tmp_path):
    from dsbench.ab import repo_root

    root = repo_root()
    with pytest.raises(AbError, match="--base: 'no-such-ref'"):
        resolve_ref("no-such-ref", root)
    with pytest.raises(AbError, match="--preset: 'nope'"):
        spec_file(None, "nope", tmp_path)
    with pytest.raises(AbError, match="exactly one spec"):
        spec_file(None, None, tmp_path)
    with pytest.raises(AbError, match="--rounds: 2 is too few"):
        run_ab("HEAD", preset="ci-timing", rounds=2, out=tmp_path / "x")
    done = CliRunner().invoke(app, ["ab", "--preset", "ci-timing", "--base", "no-such-ref", "--out", str(tmp_path / "y")])
    assert done.exit_code == 2 and "names no commit" in done.output and "Traceback" not in done.output


TINY_AB_SPEC = """
name = "tiny-ab"
device = "cpu"
[model]
size = "debug"
n_layers = 1
[axes]
workload = ["decode"]
precision = ["fp32"]
[decode]
batch_size = 2
context_lens = [16]
new_tokens = 4
[measure]
warmup = 1
repeats = 4
calibrate = false
"""


@pytest.mark.slow
def test_ab_end_to_end_against_head(tmp_path):
    """The checkout against its own HEAD, 3 interleaved rounds: every timed cell gets a rank-test
    row over 3 processes a side, and the work folder records both sides and the order."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_AB_SPEC)
    outcome = run_ab("HEAD", spec=spec, rounds=3, out=tmp_path / "ab", confirm=False, say=lambda line: None)
    rows = timing_rows(outcome.result)
    assert set(rows) == {"decode/dense/mha/fp32 b2×ctx16+4"}
    assert all("3 vs 3 processes" in r.note for r in rows.values())
    info = json.loads((tmp_path / "ab" / "ab.json").read_text())
    assert info["base"] == outcome.base.sha and len(info["log"]) == 6
    assert [e["side"] for e in info["log"]] == ["base", "current", "current", "base", "base", "current"]  # A B, B A, A B
    assert (tmp_path / "ab" / "base-site" / "dsbench" / "__init__.py").exists()
    base_cells = pd.read_parquet(tmp_path / "ab" / "base-all" / "cells.parquet")
    assert "cpu_share" in base_cells  # the base (HEAD) records contention too
    assert set(base_cells["torch_num_threads"]) == {1} and set(base_cells["threads_source"]) == {"OMP_NUM_THREADS"}
    assert "## dsbench ab:" in outcome.markdown() and outcome.base.sha[:12] in outcome.markdown()

"""`dsbench check`: each policy rule passes and fails where it should; missing cells; exit codes;
the shipped policy; bad inputs give one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixture_results import ci_cells, make_cell, write_results
from typer.testing import CliRunner

from dsbench.check import PolicyError, check, load_policy
from dsbench.cli import app

TIMES = ("step_time_ms_median", "step_time_ms_p10", "step_time_ms_p90", "step_time_ms_mean")


def scaled(cells: list[dict], label_prefix: str, factor: float, keys=TIMES) -> list[dict]:
    """Copy of cells with `keys` multiplied by factor in every cell whose label starts with the prefix."""
    out = []
    for c in cells:
        c = dict(c)
        if c["label"].startswith(label_prefix):
            for k in keys:
                if c.get(k) is not None:
                    c[k] *= factor
        out.append(c)
    return out


@pytest.fixture
def folders(tmp_path):
    def make(current: list[dict], baseline: list[dict] | None = None) -> tuple[Path, Path]:
        base = write_results(tmp_path / "base", baseline or ci_cells())  # step-time series from each row's median
        cur = write_results(tmp_path / "cur", current)
        return base, cur

    return make


def verdicts(result, metric: str) -> dict[str, str]:
    return {r.cell: r.verdict for r in result.rows if r.metric == metric}


def test_identical_runs_pass(folders):
    result = check(*folders(ci_cells()))
    assert result.exit_code == 0 and not result.failures
    assert result.reference == "train/dense/mha/fp32 b8×t128" and result.machine_factor == 1.0


# --- exact ---


def test_exact_rule(folders):
    cells = ci_cells()
    cells[2] = {**cells[2], "params_total": cells[2]["params_total"] + 1}
    cells[4] = {**cells[4], "flops_per_token": cells[4]["flops_per_token"] * (1 + 1e-12)}  # round-off passes
    result = check(*folders(cells))
    assert result.exit_code == 1
    assert [(r.cell, r.metric) for r in result.failures] == [("prefill/dense/mha/fp32 b8×t128", "params_total")]


# --- relative / absolute, with direction ---


@pytest.mark.parametrize("factor, fails", [(1.0025, False), (0.9975, False), (1.01, True), (0.99, True)])  # tolerance 0.5%
def test_loss_relative_tolerance_both_directions(folders, factor, fails):
    cells = scaled(ci_cells(), "train/dense/mha/fp32", factor, keys=("final_loss",))
    result = check(*folders(cells))
    assert (result.exit_code == 1) is fails
    assert verdicts(result, "final_loss")["train/dense/mha/fp32 b8×t128"] == ("regression" if fails else "ok")


def test_memory_only_growth_fails(folders):
    grown = check(*folders(scaled(ci_cells(), "decode/dense/mha/fp32", 1.3, keys=("peak_mem_bytes",))))
    assert verdicts(grown, "peak_mem_bytes")["decode/dense/mha/fp32 b4×ctx128+32"] == "regression"
    shrunk = check(*folders(scaled(ci_cells(), "decode/dense/mha/fp32", 0.7, keys=("peak_mem_bytes",))))
    assert shrunk.exit_code == 0 and verdicts(shrunk, "peak_mem_bytes")["decode/dense/mha/fp32 b4×ctx128+32"] == "improved"


def test_absolute_rule(folders):
    base = [make_cell("train", "deepseekmoe", balance="bias", maxvio_global=0.05)]
    ok = check(*folders([make_cell("train", "deepseekmoe", balance="bias", maxvio_global=0.09)], base))
    worse = check(*folders([make_cell("train", "deepseekmoe", balance="bias", maxvio_global=0.11)], base))
    assert ok.exit_code == 0 and worse.exit_code == 1
    assert [r.metric for r in worse.failures] == ["maxvio_global"]


def test_metric_absent_now_fails_and_new_metric_is_ignored(folders):
    cells = ci_cells()
    del cells[0]["eval_loss"]
    cells[1]["brand_new_metric"] = 1.0
    result = check(*folders(cells))
    assert [(r.metric, r.verdict) for r in result.failures] == [("eval_loss", "missing")]


# --- timing ---


def test_uniformly_slower_machine_passes(folders):
    result = check(*folders(scaled(ci_cells(), "", 1.6)))
    assert result.exit_code == 0
    assert result.machine_factor == pytest.approx(1.6)


def test_one_cell_25_percent_slower_fails(folders):
    result = check(*folders(scaled(ci_cells(), "decode/dense/mha/fp32", 1.25)))
    assert [(r.cell, r.metric) for r in result.failures] == [("decode/dense/mha/fp32 b4×ctx128+32", "step_time_ms_min")]
    assert result.failures[0].change == pytest.approx(1.25)


def test_slower_machine_and_one_slower_cell(folders):
    cells = scaled(scaled(ci_cells(), "", 1.4), "prefill/dense/mha/fp32", 1.25)
    result = check(*folders(cells))
    assert [r.cell for r in result.failures] == ["prefill/dense/mha/fp32 b8×t128"]


def test_contended_reference_in_the_baseline(folders, tmp_path):
    """Contention that slowed only the baseline's reference cell: every other cell looks 1.6×
    slower relative to it, but not in absolute time, so nothing fails (unless confirm_absolute is off)."""
    base = scaled(ci_cells(), "train/dense/mha/fp32", 1.6)
    result = check(*folders(ci_cells(), base))
    assert result.exit_code == 0 and result.machine_factor == pytest.approx(1 / 1.6)
    policy_file = tmp_path / "p.toml"
    policy_file.write_text("[timing]\nconfirm_absolute = false\n")
    assert check(*folders(ci_cells(), base), load_policy(policy_file)).exit_code == 1


def test_reference_slowed_alone_fails_at_the_reference(folders):
    result = check(*folders(scaled(ci_cells(), "train/dense/mha/fp32", 1.25)))
    assert [(r.cell, r.change) for r in result.failures] == [("train/dense/mha/fp32 b8×t128", pytest.approx(1.25))]
    assert "timed against prefill/dense/mha/fp32" in result.failures[0].note


def test_timed_by_the_fastest_step_of_the_series(tmp_path):
    """Contention that doubles most steps leaves the fastest one: no regression. Without
    step-time series the check falls back to p10 and says so."""
    cells = ci_cells()
    base = write_results(tmp_path / "base", cells)
    contended = [(c, [dict(step=s, metric="step_time_ms", value=c["step_time_ms_median"] * (1 if s == 7 else 2)) for s in range(20)])
                 for c in cells]
    cur = write_results(tmp_path / "cur", scaled(cells, "decode/dense/mha/fp32", 2.0), series=contended)
    assert check(base, cur).exit_code == 0
    bare = write_results(tmp_path / "bare", scaled(cells, "decode/dense/mha/fp32", 2.0), series=[])
    result = check(base, bare)
    assert [r.cell for r in result.failures] == ["decode/dense/mha/fp32 b4×ctx128+32"]
    assert "p10 (no step-time series)" in result.failures[0].note


def test_faster_cell_is_improved_not_failed(folders):
    result = check(*folders(scaled(ci_cells(), "prefill/dense/mha/fp32", 0.7)))
    assert result.exit_code == 0
    assert verdicts(result, "step_time_ms_min")["prefill/dense/mha/fp32 b8×t128"] == "improved"


def test_spread_widens_the_limit(folders):
    """A 20% slower cell fails when its samples are tight, passes when they spread 3× (noisy run)."""
    tight = check(*folders(scaled(ci_cells(), "decode/dense/mha/fp32", 1.2)))
    assert tight.exit_code == 1
    noisy = scaled(ci_cells(), "decode/dense/mha/fp32", 1.2)
    for c in noisy:
        if c["label"].startswith("decode/dense/mha/fp32"):
            c["step_time_ms_p90"] = 3 * c["step_time_ms_p10"]
    result = check(*folders(noisy))
    row = next(r for r in result.rows if r.cell.startswith("decode/dense/mha/fp32") and r.metric == "step_time_ms_min")
    assert result.exit_code == 0 and row.verdict == "ok" and "spread 3.00" in row.note


def test_numerics_only_rows_get_the_looser_threshold(folders):
    passes = check(*folders(scaled(ci_cells(), "decode/dense/mha/bf16", 1.3)))
    fails = check(*folders(scaled(ci_cells(), "decode/dense/mha/bf16", 1.8)))
    assert passes.exit_code == 0 and fails.exit_code == 1


def test_emulated_rows_are_never_timed(folders):
    base = [make_cell("train"), make_cell("train", precision="fp8")]
    cur = [make_cell("train"), make_cell("train", precision="fp8", step_time_ms_p10=1e6, step_time_ms_p90=1.1e6)]
    result = check(*folders(cur, base))
    assert result.exit_code == 0
    assert verdicts(result, "step_time_ms_min")["train/dense/mha/fp8 b8×t128"] == "skipped"


def test_named_reference_and_unknown_reference(folders, tmp_path):
    policy_file = tmp_path / "p.toml"
    policy_file.write_text('[timing]\nreference = "prefill/dense/mha/fp32 b8×t128"\n')
    result = check(*folders(scaled(ci_cells(), "train/dense/mha/fp32", 1.25)), load_policy(policy_file))
    assert result.reference == "prefill/dense/mha/fp32 b8×t128"
    assert [r.cell for r in result.failures] == ["train/dense/mha/fp32 b8×t128"]  # the default reference, now checked
    policy_file.write_text('[timing]\nreference = "nope"\n')
    with pytest.raises(PolicyError, match="names no cell"):
        check(*folders(ci_cells()), load_policy(policy_file))


def test_replicates_collapse_to_the_fastest_process(folders):
    def replicated(slow_first: float) -> list[dict]:
        cells = []
        for c in ci_cells():
            for r in range(3):
                copy = {**c, "replicate": r, "label": c["label"] + (f" #{r}" if r else ""), "cell_id": f"{c['cell_id']}{r}"}
                if r == 0:
                    copy = scaled([copy], "", slow_first)[0]
                cells.append(copy)
        return cells

    # one replicate of every cell hit by contention: the best of three is clean
    result = check(*folders(scaled(replicated(3.0), "decode/dense/mha/fp32", 1.0), replicated(1.0)))
    assert result.exit_code == 0
    assert {r.cell for r in result.rows} == {c["label"] for c in ci_cells()}
    slowed = scaled(replicated(1.0), "decode/dense/mha/fp32", 1.25)
    assert check(*folders(slowed, replicated(1.0))).exit_code == 1


def test_thread_count_mismatch_fails_and_skips_timing(tmp_path):
    base = write_results(tmp_path / "base", ci_cells(), series=[])
    cur = write_results(tmp_path / "cur", scaled(ci_cells(), "decode/dense/mha/fp32", 2.0), series=[])
    for path, threads, cpu in ((base, 2, "test CPU"), (cur, 1, "another CPU")):
        info = json.loads((path / "run.json").read_text())
        info["environment"].update(torch_num_threads=threads, cpu_model=cpu)
        (path / "run.json").write_text(json.dumps(info))
    result = check(base, cur)
    assert [(r.metric, r.baseline, r.current) for r in result.failures] == [("torch_num_threads", 2, 1)]
    assert not any(r.rule == "timing" for r in result.rows)
    assert any(r.metric == "cpu_model" and r.verdict == "changed" and not r.fails for r in result.rows)


# --- cells on one side only; failed cells ---


def test_missing_and_new_cells(folders):
    cells = ci_cells()
    extra = make_cell("decode", precision="fp32", batch_size=4, context_len=512, new_tokens=32)
    result = check(*folders([*cells[:-1], extra]))
    rows = {(r.cell, r.verdict) for r in result.rows if r.metric == "cell"}
    assert rows == {("decode/dense/mha/bf16 b4×ctx128+32", "missing"), ("decode/dense/mha/fp32 b4×ctx512+32", "new")}
    assert result.exit_code == 1 and [r.verdict for r in result.failures] == ["missing"]


def test_missing_cells_can_warn(folders, tmp_path):
    policy_file = tmp_path / "p.toml"
    policy_file.write_text('[cells]\nmissing = "warn"\n')
    result = check(*folders(ci_cells()[:-1]), load_policy(policy_file))
    assert result.exit_code == 0 and any(r.verdict == "missing" for r in result.rows)


def test_cell_failed_now_is_a_regression(folders):
    cells = ci_cells()
    cells[3] = make_cell("prefill", precision="bf16", status="oom", error="OutOfMemoryError: boom")
    result = check(*folders(cells))
    assert [(r.verdict, r.current, r.note) for r in result.failures] == [("failed", "oom", "OutOfMemoryError: boom")]


def test_failed_reference_skips_timing(folders):
    cells = ci_cells()
    cells[0] = make_cell("train", status="error")
    result = check(*folders(cells))
    assert result.reference == "prefill/dense/mha/fp32 b8×t128"  # the first timeable cell ok in both


# --- policy files ---


def test_default_policy_ships_with_every_rule():
    policy = load_policy()
    assert {r.rule for r in policy.metrics.values()} == {"exact", "relative", "absolute"}
    assert policy.timing.threshold > 1 and policy.timing.noted_threshold >= policy.timing.threshold
    assert policy.metrics["params_total"].rule == "exact" and policy.metrics["final_loss"].rule == "relative"


def test_policy_overrides_and_ignore(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[metrics]\nfinal_loss = { rule = "relative", tolerance = 0.5 }\npeak_mem_bytes = { rule = "ignore" }\n'
                 '[timing]\nenabled = false\n')
    policy = load_policy(p)
    assert policy.metrics["final_loss"].tolerance == 0.5 and "peak_mem_bytes" not in policy.metrics
    assert "params_total" in policy.metrics and not policy.timing.enabled


@pytest.mark.parametrize("text, needle", [
    ("[metrics]\nx = { rule = \"fuzzy\" }\n", "metrics.x.rule"),
    ("[metrics]\nx = { rule = \"relative\" }\n", "metrics.x.tolerance"),
    ("[metrics]\nx = { rule = \"relative\", tolerance = -1 }\n", "metrics.x.tolerance"),
    ("[timing]\nthreshold = 0.9\n", "timing.threshold"),
    ("[timing]\nbogus = 1\n", "timing.bogus"),
    ("version = 2\n", "policy.version"),
    ("[nope]\n", "policy.nope"),
    ("not toml = = 1", "not valid TOML"),
    # typos a gate must not pass on: unknown columns, timing columns that do not exist
    ("[metrics]\nfinal_los = { rule = \"exact\" }\n", "metrics.final_los: 'final_los' is not a result column"),
    ("[metrics]\n\"ffn.n_expert\" = { rule = \"exact\" }\n", "metrics.ffn.n_expert"),
    ("[timing]\nmetric = \"no_such_metric\"\n", "timing.metric: 'no_such_metric' is not a timing column"),
    ("[timing]\nmetric = \"final_loss\"\n", "timing.metric: 'final_loss' is not a timing column"),
    ("[timing]\nsamples_metric = \"step_time\"\n", "timing.samples_metric: 'step_time' is not a timing column"),
    ("[timing]\nmin_processes = 3.5\n", "timing.min_processes: expected a whole number"),
    ("[timing]\nenabled = \"yes\"\n", "timing.enabled: expected true or false"),
    ("[timing]\nalpha = 0.7\n", "timing.alpha"),
    ("[cells]\nmatch = \"name\"\n", "cells.match"),
    ("[cells]\nmissing = \"ignore\"\n", "cells.missing"),
    ("[cells]\nmatchh = \"label\"\n", "cells.matchh"),
    ("[metrics]\nfinal_loss = { rule = \"relative\", tolerance = 0.1, worse = \"up\" }\n", "metrics.final_loss.worse"),
    ("[metrics]\nfinal_loss = { rule = \"relative\", tolerance = 0.1, tol = 1 }\n", "metrics.final_loss.tol"),
    ("metrics = 3\n", "policy.metrics: expected a table"),
])
def test_bad_policy_is_one_line(tmp_path, text, needle):
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_gate_that_compared_nothing_does_not_pass(tmp_path):
    """Two runs with no cell in common (every row is a 'new' or 'missing' cell, with
    cells.missing = warn): nothing was compared, so no PASS and exit 1."""
    from dsbench.check import check, render_markdown

    base = write_results(tmp_path / "base", [make_cell("train")], series=[])
    cur = write_results(tmp_path / "cur", [make_cell("prefill")], series=[])
    p = tmp_path / "p.toml"
    p.write_text('[cells]\nmissing = "warn"\n')
    result = check(base, cur, load_policy(p))
    assert not result.failures and result.compared == 0 and result.exit_code == 1
    assert render_markdown(result).startswith("## dsbench check: NOTHING COMPARED")
    same = check(base, base, load_policy(p))
    assert same.compared > 0 and same.exit_code == 0


# --- the command ---


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_exit_codes_markdown_and_json(folders):
    base, cur = folders(scaled(ci_cells(), "decode/dense/mha/fp32", 1.25))
    fail = run_cli("check", "--baseline", str(base), "--current", str(cur))
    assert fail.exit_code == 1 and "## dsbench check: FAIL" in fail.stdout and "| REGRESSION |" in fail.stdout
    clean = run_cli("check", "--baseline", str(base), "--current", str(base))
    assert clean.exit_code == 0 and "## dsbench check: PASS" in clean.stdout
    as_json = run_cli("check", "--baseline", str(base), "--current", str(cur), "--json")
    payload = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and payload["exit_code"] == 1 and payload["verdict"] == "regression"
    assert any(r["fails"] and r["metric"] == "step_time_ms_min" for r in payload["rows"])


def test_cli_bad_inputs_one_line_exit_2(tmp_path):
    good = write_results(tmp_path / "good", ci_cells(), series=[])
    newer = write_results(tmp_path / "newer", ci_cells(), series=[], schema_version=2)
    empty = write_results(tmp_path / "empty", [], series=[], axes={})
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text("[timing]\nthreshold = 'fast'\n")
    cases = [
        (("--baseline", str(tmp_path / "missing"), "--current", str(good)), "--baseline", "does not exist"),
        (("--baseline", str(good), "--current", str(tmp_path / "missing")), "--current", "does not exist"),
        (("--baseline", str(good), "--current", str(newer)), "schema_version 2", "reads 1"),
        (("--baseline", str(empty), "--current", str(good)), "no cells", "empty"),
        (("--baseline", str(good), "--current", str(good), "--policy", str(tmp_path / "none.toml")), "--policy", "not a file"),
        (("--baseline", str(good), "--current", str(good), "--policy", str(bad_policy)), "timing.threshold", "'fast'"),
    ]
    for args, *needles in cases:
        result = run_cli("check", *args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
        for n in needles:
            assert n in lines[0], lines[0]

"""The runner: isolated cells, every failure status, atomic results, resume, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsbench import spec as spec_lib
from dsbench.results import ResultStore, load_results
from dsbench.runner import UsageError, run_sweep

pytestmark = pytest.mark.slow  # every test here runs real cell processes


def _labels(spec):
    return {c.label(): c.cell_id for c in spec_lib.expand(spec, "cpu")}


def test_every_failure_kind_gets_its_status_and_the_sweep_goes_on(tiny_spec_file, tmp_path, monkeypatch):
    spec = spec_lib.load_spec_file(tiny_spec_file(seq_lens=(8, 12, 16), context_lens=(8, 12, 16, 20), timeout_s=15))
    faults = {
        "prefill/dense/mha/fp32 b2×t8": ("raise", "error", "injected fault"),
        "prefill/dense/mha/fp32 b2×t12": ("oom", "oom", "memory"),
        "decode/dense/mha/fp32 b2×ctx8+4": ("nan", "diverged", "not finite"),
        "decode/dense/mha/fp32 b2×ctx12+4": ("segfault", "error", "SIGSEGV"),
        "decode/dense/mha/fp32 b2×ctx16+4": ("exit", "error", "exited with code 3"),
    }
    monkeypatch.setenv("DSBENCH_INJECT_FAULT", ",".join(f"{kind}@{label}" for label, (kind, _, _) in faults.items()))
    outcome = run_sweep(spec, out=tmp_path / "run")
    cells = load_results(tmp_path / "run").cells.set_index("label")
    assert outcome.ran == len(cells) == 8 and outcome.failed == 5
    for label, (_, status, message) in faults.items():
        assert cells.loc[label, "status"] == status, (label, cells.loc[label, "error"])
        assert message in cells.loc[label, "error"]
        assert "\n" not in cells.loc[label, "error"]
    for label in ("train/dense/mha/fp32 b2×t16", "prefill/dense/mha/fp32 b2×t16", "decode/dense/mha/fp32 b2×ctx20+4"):
        assert cells.loc[label, "status"] == "ok"
        assert cells.loc[label, "tokens_per_s_median"] > 0
    # Failed rows still carry the accounting, so a reader sees what was attempted.
    assert cells["params_total"].notna().all()


def test_a_hung_cell_is_killed_at_its_timeout_and_the_sweep_goes_on(tiny_spec_file, tmp_path, monkeypatch):
    """Apart from the other faults: the sweep waits timeout_s for it, so its timeout is short
    (whether the kill comes during the cell's start-up or its hang, the cell timed out)."""
    spec = spec_lib.load_spec_file(tiny_spec_file(workloads=("prefill", "decode"), seq_lens=(16,), context_lens=(8,), timeout_s=3))
    monkeypatch.setenv("DSBENCH_INJECT_FAULT", "hang@prefill/dense/mha/fp32 b2×t16")
    outcome = run_sweep(spec, out=tmp_path / "run")
    cells = load_results(tmp_path / "run").cells.set_index("label")
    assert outcome.ran == len(cells) == 2  # the decode cell ran after it (its status: 3 s may not fit a loaded CI)
    hung = cells.loc["prefill/dense/mha/fp32 b2×t16"]
    assert hung["status"] == "timeout" and "measure.timeout_s = 3" in hung["error"] and "\n" not in hung["error"]


def test_diverged_train_cell(tiny_spec_file, tmp_path, monkeypatch):
    spec = spec_lib.load_spec_file(tiny_spec_file(workloads=("train",)))
    monkeypatch.setenv("DSBENCH_INJECT_FAULT", "nan@train")
    run_sweep(spec, out=tmp_path / "run")
    row = load_results(tmp_path / "run").cells.iloc[0]
    assert row["status"] == "diverged" and "train loss is not finite" in row["error"]


def _sweep_command(spec_path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsbench.cli", "run", "sweep", str(spec_path), "--out", str(out), *extra]


def _wait_for_fragments(out: Path, n: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while len(list((out / "cells").glob("*.json"))) < n:
        assert proc.poll() is None, "the sweep ended before it was interrupted"
        assert time.time() < deadline, "no fragments appeared"
        time.sleep(0.05)


def test_sigkill_midway_then_resume_records_every_cell_once(tiny_spec_file, tmp_path):
    spec_path = tiny_spec_file(seq_lens=(8, 12, 16), context_lens=(8, 12, 16))
    out = tmp_path / "run"
    proc = subprocess.Popen(_sweep_command(spec_path, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_fragments(out, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = set(ResultStore(out).recorded())
    assert len(kept) >= 2
    done = subprocess.run(_sweep_command(spec_path, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = load_results(out).cells
    expected = {c.cell_id for c in spec_lib.expand(spec_lib.load_spec_file(spec_path), "cpu")}
    assert sorted(cells["cell_id"]) == sorted(expected)  # every cell exactly once
    assert (cells["status"] == "ok").all()
    assert f"{len(kept)} already recorded" in done.stdout


def test_ctrl_c_keeps_finished_cells_and_exits_130(tiny_spec_file, tmp_path):
    spec_path = tiny_spec_file(seq_lens=(8, 12, 16), context_lens=(8, 12, 16))
    out = tmp_path / "run"
    proc = subprocess.Popen(_sweep_command(spec_path, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_fragments(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted"
    results = load_results(out)
    assert 1 <= len(results.cells) < 7 and (results.cells["status"] == "ok").all()
    assert not list((out / "cells").glob(".*tmp*"))  # no half-written fragment left behind


def test_existing_out_needs_resume_and_the_same_spec(tiny_spec_file, tmp_path):
    spec = spec_lib.load_spec_file(tiny_spec_file(workloads=("prefill",)))
    out = tmp_path / "run"
    first = run_sweep(spec, out=out)
    assert first.ran == 1
    with pytest.raises(UsageError, match="--resume"):
        run_sweep(spec, out=out)
    again = run_sweep(spec, out=out, resume=True)
    assert again.ran == 0 and again.skipped == 1
    changed = spec_lib.load_spec_file(tiny_spec_file(workloads=("prefill",), seq_lens=(8,)))
    with pytest.raises(UsageError, match="differs"):
        run_sweep(changed, out=out, resume=True)


def test_results_tables_schema(tiny_spec_file, tmp_path):
    spec = spec_lib.load_spec_file(tiny_spec_file())
    run_sweep(spec, out=tmp_path / "run")
    results = load_results(tmp_path / "run")
    run = results.run
    assert run["schema_version"] == 1 and run["spec"]["name"] == "tiny"
    assert {"python_version", "torch_version", "cpu_model", "torch_num_threads"} <= set(run["environment"])
    assert {"sha", "dirty"} == set(run["git"])
    cells = results.cells
    assert list(cells["workload"]) == ["train", "prefill", "decode"]  # expansion order
    for column in ("tokens_per_s_median", "step_time_ms_p10", "step_time_ms_p90", "step_time_n", "peak_mem_bytes",
                   "params_total", "params_active", "flops_per_token", "flops_convention", "kv_cache_bytes_per_token", "mfu"):
        assert column in cells, column
    ok = cells.set_index("workload")
    assert ok.loc["train", "final_loss"] < ok.loc["train", "first_loss"]
    # calibrate = false: no peak, so MFU is null, never a made-up number.
    assert cells["mfu"].isna().all() and (cells["peak_source"] == "unknown").all()
    # NVML fields are null on a CPU, never 0.
    assert cells["power_w_mean"].isna().all() and cells["energy_j_per_token"].isna().all()
    assert (ok.loc["decode", "kv_cache_bytes_per_token_measured"] == ok.loc["decode", "kv_cache_bytes_per_token"])
    series = results.series
    assert list(series.columns) == ["run_id", "cell_id", "step", "metric", "value", "layer", "index", "domain"]
    train_id = ok.loc["train", "cell_id"]
    losses = series[(series.cell_id == train_id) & (series.metric == "loss")]
    assert list(losses["step"]) == list(range(6))
    timed = series[(series.cell_id == train_id) & (series.metric == "step_time_ms")]
    assert len(timed) == 5  # 6 steps minus 1 warm-up
    assert set(series[series.metric == "loss_by_domain"]["domain"]) <= {"words", "arith", "markov", "code", "dna"}


def test_a_result_the_runner_cannot_read_fails_that_cell_only(tiny_spec_file, tmp_path, monkeypatch):
    """A worker of another dsbench version (a result field unknown here): the cell is an error
    naming the field, and the sweep goes on."""
    from dsbench.task import CellResult, TaskFormatError

    def newer_worker(text):
        raise TaskFormatError("result.rows: unknown field; expected: status, error, row, series")

    monkeypatch.setattr(CellResult, "from_json", staticmethod(newer_worker))
    spec = spec_lib.load_spec_file(tiny_spec_file(workloads=("prefill",), seq_lens=(8, 16)))
    outcome = run_sweep(spec, out=tmp_path / "run")
    cells = load_results(tmp_path / "run").cells
    assert outcome.ran == 2 and outcome.failed == 2
    assert (cells["status"] == "error").all()
    assert cells["error"].str.contains("cannot read: result.rows: unknown field").all()
    assert cells["params_total"].notna().all()

"""Executors: the slurm path through submitit's local backend (the same code as on a cluster
apart from the sbatch call), Slurm's own failures as statuses, resume, Ctrl-C, [executor] checks."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsbench import executors
from dsbench import spec as spec_lib
from dsbench.cli import app
from dsbench.results import ResultStore, load_results
from dsbench.runner import run_sweep

SLURM_LOCAL = '\n[executor]\nkind = "slurm"\ncluster = "local"\narray_parallelism = {parallelism}\n'


@pytest.fixture
def slurm_spec_file(tiny_spec_file):
    def make(parallelism: int = 2, **kwargs) -> Path:
        path = tiny_spec_file(**kwargs)
        path.write_text(path.read_text() + SLURM_LOCAL.format(parallelism=parallelism))
        return path

    return make


def _jobs(out: Path) -> list[dict]:
    path = out / "slurm" / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else []


def _wait_until(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --- statuses (no jobs run) ---


@pytest.mark.parametrize("state, status", [("PREEMPTED", "preempted"), ("CANCELLED", "cancelled"), ("NODE_FAIL", "node_fail"),
                                           ("BOOT_FAIL", "node_fail"), ("TIMEOUT", "timeout"), ("OUT_OF_MEMORY", "oom"),
                                           ("INTERRUPTED", "cancelled"), ("FAILED", "error"), ("FINISHED", "error")])
def test_slurm_states_of_a_job_without_result_map_to_statuses(state, status):
    result = executors.ended_without_result(state, "1234_5", "srun: error: node17: task 0: Killed")
    assert result.status == status
    assert result.error == f"slurm job 1234_5 ended {state} without a result; last log line: srun: error: node17: task 0: Killed"


class FakeJob:
    """What SlurmExecutor reads of a submitit job: its result file, state and done()."""

    def __init__(self, tmp_path: Path, state: str, done: bool):
        self.job_id, self.state, self._done = "77", state, done
        self.paths = SimpleNamespace(result_pickle=tmp_path / "77_result.pkl", stderr=tmp_path / "77_log.err")

    def done(self) -> bool:
        return self._done


def _outcome(job, since=None):
    executor = executors.SlurmExecutor.__new__(executors.SlurmExecutor)
    executor._states = collections.Counter()
    flight = executors._Flight(cell=None, job=job, submitted_at=0.0, state_since=since)
    return executor._outcome(flight), executor._states


def test_preempted_ends_the_cell_only_once_it_stays_preempted(tmp_path):
    """Slurm may requeue a preempted job (PREEMPTED, then REQUEUED): the cell waits a grace period."""
    job = FakeJob(tmp_path, "PREEMPTED", done=False)
    result, states = _outcome(job)
    assert result is None and states["PENDING"] == 1
    result, _ = _outcome(job, since=("PREEMPTED", time.time() - executors.GRACE_S["PREEMPTED"] - 1))
    assert result.status == "preempted" and "ended PREEMPTED" in result.error


def test_completed_waits_for_its_result_on_a_slow_shared_filesystem(tmp_path):
    job = FakeJob(tmp_path, "COMPLETED", done=True)
    result, states = _outcome(job)
    assert result is None and states == {"RUNNING": 1}
    result, _ = _outcome(job, since=("COMPLETED", time.time() - executors.GRACE_S["COMPLETED"] - 1))
    assert result.status == "error" and "ended COMPLETED without a result" in result.error


def test_sacct_states_with_detail_and_running_jobs(tmp_path):
    (tmp_path / "77_log.err").write_text("slurmstepd: error: *** JOB 77 CANCELLED AT 2025-01-01 BY alice ***\n")
    result, _ = _outcome(FakeJob(tmp_path, "CANCELLED by 1001", done=True))
    assert result.status == "cancelled" and result.error.endswith("CANCELLED AT 2025-01-01 BY alice ***")
    result, states = _outcome(FakeJob(tmp_path, "RUNNING", done=False))
    assert result is None and states == {"RUNNING": 1}


# --- [executor] and flags ---


def test_bad_executor_values_exit_2_with_one_line(tmp_path, tiny_spec_file, monkeypatch):
    from typer.testing import CliRunner

    runner = CliRunner()
    base = tiny_spec_file().read_text()
    cases = {'kind = "pbs"': "executor.kind: 'pbs' is not allowed; allowed: local, slurm",
             "time_min = 0": "executor.time_min: expected a positive integer, got 0",
             "partiton = \"gpu\"": "executor.partiton: unknown key; allowed: kind, cluster, partition",
             "sbatch = { qos = [1] }": "executor.sbatch.qos: expected a string, number or true/false, got [1]"}
    for line, message in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(base + f"\n[executor]\n{line}\n")
        done = runner.invoke(app, ["run", "sweep", str(path), "--out", str(tmp_path / "never")])
        assert done.exit_code == 2, (line, done.output)
        assert message in done.output and "Traceback" not in done.output
    done = runner.invoke(app, ["run", "sweep", "--preset", "smoke", "--executor", "slurm", "--gpus-per-cell", "-1"])
    assert done.exit_code == 2 and "--gpus-per-cell: expected an integer ≥ 0, got -1" in done.output
    monkeypatch.setattr(executors, "submitit_installed", lambda: False)
    done = runner.invoke(app, ["run", "sweep", "--preset", "smoke", "--executor", "slurm", "--out", str(tmp_path / "never")])
    assert done.exit_code == 2 and "needs submitit, which is not installed here" in done.output
    assert not (tmp_path / "never").exists()  # nothing started


def test_executor_settings_are_not_identity(tiny_spec_file, slurm_spec_file):
    plain = spec_lib.load_spec_file(tiny_spec_file())
    slurm = spec_lib.load_spec_file(slurm_spec_file())
    assert slurm.executor.kind == "slurm" and plain.executor.kind == "local"
    assert [c.cell_id for c in spec_lib.expand(plain, "cpu")] == [c.cell_id for c in spec_lib.expand(slurm, "cpu")]
    assert "executor" not in plain.to_dict()  # a local run records the spec it did before executors existed


def test_submitit_parameters():
    settings = executors.ExecutorSettings(kind="slurm", partition="gpu", account="lab", gpus_per_cell=None, mem_gb=32.0,
                                          sbatch={"qos": "high"}, setup=("module load cuda",))
    params = executors.submitit_parameters(settings, timeout_s=600, device="cuda", name="sw")
    assert params == {"name": "dsbench-sw", "timeout_min": 15, "gpus_per_node": 1, "nodes": 1, "tasks_per_node": 1,
                      "mem_gb": 32.0, "slurm_partition": "gpu", "slurm_account": "lab", "slurm_array_parallelism": 256,
                      "slurm_additional_parameters": {"qos": "high"}, "slurm_setup": ["module load cuda"]}
    assert executors.resolve_device(settings, "auto", lambda d: "never asked") == "cpu"  # no GPUs asked for
    assert executors.resolve_device(settings, "cuda", lambda d: "never asked") == "cuda"  # the node has it, not this host


# --- the slurm path, through submitit's local backend ---

@pytest.mark.slow
def test_slurm_local_sweep_records_every_cell_once_with_its_status(slurm_spec_file, tmp_path, monkeypatch):
    spec = spec_lib.load_spec_file(slurm_spec_file(workloads=("train", "prefill"), seq_lens=(8, 16)))
    monkeypatch.setenv("DSBENCH_INJECT_FAULT", "raise@prefill/dense/mha/fp32 b2×t8")
    outcome = run_sweep(spec, out=tmp_path / "run")
    cells = load_results(tmp_path / "run").cells.set_index("label")
    assert outcome.ran == len(cells) == 3 and outcome.failed == 1
    assert cells.loc["prefill/dense/mha/fp32 b2×t8", "status"] == "error"
    assert cells.loc["prefill/dense/mha/fp32 b2×t8", "error"] == "RuntimeError: injected fault in prefill/dense/mha/fp32 b2×t8"
    ok = cells[cells["status"] == "ok"]
    assert len(ok) == 2 and (ok["tokens_per_s_median"] > 0).all() and (ok["queue_wait_s"] >= 0).all()
    jobs = {j["job_id"]: j["cell_id"] for j in _jobs(tmp_path / "run")}
    assert dict(zip(cells["slurm_job_id"], cells["cell_id"])) == jobs  # one job per cell, each recorded
    assert all((tmp_path / "run" / "logs" / f"{c}.log").exists() for c in cells["cell_id"])  # the cell's own log, as locally


@pytest.mark.slow
def test_a_job_killed_mid_run_is_cancelled_and_resume_runs_only_it(slurm_spec_file, tmp_path, monkeypatch):
    spec = spec_lib.load_spec_file(slurm_spec_file(workloads=("prefill",), seq_lens=(8, 12)))
    hung = next(c for c in spec_lib.expand(spec, "cpu") if c.label().endswith("b2×t12"))
    monkeypatch.setenv("DSBENCH_INJECT_FAULT", f"hang@{hung.cell_id}")
    out = tmp_path / "run"
    sweep = threading.Thread(target=run_sweep, args=(spec,), kwargs={"out": out})
    sweep.start()
    try:
        _wait_until(lambda: any(j["cell_id"] == hung.cell_id for j in _jobs(out)) and (out / "logs" / f"{hung.cell_id}.log").exists(),
                    "the hanging cell's job to start")
        time.sleep(1.0)
        job_id = next(j["job_id"] for j in _jobs(out) if j["cell_id"] == hung.cell_id)
        os.kill(int(job_id), signal.SIGINT)  # what submitit's LocalJob.cancel sends its controller (scancel, locally)
    finally:
        sweep.join(timeout=180)
    recorded = ResultStore(out).recorded()
    assert recorded == {**{c.cell_id: "ok" for c in spec_lib.expand(spec, "cpu") if c != hung}, hung.cell_id: "cancelled"}
    row = load_results(out).cells.set_index("cell_id").loc[hung.cell_id]
    assert row["error"].startswith(f"slurm job {job_id} ended INTERRUPTED without a result")
    monkeypatch.delenv("DSBENCH_INJECT_FAULT")
    again = run_sweep(spec, out=out, resume=True)  # the cluster's failure, not the cell's: a plain --resume runs it again
    assert (again.ran, again.skipped, again.failed) == (1, 1, 0)
    assert run_sweep(spec, out=out, resume=True, rerun_failed=True).ran == 0  # nothing failed is left
    cells = load_results(out).cells
    assert sorted(cells["cell_id"]) == sorted(c.cell_id for c in spec_lib.expand(spec, "cpu"))  # each exactly once
    assert (cells["status"] == "ok").all()


@pytest.mark.slow
def test_ctrl_c_cancels_every_submitted_job_and_resume_runs_the_rest(slurm_spec_file, tmp_path):
    spec_path = slurm_spec_file(workloads=("prefill",), seq_lens=(8, 12))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dsbench.cli", "run", "sweep", str(spec_path), "--out", str(out)]
    env = {**os.environ, "DSBENCH_INJECT_FAULT": "hang@b2×t12"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_until(lambda: len(list((out / "cells").glob("*.json"))) >= 1 and len(_jobs(out)) == 2, "one cell done, both submitted")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert set(ResultStore(out).recorded().values()) == {"ok"}  # nothing recorded for the cancelled cells
    for job in _jobs(out):  # every job's controller is gone (the hanging ones were cancelled)
        _wait_until(lambda: not _alive(int(job["job_id"])), f"job {job['job_id']} to end", timeout_s=10)
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = load_results(out).cells
    assert len(cells) == 2 and cells["cell_id"].is_unique and (cells["status"] == "ok").all()
    assert "1 ran, 1 already recorded" in done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie has ended
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

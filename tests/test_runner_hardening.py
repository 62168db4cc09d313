"""The sweep's folder, signals and concurrency (issue 19, classes 3 and 4): output paths that
cannot be used are one line; SIGTERM ends a sweep as Ctrl-C does (exit 143); a second sweep on a
folder in use is refused; a write that fails leaves no temp file and loses nothing recorded; a
SIGKILLed worker is "killed" unless the cgroup says the OOM killer did it."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsbench import atomic
from dsbench import results as results_lib
from dsbench import runner
from dsbench import spec as spec_lib
from dsbench.errors import ResultsError, UsageError
from dsbench.results import ResultStore, load_results, write_atomic


def sweep_command(spec_path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsbench.cli", "run", "sweep", str(spec_path), "--out", str(out), *extra]


def wait_for(condition, proc, what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the sweep ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fragments(out: Path) -> int:
    return len(list((out / "cells").glob("*.json")))


def bad_outs(tmp_path: Path) -> list[tuple[str, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return [("", "is empty or the current folder"), (".", "is empty or the current folder"), (str(a_file), "is a file"), (str(a_file / "sub"), "cannot create or write"),
            (str(tmp_path / ("n" * 300)), "cannot create or write"), ("/proc/dsbench-out", "cannot create or write")]


def test_output_paths_that_cannot_be_used_are_one_line(tiny_spec_file, tmp_path):
    spec = spec_lib.load_spec_file(tiny_spec_file(workloads=("prefill",)))
    for out, words in bad_outs(tmp_path):
        with pytest.raises(UsageError) as e:
            runner.prepare_out(spec, Path(out), False, {})
        assert words in str(e.value) and "\n" not in str(e.value), (out, str(e.value))


def test_a_folder_killed_before_its_run_json_starts_afresh(tiny_spec_file, tmp_path):
    spec = spec_lib.load_spec_file(tiny_spec_file(workloads=("prefill",)))
    out = tmp_path / "run"
    for d in runner.SCAFFOLD:
        (out / d).mkdir(parents=True)
    (out / runner.LOCK_NAME).write_text("pid 1")
    assert runner.run_sweep(spec, out=out, resume=True).ran == 1
    foreign = tmp_path / "foreign"
    (foreign / "cells").mkdir(parents=True)
    (foreign / "cells" / "x.txt").write_text("not ours")
    with pytest.raises(UsageError, match="is not a dsbench results folder"):
        runner.run_sweep(spec, out=foreign)


def test_sigterm_ends_the_sweep_like_ctrl_c_and_exits_143(tiny_spec_file, tmp_path):
    spec_path = tiny_spec_file(seq_lens=(8, 12, 16), context_lens=(8, 12, 16))
    out = tmp_path / "run"
    proc = subprocess.Popen(sweep_command(spec_path, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: fragments(out) >= 1, proc, "a cell finished")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "interrupted (SIGTERM)" in stderr and "--resume" in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    cells = load_results(out).cells
    assert 1 <= len(cells) < 7 and (cells["status"] == "ok").all() and (out / "cells.parquet").exists()


def test_a_second_sweep_on_a_folder_in_use_is_refused(tiny_spec_file, tmp_path):
    spec_path = tiny_spec_file(seq_lens=(8, 12), context_lens=(8,))
    out = tmp_path / "run"
    first = subprocess.Popen(sweep_command(spec_path, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "run.json").exists(), first, "the first sweep started")
        second = subprocess.run(sweep_command(spec_path, out, "--resume"), capture_output=True, text=True, timeout=120)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert "is being written by another dsbench sweep (pid" in lines[0]
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    after = subprocess.run(sweep_command(spec_path, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]  # the lock went with the first process
    assert sorted(load_results(out).cells["cell_id"]) == sorted({c.cell_id for c in spec_lib.expand(spec_lib.load_spec_file(spec_path), "cpu")})


@pytest.mark.parametrize("before, after, status", [(None, None, "killed"), (0, 0, "killed"), (0, 1, "oom"), (3, 3, "killed")])
def test_a_sigkilled_worker_is_killed_unless_the_cgroup_counted_an_oom_kill(tmp_path, monkeypatch, before, after, status):
    log = tmp_path / "cell.log"
    log.write_text("step 3\n")
    monkeypatch.setattr(runner, "oom_kills", lambda: after)
    got, message = runner._death_status(-signal.SIGKILL, log, before)
    assert got == status and "last log line: step 3" in message
    if status == "killed":
        assert "SIGKILL; the kernel OOM killer or another process" in message


def test_a_failed_write_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)  # write_atomic lives in dsbench/atomic.py
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]
    store = ResultStore(tmp_path)
    store.create()
    with pytest.raises(ResultsError) as e:
        store.write_cell({"cell_id": "abc", "status": "ok"}, [])
    assert "cannot write 'cells/abc.json'" in str(e.value) and "No space left" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "cells").iterdir())


def test_a_sweep_whose_tables_cannot_be_written_keeps_its_cells_and_does_not_say_complete(tiny_spec_file, tmp_path, monkeypatch):
    spec = spec_lib.load_spec_file(tiny_spec_file(workloads=("prefill",)))
    out = tmp_path / "run"

    def no_tables(self, cells, series):
        raise ResultsError("results: cannot write cells.parquet (injected)")

    monkeypatch.setattr(ResultStore, "write_tables", no_tables)
    with pytest.raises(ResultsError):
        runner.run_sweep(spec, out=out)
    assert json.loads((out / "run.json").read_text())["status"] == "tables unwritten"
    assert fragments(out) == 1
    monkeypatch.undo()
    assert len(load_results(out).cells) == 1  # rebuilt from the fragment


def test_a_multi_process_cell_names_the_rank_torchrun_saw_fail_first(tmp_path):
    log = tmp_path / "cell.log"
    log.write_text("""rank 0 starting
============================================================
dsbench.worker FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_15:00:00
  host      : box
  rank      : 1 (local_rank: 1)
  exitcode  : -11 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 11 (SIGSEGV) received by PID 4242
============================================================
""")
    status, message = runner._death_status(1, log)
    assert (status, message) == ("error", "rank 1 died from SIGSEGV before the cell's result was written (torchrun's first observed failure)")

"""Runs a sweep: each cell in a fresh subprocess with a timeout, each result written at once.

The parent never touches the GPU: device facts, the environment and the matmul calibration
come from a short probe subprocess, so the parent holds no CUDA context that would skew the
cells' memory readings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dsbench import __version__
from dsbench.accounting import static_row
from dsbench.errors import SpecError, UsageError
from dsbench.results import SCHEMA_VERSION, ResultStore
from dsbench.spec import Cell, SweepSpec, expand
from dsbench.task import CellResult, CellTask, ProfileOptions, ProfileRequest, Runtime, TaskFormatError
from dsbench.workloads import WORKLOADS

PROBE_TIMEOUT_S = 300
PROFILE_TIMEOUT_FACTOR = 2  # a profiled cell runs its workload twice (measured, then profiled)


@dataclass
class SweepOutcome:
    out: Path
    run_id: str
    total: int
    ran: int
    skipped: int
    failed: int
    interrupted: bool = False


# --- device and environment probe ---


def resolve_device(requested: str) -> str:
    import torch  # the parent imports torch only for this check; it creates no CUDA context

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SpecError("device: 'cuda' requested but torch.cuda.is_available() is False here; allowed here: auto, cpu")
    return requested


def probe(device: str, precisions: list[str], calibrate: bool) -> dict:
    """Environment, and per precision the peak FLOP/s for MFU (datasheet or calibrated)."""
    args = [sys.executable, "-m", "dsbench.probe", device, ",".join(precisions), "1" if calibrate else "0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"device probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def git_state() -> dict:
    """The dsbench checkout's commit and whether it has uncommitted changes (None outside git)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": None, "dirty": None}
    if sha.returncode != 0:
        return {"sha": None, "dirty": None}
    return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# --- one cell ---


def run_cell_process(cell: Cell, store: ResultStore, runtime: Runtime, timeout_s: float, profile: ProfileOptions | None = None) -> CellResult:
    """Run one cell in a fresh interpreter; always returns a result, whatever happened to it.

    profile: the worker also profiles the cell into <out>/profiles/<cell_id>.
    """
    task_path = store.work_dir / f"{cell.cell_id}.task.json"
    result_path = store.work_dir / f"{cell.cell_id}.result.json"
    result_path.unlink(missing_ok=True)
    request = None if profile is None else ProfileRequest(str(store.root), profile)
    task = CellTask(cell, dataclasses.replace(runtime, spawn_time=time.time()), request)
    task_path.write_text(task.to_json())
    log_path = store.logs_dir / f"{cell.cell_id}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # A new session: Ctrl-C reaches only the parent, which then ends the cell itself.
        proc = subprocess.Popen(
            worker_command(cell, task_path, result_path),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return _failure("timeout", f"exceeded measure.timeout_s = {timeout_s:g} s and was killed", start)
        except BaseException:
            _kill(proc)
            raise
    if result_path.exists():
        try:
            result = CellResult.from_json(result_path.read_text())
        except TaskFormatError as e:  # a worker of another version: this cell fails, the sweep goes on
            return _failure("error", f"worker wrote a result this runner cannot read: {e}", start)
        result.row["cell_wall_s"] = time.perf_counter() - start
        return result
    return _failure(*_death_status(returncode, log_path), start)


def worker_command(cell: Cell, task_path: Path, result_path: Path) -> list[str]:
    """The command line that runs one cell's worker (every executor runs this same command).

    A cell over R processes (parallel.ep = R) runs its worker under torchrun, one process per
    rank on this node; torchrun picks a free port (--standalone) and ends every rank when one fails.
    """
    worker = ["-m", "dsbench.worker", str(task_path), str(result_path)]
    if cell.ep == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cell.ep}", *worker]


def _die_with_parent() -> None:
    """Linux: the cell process gets SIGKILL if the sweep process dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _death_status(returncode: int, log_path: Path) -> tuple[str, str]:
    """Status for a worker that exited without writing its result."""
    last = next((line for line in reversed(log_path.read_text(errors="replace").splitlines()) if line.strip()), "")
    tail = f"; last log line: {last[:300]}" if last else ""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        if name == "SIGKILL":  # nothing in dsbench sends it except on timeout, handled above
            return "oom", f"worker killed by SIGKILL (most likely the kernel's OOM killer){tail}"
        return "error", f"worker died from {name}{tail}"
    return "error", f"worker exited with code {returncode} before writing a result{tail}"


def _failure(status: str, message: str, start: float) -> CellResult:
    return CellResult(status, message, {"cell_wall_s": time.perf_counter() - start}, [])


# --- the sweep ---


def prepare_out(spec: SweepSpec, out: Path, resume: bool, spec_dict: dict) -> tuple[ResultStore, dict | None]:
    store = ResultStore(out)
    info = store.read_run_info()
    if info is not None and not resume:
        raise UsageError(f"--out: {str(out)!r} already holds run {info.get('run_id')!r}; pass --resume to continue it or choose another --out")
    if info is not None and info.get("spec") != spec_dict:
        changed = next(k for k in set(spec_dict) | set(info.get("spec", {})) if spec_dict.get(k) != info.get("spec", {}).get(k))
        raise UsageError(f"--resume: the spec's {changed!r} differs from the run recorded in {str(out)!r}; use a new --out")
    if out.exists() and info is None and any(out.iterdir()):
        raise UsageError(f"--out: {str(out)!r} exists and is not a dsbench results folder; choose an empty or new folder")
    store.create()
    return store, info


def default_out(spec: SweepSpec) -> Path:
    return Path("results") / f"{spec.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_sweep(
    spec: SweepSpec,
    out: str | Path | None = None,
    resume: bool = False,
    rerun_failed: bool = False,
    device: str | None = None,
    console: Console | None = None,
    spec_source: str = "",
    only: set[str] | None = None,
    profile: ProfileOptions | None = None,
) -> SweepOutcome:
    """Run every cell of `spec` not yet recorded in `out`; returns counts. Safe to interrupt.

    only: run just these cell ids. profile: also profile each cell after measuring it.
    """
    console = console or Console(stderr=True)
    sweep_start = time.perf_counter()
    device = resolve_device(device or spec.device)
    spec = dataclasses.replace(spec, device=device)
    cells = [c for c in expand(spec, device) if only is None or c.cell_id in only]
    out = Path(out) if out else default_out(spec)
    spec_dict = json.loads(json.dumps(spec.to_dict()))
    store, info = prepare_out(spec, out, resume, spec_dict)
    if info is None:
        info = new_run_info(spec, spec_dict, out, spec_source, len(cells))
        store.write_run_info(info)
    if "probe" not in info:
        precisions = sorted({c.model.precision for c in cells})
        probe_start = time.perf_counter()
        info["probe"] = probe(device, precisions, spec.measure.calibrate)
        info["probe_s"] = time.perf_counter() - probe_start
        info["environment"] = info["probe"].pop("environment")
        store.write_run_info(info)
    recorded = store.recorded()
    skip = {cid for cid, status in recorded.items() if status == "ok" or not rerun_failed}
    todo = [c for c in cells if c.cell_id not in skip]
    outcome = SweepOutcome(out, info["run_id"], len(cells), 0, len(cells) - len(todo), 0)
    info["status"] = "running"
    store.write_run_info(info)
    try:
        with _interrupt_flag() as interrupted:
            _run_cells(todo, {c.cell_id: i for i, c in enumerate(cells)}, store, info, spec, console, outcome, profile, interrupted)
    except KeyboardInterrupt:
        outcome.interrupted = True
    # Summed over resumed invocations: the sweep's own wall time, probe and cells included.
    info["sweep_wall_s"] = info.get("sweep_wall_s", 0.0) + time.perf_counter() - sweep_start
    info.update(status="interrupted" if outcome.interrupted else "complete", finished_at=_now())
    store.write_run_info(info)
    store.consolidate()
    return outcome


@contextlib.contextmanager
def _interrupt_flag():
    """Ctrl-C raises KeyboardInterrupt as usual and also sets a flag the cell loop checks: a
    KeyboardInterrupt raised where Python ignores exceptions (a finaliser, logging's lock
    release: "Exception ignored in …") would otherwise be lost and the sweep run on."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_cells(cells: list[Cell], order: dict[str, int], store: ResultStore, info: dict, spec: SweepSpec, console: Console,
               outcome: SweepOutcome, profile: ProfileOptions | None = None, interrupted: threading.Event | None = None) -> None:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=len(cells))
        for cell in cells:
            if interrupted is not None and interrupted.is_set():
                raise KeyboardInterrupt
            progress.update(task, description=cell.label())
            timeout_s = spec.measure.timeout_s * (PROFILE_TIMEOUT_FACTOR if profile else 1)
            runtime = dataclasses.replace(cell_runtime(info, cell, spec), weights_dir=str(store.weights_dir))
            result = run_cell_process(cell, store, runtime, timeout_s, profile)
            row = {"run_id": info["run_id"], "status": result.status, "error": result.error, **static_row(cell), **result.row}
            row["cell_index"] = order[cell.cell_id]
            store.write_cell(row, result.series)
            outcome.ran += 1
            outcome.failed += result.status != "ok"
            progress.console.print(_cell_line(row))
            progress.advance(task)


def cell_runtime(info: dict, cell: Cell, spec: SweepSpec) -> Runtime:
    """The probe's peak for the cell's precision (none recorded: MFU stays empty) and its threads."""
    peak = info["probe"]["peaks"].get(cell.model.precision, {})
    return Runtime(peak.get("peak_flops_per_s"), peak.get("peak_source", "unknown"), peak.get("calibration"), spec.measure.threads)


def _cell_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"[red]{row['status']:>8}[/red] {row['cell_id']} {row['label']}: {row['error']}"
    return (f"[green]{'ok':>8}[/green] {row['cell_id']} {row['label']}: {row['tokens_per_s_median']:,.0f} tok/s, "
            f"step {row['step_time_ms_median']:.2f} ms (p10 {row['step_time_ms_p10']:.2f}, p90 {row['step_time_ms_p90']:.2f}, n={row['step_time_n']})")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_info(spec: SweepSpec, spec_dict: dict, out: Path, spec_source: str, n_cells: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": out.name,
        "name": spec.name,
        "created_at": _now(),
        "finished_at": None,
        "status": "created",
        "dsbench_version": __version__,
        "spec_source": spec_source,
        "spec": spec_dict,
        "n_cells": n_cells,
        "command": sys.argv,
        "git": git_state(),
    }


def check_data(spec: SweepSpec) -> None:
    """Fail before anything runs if the data cannot feed every cell (DataError, exit 2)."""
    from dsbench.data import load_dataset
    from dsbench.spec import base_config

    data = load_dataset(spec.data, spec.seed)
    needs: dict = {}  # ordered, deduplicated
    for _, point in spec.each_point():  # every [[sweep]] block and dotted-axis point
        data.check_vocab(base_config(point).vocab_size)
        needs.update(dict.fromkeys(need for name, workload in WORKLOADS.items() if name in point.axes["workload"]
                                   for need in workload.data_lengths(getattr(point, name))))
    for seq_len, split in sorted(needs, key=lambda need: need[1] != "train"):  # the training split first
        data.check_seq_len(seq_len, split)

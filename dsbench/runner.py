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
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dsbench import __version__, executors, memory_estimate, targets
from dsbench.accounting import static_row
from dsbench.errors import ResultsError, SpecError, UsageError
from dsbench.results import SCHEMA_VERSION, ResultStore
from dsbench.spec import Cell, SweepSpec, expand
from dsbench.terminal import stderr_console, styled
from dsbench.task import CellResult, CellTask, ProfileOptions, ProfileRequest, Runtime, TaskFormatError
from dsbench.workloads import WORKLOADS

PROBE_TIMEOUT_S = 300
CLUSTER_FAILURES = ("preempted", "cancelled", "node_fail")  # statuses the cluster gave a cell, not the cell itself
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
    signal_name: str = "SIGINT"  # what interrupted it: Ctrl-C (SIGINT, exit 130) or SIGTERM (a scheduler, CI; exit 143)


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
    kills_before = oom_kills()
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
    return _failure(*_death_status(returncode, log_path, kills_before), start)


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


def oom_kills() -> int | None:
    """The kernel's OOM kills in this process's cgroup so far (cgroup v2 memory.events), or None
    where it cannot be read."""
    try:
        group = Path("/proc/self/cgroup").read_text().splitlines()[0].split("::", 1)[1]
        events = (Path("/sys/fs/cgroup") / group.lstrip("/") / "memory.events").read_text().split()
        return int(events[events.index("oom_kill") + 1])
    except (OSError, IndexError, ValueError):
        return None


TORCHRUN_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def _death_status(returncode: int, log_path: Path, oom_kills_before: int | None = None) -> tuple[str, str]:
    """Status for a worker that exited without writing its result."""
    text = log_path.read_text(errors="replace")
    if cause := TORCHRUN_ROOT_CAUSE.search(text):  # a multi-process cell: torchrun names the rank that failed first
        rank, code = cause.groups()
        how = f"died from {signal.Signals(-int(code)).name}" if int(code) < 0 else f"exited with code {code}"
        return "error", f"rank {rank} {how} before the cell's result was written (torchrun's first observed failure)"
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    tail = f"; last log line: {last[:300]}" if last else ""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        if name == "SIGKILL":  # nothing in dsbench sends it except on timeout, handled above
            if oom_kills_before is not None and (oom_kills() or 0) > oom_kills_before:
                return "oom", f"worker killed by SIGKILL: the kernel's OOM killer (the cgroup's oom_kill count rose){tail}"
            return "killed", f"worker killed (SIGKILL; the kernel OOM killer or another process){tail}"
        return "error", f"worker died from {name}{tail}"
    return "error", f"worker exited with code {returncode} before writing a result{tail}"


def _failure(status: str, message: str, start: float) -> CellResult:
    return CellResult(status, message, {"cell_wall_s": time.perf_counter() - start}, [])


# --- the sweep ---


LOCK_NAME = ".dsbench.lock"
SCAFFOLD = ("cells", "logs", ".work")  # what a run's folder holds besides run.json and its tables


def prepare_out(spec: SweepSpec, out: Path, resume: bool, spec_dict: dict) -> tuple[ResultStore, dict | None, object]:
    """The results folder, created or checked for --resume, and locked for this process: (store,
    the recorded run info or None, the lock to close when the sweep ends)."""
    try:
        if str(out).strip() in ("", ".") and not (out / "run.json").exists():  # Typer reads --out "" as "."
            raise UsageError(f"--out: {str(out)!r} is empty or the current folder; give a folder for this run (its name is the run id)")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out: {str(out)!r} is a file; give a folder (new, empty, or a run's to --resume)")
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    except OSError as e:
        raise UsageError(f"--out: cannot create or write {str(out)!r} ({e.strerror or type(e).__name__}); choose a writable folder") from None
    try:
        store = ResultStore(out)
        info = store.read_run_info()
        if info is not None and not resume:
            raise UsageError(f"--out: {str(out)!r} already holds run {info.get('run_id')!r}; pass --resume to continue it or choose another --out")
        recorded = _without_executor(info.get("spec", {})) if info is not None else None
        if info is not None and recorded != _without_executor(spec_dict):
            changed = next(k for k in set(spec_dict) | set(recorded) if _without_executor(spec_dict).get(k) != recorded.get(k))
            raise UsageError(f"--resume: the spec's {changed!r} differs from the run recorded in {str(out)!r}; use a new --out")
        if info is None and _foreign(out):
            raise UsageError(f"--out: {str(out)!r} exists and is not a dsbench results folder; choose an empty or new folder")
    except BaseException:
        lock.close()
        raise
    return store, info, lock


def _foreign(out: Path) -> list[Path]:
    """What a folder without run.json holds besides the lock and a run's empty scaffolding (a
    sweep killed before it wrote run.json leaves just that: it starts afresh)."""
    return [p for p in out.iterdir()
            if p.name != LOCK_NAME and not (p.name in SCAFFOLD and p.is_dir() and not any(p.iterdir()))]


def _lock(out: Path):
    """An exclusive lock on the folder for as long as the sweep runs (the kernel drops it if the
    process dies): a second sweep or --resume on it is refused in one line."""
    import fcntl

    handle = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"--out: {str(out)!r} is being written by another dsbench sweep ({holder}); "
                         "wait for it to end or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, since {_now()}")
    handle.flush()
    return handle


def _without_executor(spec_dict: dict) -> dict:
    """The spec as --resume compares it: where cells run may change between invocations."""
    kept = {k: v for k, v in spec_dict.items() if k != "executor"}
    if isinstance(kept.get("source"), dict):
        kept["source"] = {k: v for k, v in kept["source"].items() if k != "executor"}
    return kept


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
    force: bool = False,
) -> SweepOutcome:
    """Run every cell of `spec` not yet recorded in `out`; returns counts. Safe to interrupt.

    only: run just these cell ids. profile: also profile each cell after measuring it.
    force: run cells whose memory estimate exceeds what is available (refused otherwise).
    """
    console = console or stderr_console()
    sweep_start = time.perf_counter()
    if faults := os.environ.get("DSBENCH_INJECT_FAULT"):  # the harness's own tests: a typo would inject nothing
        from dsbench.worker import check_faults  # on use: it imports the model code

        check_faults(faults)
    executors.check_available(spec.executor)
    device = executors.resolve_device(spec.executor, device or spec.device, resolve_device)
    spec = dataclasses.replace(spec, device=device)
    cells = [c for c in expand(spec, device) if only is None or c.cell_id in only]
    check_memory(spec, cells, device, force)  # before any folder exists
    out = Path(out) if out else default_out(spec)
    spec_dict = json.loads(json.dumps(spec.to_dict()))
    store, info, lock = prepare_out(spec, out, resume, spec_dict)
    try:
        return _sweep(spec, cells, store, info, spec_dict, out, spec_source, rerun_failed, profile, device, console, sweep_start)
    finally:
        lock.close()


def check_memory(spec: SweepSpec, cells: list[Cell], device: str, force: bool = False) -> None:
    """Refuse a cell that cannot fit where it runs (dsbench/memory_estimate.py), in one line."""
    memory_estimate.check_fits(cells, device, memory_estimate.available_for(spec.executor, device), force)


def preview(spec: SweepSpec, target: str | None = None) -> tuple[targets.Preview, list[Cell]]:
    """--dry-run's cells, expanded for the device they would run on, which need not be here: a
    CUDA spec (or --target) on a machine without a GPU previews them on the target GPU."""
    import torch  # as resolve_device: no CUDA context

    plan = targets.preview_device(spec.device, target, torch.cuda.is_available())
    return plan, expand(spec, plan.device)


def check_preview_memory(spec: SweepSpec, plan: targets.Preview, cells: list[Cell], force: bool = False) -> None:
    """A preview's refusal: against a named target's memory (an assumed one's misfits are only
    listed), or (no target) as a run here would refuse."""
    if plan.target is not None:
        targets.check_fits(cells, plan.target, force or plan.assumed)
    else:
        check_memory(spec, cells, plan.device, force)


def _sweep(spec, cells, store, info, spec_dict, out, spec_source, rerun_failed, profile, device, console, sweep_start) -> SweepOutcome:
    from dsbench.data import data_digest  # on use, as check_data: it imports torch

    digest = data_digest(spec.data)
    if info is None:  # run.json first: a folder killed now still reads as this run's
        info = new_run_info(spec, spec_dict, out, spec_source, len(cells))
        info["data_digest"] = digest
        store.write_run_info(info)
    elif "data_digest" in info and info["data_digest"] != digest:  # the same path, other contents: cells would mix corpora
        raise UsageError(f"--resume: data {spec.data!r} has changed since run {info['run_id']!r} started "
                         f"(sha256 {str(info['data_digest'])[:12]}… then, {str(digest)[:12]}… now); use a new --out")
    store.create()
    timeout_s = spec.measure.timeout_s * (PROFILE_TIMEOUT_FACTOR if profile else 1)
    executor = executors.make_executor(spec.executor, store, run_cell_process, probe, timeout_s, profile, device, spec.name)
    if "probe" not in info:
        precisions = sorted({c.model.precision for c in cells})
        probe_start = time.perf_counter()
        info["probe"] = executor.probe(device, precisions, spec.measure.calibrate)
        info["probe_s"] = time.perf_counter() - probe_start
        info["environment"] = info["probe"].pop("environment")
        store.write_run_info(info)
    recorded = store.recorded()
    # The cluster's failures (preempted, cancelled, node_fail) were no fault of the cell: a plain
    # --resume runs those cells again; its own failures only with --rerun-failed.
    skip = {cid for cid, status in recorded.items() if status == "ok" or not (rerun_failed or status in CLUSTER_FAILURES)}
    todo = [c for c in cells if c.cell_id not in skip]
    outcome = SweepOutcome(out, info["run_id"], len(cells), 0, len(cells) - len(todo), 0)
    info["status"] = "running"
    store.write_run_info(info)
    interrupted = None
    try:
        with _interrupt_flag() as interrupted:
            _run_cells(todo, {c.cell_id: i for i, c in enumerate(cells)}, store, info, spec, console, outcome, executor, interrupted)
    except KeyboardInterrupt:
        outcome.interrupted = True
        outcome.signal_name = getattr(interrupted, "signal_name", "SIGINT")
    # Summed over resumed invocations: the sweep's own wall time, probe and cells included.
    info["sweep_wall_s"] = info.get("sweep_wall_s", 0.0) + time.perf_counter() - sweep_start
    try:  # the tables first: run.json says complete only once they are written
        store.consolidate()
    except ResultsError:
        info.update(status="tables unwritten", finished_at=_now())
        store.write_run_info(info)
        raise
    info.update(status="interrupted" if outcome.interrupted else "complete", finished_at=_now())
    store.write_run_info(info)
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
        flag.signal_name = signal.Signals(signum).name
        flag.set()
        raise KeyboardInterrupt

    flag.signal_name = "SIGINT"
    # SIGTERM (what CI runners, schedulers and `kill` send) ends the sweep as Ctrl-C does.
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run_cells(cells: list[Cell], order: dict[str, int], store: ResultStore, info: dict, spec: SweepSpec, console: Console,
               outcome: SweepOutcome, executor, interrupted: threading.Event | None = None) -> None:
    """Hand every cell to the executor, then write each result as it comes back: the only place
    a row is written, once per finished cell. Ctrl-C cancels what the executor still holds."""
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=len(cells))
        for cell in cells:
            executor.submit(cell, dataclasses.replace(cell_runtime(info, cell, spec), weights_dir=str(store.weights_dir)))
        try:
            while executor.pending():
                if interrupted is not None and interrupted.is_set():
                    raise KeyboardInterrupt
                progress.update(task, description=executor.describe())
                for cell, result in executor.wait():
                    row = {"run_id": info["run_id"], "status": result.status, "error": result.error, **static_row(cell), **result.row}
                    row["cell_index"] = order[cell.cell_id]
                    store.write_cell(row, result.series)
                    outcome.ran += 1
                    outcome.failed += result.status != "ok"
                    progress.console.print(_cell_line(row))
                    progress.advance(task)
            progress.update(task, description=executor.describe())
        except BaseException:
            executor.cancel_all()
            raise


def cell_runtime(info: dict, cell: Cell, spec: SweepSpec) -> Runtime:
    """The probe's peak for the cell's precision (none recorded: MFU stays empty) and its threads."""
    peak = info["probe"]["peaks"].get(cell.model.precision, {})
    return Runtime(peak.get("peak_flops_per_s"), peak.get("peak_source", "unknown"), peak.get("calibration"), spec.measure.threads)


def _cell_line(row: dict) -> Text:
    """A finished cell's line; its label and error are the user's text, printed as text."""
    if row["status"] != "ok":
        return styled((f"{row['status']:>8}", "red"), f" {row['cell_id']} {row['label']}: {row['error']}")
    return styled((f"{'ok':>8}", "green"), f" {row['cell_id']} {row['label']}: {row['tokens_per_s_median']:,.0f} tok/s, "
                  f"step {row['step_time_ms_median']:.2f} ms (p10 {row['step_time_ms_p10']:.2f}, p90 {row['step_time_ms_p90']:.2f}, n={row['step_time_n']})")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_info(spec: SweepSpec, spec_dict: dict, out: Path, spec_source: str, n_cells: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": out.resolve().name,
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

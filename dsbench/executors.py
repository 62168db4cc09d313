"""Where a sweep's cells run: `local` (one isolated subprocess at a time on this machine, the
default) or `slurm` (one submitit job per cell, submitted in arrays).

The runner's loop drives every executor through one small contract: `submit` each cell, then
`wait` until `pending()` is 0 — each call returns the cells that finished, with their results —
`describe` for the progress bar, `cancel_all` on Ctrl-C, and `probe` for the device facts (run
where the cells run). Only the runner writes rows, once per finished cell, so no executor can
record a cell twice.

A Slurm job runs the very same `run_cell_process` the local executor runs (the same worker
command, timeout, log and result files), so isolation and statuses are identical; what the
cluster adds is mapped to three more statuses: preempted, cancelled, node_fail.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dsbench.cell import Cell
from dsbench.errors import SpecError, UsageError
from dsbench.results import ResultStore, write_atomic
from dsbench.task import CellResult, CellTask, ProfileOptions, ProfileRequest, Runtime, TaskFormatError
from dsbench.validate import check_section

KINDS = ("local", "slurm")
JOB_MARGIN_MIN = 5  # Slurm's limit = the cell's own timeout + this: interpreter, imports and the result's write
POLL_S = 0.5  # how often the parent looks at its jobs (Slurm states come from submitit's rate-limited sacct)
# A state that may not be final yet, and how long a job stays in it before its cell is recorded:
# PREEMPTED may precede REQUEUED; COMPLETED's result may not be visible yet on a shared filesystem.
GRACE_S = {"PREEMPTED": 120.0, "COMPLETED": 60.0}
QUEUED_STATES = ("PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED")
RUNNING_STATES = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")
# Slurm's job states (sacct) and submitit's local ones → dsbench statuses, for a job that left no result.
ENDED_STATES = {
    "PREEMPTED": "preempted",
    "CANCELLED": "cancelled",
    "INTERRUPTED": "cancelled",  # submitit's local backend: the job's controller was signalled (its job.cancel)
    "NODE_FAIL": "node_fail",
    "BOOT_FAIL": "node_fail",
    "TIMEOUT": "timeout",
    "DEADLINE": "timeout",
    "OUT_OF_MEMORY": "oom",
}

RunCell = Callable[[Cell, ResultStore, Runtime, float, "ProfileOptions | None"], CellResult]
Probe = Callable[[str, list, bool], dict]


@dataclass(frozen=True)
class ExecutorSettings:
    """The spec's [executor] table (and `run sweep`'s flags). Not cell identity: where a cell ran
    changes none of what it is."""

    kind: str = field(default="local", metadata={"choices": KINDS})
    cluster: str = field(default="slurm", metadata={"choices": ("slurm", "local")})  # "local": submitit's local backend, for testing
    partition: str | None = None
    account: str | None = None
    time_min: int | None = None  # Slurm's time limit per cell; default measure.timeout_s + JOB_MARGIN_MIN
    gpus_per_cell: int | None = field(default=None, metadata={"min": 0})  # default 1 on cuda, 0 on cpu
    cpus_per_cell: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None  # cells in flight at once; default 256 on Slurm, 1 on the local backend
    folder: str | None = None  # submitit's job files and logs; default <out>/slurm
    sbatch: dict = field(default_factory=dict)  # extra #SBATCH parameters, e.g. {qos = "high", constraint = "a100"}
    setup: tuple[str, ...] = ()  # shell lines run in the job before the cell (module load, source .venv/bin/activate)


def with_overrides(settings: ExecutorSettings, **given) -> ExecutorSettings:
    """settings with `run sweep`'s executor flags laid over it (None: not given), each checked as
    its key in [executor] is; a bad one names its flag."""
    raw = {k: v for k, v in given.items() if v is not None}
    try:
        checked = check_section("executor", raw, ExecutorSettings)
    except SpecError as e:
        key = str(e).split(":", 1)[0].removeprefix("executor.")
        flag = "executor" if key == "kind" else key.replace("_", "-")
        raise UsageError(f"--{flag}:{str(e).split(':', 1)[1]}") from None
    merged = dataclasses.replace(settings, **{k: getattr(checked, k) for k in raw})
    slurm_only = [k for k in raw if k != "kind"]  # every other flag is a Slurm job's setting
    if slurm_only and merged.kind != "slurm":
        flag = "--" + slurm_only[0].replace("_", "-")
        raise UsageError(f"{flag}: {raw[slurm_only[0]]!r} is a Slurm job's setting, but the sweep runs with executor "
                         f"{merged.kind!r}; add --executor slurm (or [executor] kind = \"slurm\"), or drop {flag}")
    return merged


def check_available(settings: ExecutorSettings) -> None:
    """Refuse, in one line, a Slurm sweep this machine cannot submit (before anything runs)."""
    if settings.kind != "slurm":
        return
    if not submitit_installed():
        raise UsageError("executor.kind: 'slurm' needs submitit, which is not installed here; pip install 'dsbench[slurm]' or use kind = 'local'")
    if settings.cluster == "slurm":
        import shutil

        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise UsageError("executor.kind: 'slurm' but sbatch/srun are not on PATH (not a Slurm login node); run it where Slurm is, or use kind = 'local'")


def submitit_installed() -> bool:
    return importlib.util.find_spec("submitit") is not None


def resolve_device(settings: ExecutorSettings, requested: str, local: Callable[[str], str]) -> str:
    """The cells' device. Locally: what this machine has. On Slurm the cells run on the
    allocation, not here: `auto` is cuda when the cells ask for GPUs, else cpu."""
    if settings.kind == "local" or settings.cluster == "local":
        return local(requested)
    if requested == "auto":
        return "cuda" if (settings.gpus_per_cell or 0) > 0 else "cpu"
    return requested


def make_executor(settings: ExecutorSettings, store: ResultStore, run_cell: RunCell, probe: Probe, timeout_s: float,
                  profile: ProfileOptions | None, device: str, name: str):
    if settings.kind == "local":
        return LocalExecutor(store, run_cell, probe, timeout_s, profile)
    return SlurmExecutor(settings, store, run_cell, probe, timeout_s, profile, device, name)


# --- local: today's runner, one cell at a time ---


class LocalExecutor:
    """One cell at a time, in this process's child: no cell is timed under another's load."""

    def __init__(self, store: ResultStore, run_cell: RunCell, probe: Probe, timeout_s: float, profile: ProfileOptions | None):
        self._store, self._run_cell, self._probe = store, run_cell, probe
        self._timeout_s, self._profile = timeout_s, profile
        self._queue: collections.deque[tuple[Cell, Runtime]] = collections.deque()

    def probe(self, device: str, precisions: list[str], calibrate: bool) -> dict:
        return self._probe(device, precisions, calibrate)

    def submit(self, cell: Cell, runtime: Runtime) -> None:
        self._queue.append((cell, runtime))

    def pending(self) -> int:
        return len(self._queue)

    def describe(self) -> str:
        return self._queue[0][0].label() if self._queue else "done"

    def wait(self) -> list[tuple[Cell, CellResult]]:
        """Run the next cell to its end."""
        cell, runtime = self._queue.popleft()
        return [(cell, self._run_cell(cell, self._store, runtime, self._timeout_s, self._profile))]

    def cancel_all(self) -> None:
        self._queue.clear()  # the cell in flight is killed by run_cell_process itself


# --- slurm: submitit jobs ---


def run_cell_job(run_cell: RunCell, task_json: str, root: str, timeout_s: float, submitted_at: float) -> str:
    """The function each Slurm job runs: the cell, exactly as the local executor runs it."""
    queue_wait_s = time.time() - submitted_at  # the node's clock against the submitting host's
    task = CellTask.from_json(task_json)
    options = None if task.profile is None else task.profile.options
    result = run_cell(task.cell, ResultStore(root), task.runtime, timeout_s, options)
    result.row["queue_wait_s"] = queue_wait_s
    return result.to_json()


def default_time_min(timeout_s: float) -> int:
    return math.ceil(timeout_s / 60) + JOB_MARGIN_MIN


def submitit_parameters(settings: ExecutorSettings, timeout_s: float, device: str, name: str) -> dict:
    """AutoExecutor.update_parameters' keywords for these settings."""
    gpus = settings.gpus_per_cell if settings.gpus_per_cell is not None else int(device == "cuda")
    params = {"name": f"dsbench-{name}", "timeout_min": settings.time_min or default_time_min(timeout_s),
              "gpus_per_node": gpus, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": settings.cpus_per_cell,
              "mem_gb": settings.mem_gb, "slurm_partition": settings.partition, "slurm_account": settings.account,
              "slurm_array_parallelism": parallelism(settings),
              "slurm_additional_parameters": dict(settings.sbatch) or None}
    if settings.setup:
        params[f"{settings.cluster}_setup"] = list(settings.setup)
    return {k: v for k, v in params.items() if v is not None}


def parallelism(settings: ExecutorSettings) -> int:
    if settings.array_parallelism is not None:
        return settings.array_parallelism
    return 256 if settings.cluster == "slurm" else 1  # the local backend shares this machine: one cell at a time


@dataclass
class _Flight:
    cell: Cell
    job: object  # a submitit Job
    submitted_at: float
    state_since: tuple[str, float] | None = None  # a GRACE_S state, and when it was first seen


class SlurmExecutor:
    """Cells as submitit jobs: at most `array_parallelism` in flight, each refill one array."""

    def __init__(self, settings: ExecutorSettings, store: ResultStore, run_cell: RunCell, probe: Probe, timeout_s: float,
                 profile: ProfileOptions | None, device: str, name: str):
        import submitit  # only the slurm path needs it (an optional extra)

        self._store, self._run_cell, self._probe = store, run_cell, probe
        self._timeout_s, self._profile = timeout_s, profile
        self.folder = Path(settings.folder) if settings.folder else store.root / "slurm"
        try:
            self._executor = submitit.AutoExecutor(folder=self.folder, cluster=settings.cluster)
            self._executor.update_parameters(**submitit_parameters(settings, timeout_s, device, name))
        except (ValueError, NameError, RuntimeError) as e:  # submitit's own checks of a parameter
            raise UsageError(f"executor: submitit refused these settings: {str(e).splitlines()[0]}") from None
        self._parallelism = parallelism(settings)
        self._waiting: collections.deque[tuple[Cell, Runtime]] = collections.deque()
        self._flights: dict[str, _Flight] = {}
        self._states: collections.Counter = collections.Counter()

    def probe(self, device: str, precisions: list[str], calibrate: bool) -> dict:
        """The device facts of an allocation like the cells' (not of this login node)."""
        job = self._executor.submit(self._probe, device, precisions, calibrate)
        try:
            return job.result()
        except BaseException:
            job.cancel(check=False)
            raise

    def submit(self, cell: Cell, runtime: Runtime) -> None:
        self._waiting.append((cell, runtime))

    def pending(self) -> int:
        return len(self._waiting) + len(self._flights)

    def describe(self) -> str:
        queued = len(self._waiting) + sum(n for s, n in self._states.items() if s not in RUNNING_STATES)
        running = sum(n for s, n in self._states.items() if s in RUNNING_STATES)
        return f"slurm: {queued} queued, {running} running"

    def wait(self) -> list[tuple[Cell, CellResult]]:
        self._top_up()
        time.sleep(POLL_S)
        finished, self._states = [], collections.Counter()
        for job_id, flight in list(self._flights.items()):
            result = self._outcome(flight)
            if result is None:
                continue
            result.row["slurm_job_id"] = job_id
            finished.append((flight.cell, result))
            del self._flights[job_id]
        return finished

    def cancel_all(self) -> None:
        """Ctrl-C: cancel every submitted job; nothing is recorded for them (--resume runs them)."""
        self._waiting.clear()
        for flight in self._flights.values():
            flight.job.cancel(check=False)
        self._flights.clear()

    def _top_up(self) -> None:
        batch = [self._waiting.popleft() for _ in range(min(self._parallelism - len(self._flights), len(self._waiting)))]
        if not batch:
            return
        jobs, now = [], time.time()
        with self._executor.batch():  # one array job on Slurm
            for cell, runtime in batch:
                request = None if self._profile is None else ProfileRequest(str(self._store.root), self._profile)
                task = CellTask(cell, runtime, request).to_json()
                jobs.append(self._executor.submit(run_cell_job, self._run_cell, task, str(self._store.root), self._timeout_s, now))
        for (cell, _), job in zip(batch, jobs):
            self._flights[job.job_id] = _Flight(cell, job, now)
        self._record_jobs([(job.job_id, cell.cell_id) for (cell, _), job in zip(batch, jobs)], now)

    def _record_jobs(self, pairs: list[tuple[str, str]], now: float) -> None:
        """<folder>/jobs.json: which job ran which cell (its submitit logs are <folder>/<job_id>_*)."""
        path = self.folder / "jobs.json"
        known = json.loads(path.read_text()) if path.exists() else []
        known += [{"job_id": j, "cell_id": c, "submitted_at": now} for j, c in pairs]
        write_atomic(path, json.dumps(known, indent=1).encode())

    def _outcome(self, flight: _Flight) -> CellResult | None:
        """The cell's result if its job has ended, else None (and its state counted)."""
        job = flight.job
        if job.paths.result_pickle.exists():
            return _job_result(job)
        state = str(job.state).split()[0].upper()  # sacct's "CANCELLED by 1234" → CANCELLED
        if state in GRACE_S:
            if flight.state_since is None or flight.state_since[0] != state:
                flight.state_since = (state, time.time())
            if time.time() - flight.state_since[1] < GRACE_S[state]:
                self._states["PENDING" if state == "PREEMPTED" else "RUNNING"] += 1
                return None
        elif not job.done():
            self._states[state] += 1
            return None
        if job.paths.result_pickle.exists():  # written between the two looks
            return _job_result(job)
        return ended_without_result(state, job.job_id, _last_line(job.paths.stderr))


def _job_result(job) -> CellResult:
    """The CellResult a job returned, or its failure: the job function itself raised (Slurm's
    time limit reached through submitit's handler, a broken environment on the node)."""
    from submitit.core.utils import UncompletedJobError

    try:
        return CellResult.from_json(job.result())
    except TaskFormatError as e:  # a job running another dsbench version: this cell fails, the sweep goes on
        return CellResult("error", f"slurm job {job.job_id} returned a result this runner cannot read: {e}", {}, [])
    except UncompletedJobError as e:  # FailedJobError included: the trace is in its message
        lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith(("-", "You can check", "or at paths", "  - "))]
        last = lines[-1].strip() if lines else type(e).__name__
        status = "timeout" if "timed-out" in last else "error"
        return CellResult(status, f"slurm job {job.job_id} failed: {last[:400]}", {}, [])


def ended_without_result(state: str, job_id: str, last_log_line: str) -> CellResult:
    """A job that ended and left no result: Slurm's own failure, as a dsbench status."""
    status = ENDED_STATES.get(state, "error")
    tail = f"; last log line: {last_log_line[:300]}" if last_log_line else ""
    return CellResult(status, f"slurm job {job_id} ended {state} without a result{tail}", {}, [])


def _last_line(path: Path) -> str:
    if not path.exists():
        return ""
    return next((line for line in reversed(path.read_text(errors="replace").splitlines()) if line.strip()), "")

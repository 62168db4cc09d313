"""The runner↔worker contract: what the runner sends a cell's process (CellTask) and what it
gets back (CellResult), each a dataclass with a strict JSON round-trip.

Strict both ways: every field is written, and a field missing or unknown on reading (a worker
from another dsbench version, a hand-edited file) is a TaskFormatError naming it, never a
silently dropped or defaulted value.
Light on purpose: the sweep's parent process imports this without torch.profiler or pandas.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from dsbench.cell import Cell

# The cell's own outcomes, then a cluster's failures of the job that ran it (dsbench/executors.py).
STATUSES = ("ok", "oom", "error", "timeout", "diverged", "killed", "preempted", "cancelled", "node_fail")


class TaskFormatError(ValueError):
    """A task or result file that does not match this dsbench's contract (a bug, not bad input)."""


@dataclass(frozen=True)
class ProfileOptions:
    steps: int = 3  # profiled steps (train, prefill); decode profiles one round of new_tokens tokens
    warmup: int = 1  # unprofiled-in-the-table steps first (optimizer state, caches, autotuning)


@dataclass(frozen=True)
class ProfileRequest:
    """Profile the cell after measuring it, into <root>/profiles/<cell_id> (dsbench/profile.py)."""

    root: str  # the results folder
    options: ProfileOptions = field(default_factory=ProfileOptions)


@dataclass(frozen=True)
class Runtime:
    """Facts of the machine and sweep a cell needs besides its identity (none of them hashed)."""

    peak_flops_per_s: float | None = None  # the peak MFU is taken against (runner's probe)
    peak_source: str = "unknown"
    calibration: dict | None = None  # hardware.calibrate()'s measurement, where one was taken
    threads: int = 0  # measure.threads: 0 = choose (contention.choose_threads)
    spawn_time: float | None = None  # time.time() when the runner started the process
    weights_dir: str | None = None  # where cells save and reuse trained weights (dsbench/checkpoints.py); None: nowhere


@dataclass(frozen=True)
class CellTask:
    cell: Cell
    runtime: Runtime = field(default_factory=Runtime)
    profile: ProfileRequest | None = None

    def to_json(self) -> str:
        profile = None if self.profile is None else dataclasses.asdict(self.profile)
        return json.dumps({"cell": json.loads(self.cell.to_json()), "runtime": dataclasses.asdict(self.runtime), "profile": profile})

    @staticmethod
    def from_json(text: str) -> CellTask:
        d = _fields(CellTask, json.loads(text), "task")
        profile = None
        if d["profile"] is not None:
            p = _fields(ProfileRequest, d["profile"], "task.profile")
            profile = ProfileRequest(p["root"], ProfileOptions(**_fields(ProfileOptions, p["options"], "task.profile.options")))
        runtime = Runtime(**_fields(Runtime, d["runtime"], "task.runtime"))
        cell = Cell.from_json(json.dumps(d["cell"]))
        if cell.cell_id != d["cell"].get("cell_id"):
            raise TaskFormatError(f"task.cell.cell_id: {d['cell'].get('cell_id')!r} is not the id of the cell described ({cell.cell_id})")
        return CellTask(cell, runtime, profile)


@dataclass
class CellResult:
    status: str  # one of STATUSES
    error: str | None  # the failure's last line; None when ok
    row: dict  # results-table columns the cell measured (results.py's schema)
    series: list  # point(...) rows: (step, metric, value, layer, index, domain)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise TaskFormatError(f"result.status: {self.status!r} is not one of {', '.join(STATUSES)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), allow_nan=True)

    @staticmethod
    def from_json(text: str) -> CellResult:
        d = _fields(CellResult, json.loads(text), "result")
        return CellResult(d["status"], d["error"], d["row"], [tuple(p) for p in d["series"]])


def _fields(cls, d, where: str) -> dict:
    """d, checked to hold exactly the fields of dataclass `cls`."""
    if not isinstance(d, dict):
        raise TaskFormatError(f"{where}: expected an object, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise TaskFormatError(f"{where}.{key}: unknown field; expected: {', '.join(names)}")
    for name in names:
        if name not in d:
            raise TaskFormatError(f"{where}.{name}: missing; expected: {', '.join(names)}")
    return d

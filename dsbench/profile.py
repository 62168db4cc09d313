"""Profile one cell: where its step time and memory go, part by part, against the machine's ceilings.

After a cell's measured run, the worker runs the same workload again for a few steps under
torch.profiler with the parts' ranges on (variants/profiling.py) and writes, in
<results>/profiles/<cell_id>/:

  trace.json.gz     Chrome/Perfetto trace (ui.perfetto.dev, chrome://tracing open it gzipped)
  parts.csv         time per step by part (forward, backward), with its roofline placement
  parts_by_path.csv the same by module path (blocks.3.attn …)
  memory.csv        parameters, gradients, optimizer state, activations, KV cache, step peak
  profile.json      the above plus overhead, coverage and ceilings
  cuda_memory_snapshot.pickle   (CUDA) allocator timeline for pytorch.org/memory_viz

Attribution. Forward: an op belongs to the innermost dsbench range around it. Backward: each
autograd node belongs to the range of the forward op that created it (same thread and autograd
sequence number, the link torch.profiler itself records). A range's own time is its duration
less that of the ranges and nodes inside it (CPU: host wall clock), or the kernel time of the
ops directly inside it (CUDA: device time). Step time outside every range is "other".
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gzip
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.autograd.profiler import record_function
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.profiler import ProfilerActivity

from dsbench import roofline
from dsbench.errors import ResultsError, UsageError
from dsbench.cell import Cell
from dsbench.task import ProfileOptions, Runtime
from dsbench.variants import profiling
from dsbench.workloads import workload_of

PROFILES_DIR = "profiles"
TRACE_FILE = "trace.json.gz"  # gzip: a tenth of the size; Perfetto and chrome://tracing open it as it is
EVALUATE = "autograd::engine::evaluate_function: "
OTHER = "other"
COVERAGE_TARGET = 0.90  # the share of step time the named parts must explain
TIMER_TOLERANCE = 0.05  # profiler's step total vs StepTimer's, same steps (host clock)


def profile_folder(results_root: Path, cell_id: str) -> Path:
    return Path(results_root) / PROFILES_DIR / cell_id


# --- the profiled pass ---


def profile_cell(ctx, cell: Cell, runtime: Runtime, folder: Path, unprofiled_step_s: float | None,
                 options: ProfileOptions = ProfileOptions()) -> dict:
    """Run the profiled pass on an already-built context; write the files; return the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    profiling.label_modules(ctx.model)
    workload = workload_of(cell)
    settings, repeats = workload.profiled(cell.workload, options)
    pass_ctx = dataclasses.replace(ctx, warmup=options.warmup, repeats=repeats, observe=False)
    on_cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    memory = MemoryRecorder(ctx.model, ctx.device)
    with profiling.enabled(), memory, torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        run = workload.run(pass_ctx, settings)
    trace_path = folder / TRACE_FILE
    prof.export_chrome_trace(str(trace_path))
    if on_cuda:
        memory.dump_snapshot(folder / "cuda_memory_snapshot.pickle")
    split = attribute(prof.events(), device_time=on_cuda)
    return write_profile(cell, runtime, folder, split, run, memory, trace_path, unprofiled_step_s, on_cuda)


class MemoryRecorder:
    """Sizes of what a step holds, read off live objects while the profiled pass runs:
    gradients (before each optimizer step), optimizer state (after it), tensors autograd
    saves for backward (per step, parameters excluded), and on CUDA the allocator's peak."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.gradients_bytes = self.optimizer_state_bytes = None
        self.saved_bytes_by_step: list[int] = []
        self.cuda_step_peaks: list[int] = []
        self._saved: dict[int, int] | None = None
        self._param_storages = {_storage_key(p) for p in model.parameters()}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> MemoryRecorder:
        # Global hooks: they see every optimizer the workload builds.
        self._stack.callback(register_optimizer_step_pre_hook(self._before_step).remove)
        self._stack.callback(register_optimizer_step_post_hook(self._after_step).remove)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        previous = profiling.STEP_HOOK
        profiling.STEP_HOOK = self.step
        self._stack.callback(setattr, profiling, "STEP_HOOK", previous)
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def step(self, kind: str):
        """Opens the step's profiler range; for a timed step, counts what it saves and peaks at."""
        timed = kind == profiling.STEP
        if timed:
            self._saved = {}
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                start = torch.cuda.memory_allocated(self.device)
        with record_function(f"{profiling.PREFIX}{kind}"):
            yield
        if timed:
            self.saved_bytes_by_step.append(sum(self._saved.values()))
            self._saved = None
            if self.device.type == "cuda":
                self.cuda_step_peaks.append(torch.cuda.max_memory_allocated(self.device) - start)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._saved is not None and tensor.device.type != "meta":
            key = _storage_key(tensor)
            if key not in self._param_storages:
                self._saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    def _before_step(self, optimizer, args, kwargs) -> None:
        grads = {_storage_key(p.grad): p.grad.untyped_storage().nbytes() for p in _params(optimizer) if p.grad is not None}
        self.gradients_bytes = sum(grads.values())

    def _after_step(self, optimizer, args, kwargs) -> None:
        tensors = {_storage_key(t): t.untyped_storage().nbytes() for state in optimizer.state.values()
                   for t in state.values() if isinstance(t, torch.Tensor)}
        self.optimizer_state_bytes = sum(tensors.values())

    def dump_snapshot(self, path: Path) -> None:
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)


def _params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# --- attribution ---


@dataclass
class Split:
    """Time in µs by (part, module path, backward?) over the profiled steps."""

    time_us: dict[tuple[str, str, bool], float]
    ops: dict[tuple[str, str, bool], int]  # profiled ops, nested ones too: the profiler pays for each
    n_steps: int
    step_total_us: float  # the steps' own durations (host) or the sum of attributed kernel time (device)
    basis: str


def attribute(events, device_time: bool = False) -> Split:
    """Split the timed steps' time among the parts (see the module docstring)."""
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    steps = sorted((e for e in cpu_events if e.name == profiling.PREFIX + profiling.STEP), key=lambda e: e.time_range.start)
    starts = [s.time_range.start for s in steps]
    tree = _Tree(cpu_events)
    time_us: dict[tuple[str, str, bool], float] = defaultdict(float)
    ops: dict[tuple[str, str, bool], int] = defaultdict(int)
    for e in cpu_events:
        step = _step_of(e, steps, starts)
        if step is None or e is step:
            continue
        owner = tree.owner(e)
        owner_key = tree.label(owner) if owner is not None else (OTHER, "", False)
        if not tree.is_node(e):
            ops[owner_key] += 1
        if device_time:
            if not tree.is_node(e):
                time_us[owner_key] += _self_device_us(e)
        elif tree.is_node(e):
            duration = e.time_range.end - e.time_range.start
            time_us[tree.label(e)] += duration
            time_us[owner_key] -= duration
    if not device_time:
        time_us[(OTHER, "", False)] += sum(s.time_range.end - s.time_range.start for s in steps)
    total = sum(time_us.values())
    return Split(dict(time_us), dict(ops), len(steps), total, "device kernel time" if device_time else "host wall clock")


def _self_device_us(e) -> float:
    return float(getattr(e, "self_device_time_total", 0.0) or 0.0)


def _step_of(e, steps, starts):
    i = bisect.bisect_right(starts, e.time_range.start) - 1
    if i >= 0 and e.time_range.start <= steps[i].time_range.end:
        return steps[i]
    return None


class _Tree:
    """Parent links between dsbench ranges and autograd nodes, with each node's label."""

    def __init__(self, cpu_events):
        self._owner: dict[int, object] = {}
        self._label: dict[int, tuple[str, str, bool]] = {}
        self._forward: dict[tuple[int, int], tuple[str, str]] = {}
        # Forward ops: (thread, sequence number) → their part. An op that creates no autograd node
        # (no_grad, integer outputs) shows the number the next node will take, so the node's
        # creator is the last op, in time, that shows it.
        for e in sorted(cpu_events, key=lambda e: e.time_range.start):
            if e.sequence_nr >= 0 and not e.name.startswith(EVALUATE) and not self._in_backward(e):
                rng = self._innermost_range(e)
                self._forward[(e.thread, e.sequence_nr)] = self._range_label(rng)[:2] if rng is not None else None

    @staticmethod
    def is_range(e) -> bool:
        parsed = profiling.parse(e.name)
        return parsed is not None and parsed[0] not in (profiling.STEP, profiling.WARMUP, profiling.PREFILL)

    def is_node(self, e) -> bool:
        return self.is_range(e) or e.name.startswith(EVALUATE)

    def owner(self, e):
        """The nearest enclosing node (range or autograd node), or None."""
        key = id(e)
        if key not in self._owner:
            parent = e.cpu_parent
            while parent is not None and not self.is_node(parent):
                parent = parent.cpu_parent
            self._owner[key] = parent
        return self._owner[key]

    def label(self, node) -> tuple[str, str, bool]:
        key = id(node)
        if key not in self._label:
            if node.name.startswith(EVALUATE):
                part, path = self._forward.get((node.fwd_thread, node.sequence_nr)) or ("autograd", "")
                self._label[key] = (part, path, True)
            else:
                part, path = self._range_label(node)
                self._label[key] = (part, path, self._in_backward(node))
        return self._label[key]

    def _range_label(self, rng) -> tuple[str, str]:
        """(part, path); a range without a path (fp8_quant) takes its nearest ancestor's."""
        part, path = profiling.parse(rng.name)
        parent = rng.cpu_parent
        while not path and parent is not None:
            if self.is_range(parent):
                path = profiling.parse(parent.name)[1]
            parent = parent.cpu_parent
        return part, path

    def _innermost_range(self, e):
        while e is not None and not self.is_range(e):
            e = e.cpu_parent
        return e

    @staticmethod
    def _in_backward(e) -> bool:
        e = e.cpu_parent
        while e is not None:
            if e.name.startswith(EVALUATE):
                return True
            e = e.cpu_parent
        return False


# --- tables ---


def parts_table(split: Split, costs: dict, roof: roofline.Ceilings) -> pd.DataFrame:
    """One row per part, in PARTS order: ms per step (forward, backward, total), share, roofline."""
    per_step = 1e3 * max(split.n_steps, 1)  # µs over n steps → ms per step
    rows: dict[str, dict] = {}
    for (part, _path, backward), us in split.time_us.items():
        row = rows.setdefault(part, {"part": part, "forward_ms": 0.0, "backward_ms": 0.0, "ops_per_step": 0.0})
        row["backward_ms" if backward else "forward_ms"] += us / per_step
    for (part, _path, _backward), n in split.ops.items():
        if part in rows:
            rows[part]["ops_per_step"] += n / max(split.n_steps, 1)
    order = list(profiling.PARTS) + ["autograd", OTHER]
    table = []
    for part in sorted(rows, key=lambda p: order.index(p) if p in order else len(order)):
        row = rows[part]
        row["total_ms"] = row["forward_ms"] + row["backward_ms"]
        row["share"] = row["total_ms"] * per_step / split.step_total_us if split.step_total_us else None
        row.update(roofline.place(costs.get(part), row["total_ms"] / 1e3, roof))
        row["description"] = profiling.PARTS.get(part, "step time outside every named range" if part == OTHER else "")
        table.append(row)
    return pd.DataFrame(table)


def paths_table(split: Split) -> pd.DataFrame:
    per_step = 1e3 * max(split.n_steps, 1)
    rows = [{"part": p, "path": path, "pass": "backward" if b else "forward", "ms": us / per_step}
            for (p, path, b), us in split.time_us.items()]
    return pd.DataFrame(rows).sort_values(["path", "part", "pass"]).reset_index(drop=True)


def memory_table(cell: Cell, memory: MemoryRecorder, run, trace_path: Path, on_cuda: bool) -> pd.DataFrame:
    params = {_storage_key(p): p.untyped_storage().nbytes() for p in memory.model.parameters()}
    kv_per_token = run.summary.get("kv_cache_bytes_per_token_measured")
    w = cell.workload
    slots = workload_of(cell).cache_slots(w)
    saved = max(memory.saved_bytes_by_step) if memory.saved_bytes_by_step else None
    peak = max(memory.cuda_step_peaks) if on_cuda and memory.cuda_step_peaks else step_peak_from_trace(trace_path)
    rows = [
        ("parameters", sum(params.values()), "live parameter storage"),
        ("gradients", memory.gradients_bytes, "live .grad storage before the optimizer step"),
        ("optimizer_state", memory.optimizer_state_bytes, "live optimizer.state tensors after a step"),
        ("activations", saved, "tensors autograd saved for backward in one step (parameters excluded)"),
        ("kv_cache", None if kv_per_token is None else kv_per_token * w["batch_size"] * slots,
         "live cache bytes per token × batch × cache slots"),
        ("step_peak", peak, "allocator peak during a step above its start (torch.cuda.max_memory_allocated)" if on_cuda
         else "peak of the profiler's allocation curve during a step, above the step's start"),
    ]
    return pd.DataFrame([{"category": c, "bytes": b, "how": how} for c, b, how in rows])


def read_trace(path: Path) -> dict:
    with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as f:
        return json.load(f)


def step_peak_from_trace(trace_path: Path) -> int | None:
    """Largest rise of 'Total Allocated' within a timed step, from the trace's [memory] events."""
    events = read_trace(trace_path)["traceEvents"]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e.get("name") == profiling.PREFIX + profiling.STEP]
    memory = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                    if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
    if not steps or not memory:
        return None
    times = [t for t, _ in memory]
    peaks = []
    for start, end in steps:
        before = bisect.bisect_left(times, start)
        base = memory[before - 1][1] if before else 0
        inside = [total for t, total in memory[before:bisect.bisect_right(times, end)]]
        peaks.append(max(inside, default=base) - base)
    return int(max(peaks))


def write_profile(cell: Cell, runtime: Runtime, folder: Path, split: Split, run, memory: MemoryRecorder,
                  trace_path: Path, unprofiled_step_s: float | None, on_cuda: bool) -> dict:
    roof = roofline.ceilings(dataclasses.asdict(runtime), cell.device)
    parts = parts_table(split, roofline.part_costs(cell), roof)
    mem = memory_table(cell, memory, run, trace_path, on_cuda)
    parts.to_csv(folder / "parts.csv", index=False)
    paths_table(split).to_csv(folder / "parts_by_path.csv", index=False)
    mem.to_csv(folder / "memory.csv", index=False)
    profiled_step_s = statistics.median(run.step_times_s)
    timer_total_us = 1e6 * (run.step_range_total_s if run.step_range_total_s is not None else sum(run.step_times_s))
    other = parts.loc[parts["part"] == OTHER, "total_ms"].sum()
    summary = {
        "cell_id": cell.cell_id,
        "label": cell.label(),
        "workload": cell.axes["workload"],
        "time_basis": split.basis,
        "steps_profiled": split.n_steps,
        "step_ms_profiled": 1e3 * profiled_step_s,
        "step_ms_unprofiled": None if unprofiled_step_s is None else 1e3 * unprofiled_step_s,
        "overhead": None if not unprofiled_step_s else profiled_step_s / unprofiled_step_s - 1,
        "ops_per_step": float(parts["ops_per_step"].sum()),
        # The profiler's cost falls per op: a part's inflation is about its ops × this.
        "overhead_us_per_op": (None if not unprofiled_step_s else
                               1e6 * (profiled_step_s - unprofiled_step_s) / max(float(parts["ops_per_step"].sum()), 1.0)),
        "breakdown_ms_per_step": split.step_total_us / 1e3 / max(split.n_steps, 1),
        "breakdown_vs_timer": split.step_total_us / timer_total_us if timer_total_us else None,
        "coverage": 1 - other / parts["total_ms"].sum() if parts["total_ms"].sum() else None,
        "ceilings": dataclasses.asdict(roof) | {"ridge_flops_per_byte": roof.ridge_flops_per_byte},
        "trace": trace_path.name,
        "parts": _records(parts),
        "memory": _records(mem),
    }
    (folder / "profile.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts with None, not NaN, where a value is missing."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_profile(folder: Path) -> dict:
    return json.loads((Path(folder) / "profile.json").read_text())


def row_columns(summary: dict, folder: Path, root: Path) -> dict:
    """The columns a cell's results row keeps of its profile."""
    return {
        "profile_dir": str(folder.relative_to(root)),
        "profile_overhead": summary["overhead"],
        "profile_coverage": summary["coverage"],
        "profile_step_ms": summary["step_ms_profiled"],
    }



# --- choosing the cell ---


def find_cell(cells: list[Cell], cell_id: str, where: str) -> Cell:
    """The cell whose id starts with `cell_id` (ids are 12 hex digits; a unique prefix will do)."""
    matches = [c for c in cells if c.cell_id.startswith(cell_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        sample = ", ".join(c.cell_id for c in cells[:3])
        raise UsageError(f"--cell: {cell_id!r} is no cell of {where} ({len(cells)} cells, e.g. {sample}; "
                             "`dsbench run sweep --dry-run` lists them)")
    raise UsageError(f"--cell: {cell_id!r} matches {len(matches)} cells of {where}; give more of the id")


def spec_of_results(folder: Path):
    """(spec, device) a results folder was run with, read back from its run.json."""
    from dsbench.results import ResultStore
    from dsbench.spec import SweepSpec

    info = ResultStore(folder).read_run_info() if Path(folder).is_dir() else None
    if info is None or "spec" not in info:
        raise ResultsError(f"--results: {str(folder)!r} is not a dsbench results folder (no run.json with a spec)")
    spec = SweepSpec.from_dict(info["spec"])
    return spec, info.get("probe", {}).get("device") or spec.device

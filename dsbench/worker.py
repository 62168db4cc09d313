"""Runs one cell in its own process: `python -m dsbench.worker TASK.json RESULT.json`.

A fresh process per cell gives clean peak-memory numbers and keeps a crash, an OOM or leaked
CUDA state inside the cell. The runner reads RESULT.json; if the process dies before writing
it (segfault, os._exit, SIGKILL), the runner records that itself.

Fault injection for the harness's own tests: DSBENCH_INJECT_FAULT="KIND@SELECTOR" makes cells
whose id or label contains SELECTOR fail with KIND (raise, oom, hang, nan, segfault, exit);
"KIND@SELECTOR@rank=R" only on rank R of a multi-process cell.

A multi-process cell (parallel.ep = R, dsbench/distributed.py) runs this module on every rank
under torchrun: rank 0 writes RESULT.json with what every rank measured; a rank that fails
writes its error there first (the first failing rank wins) and exits non-zero, so torchrun
ends the other ranks and the cell gets that rank's error, not a hang.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import traceback

import torch

from dsbench import accounting, compiled, distributed, roofline
from dsbench.errors import DataError, UsageError
from dsbench.kernels import choice as kernel_choice
from dsbench.contention import ContentionMeter, choose_threads
from dsbench.data import load_dataset
from dsbench.measure import NvmlSampler, current_rss_bytes, peak_memory, reset_peak_memory, summarize
from dsbench.cell import Cell
from dsbench.task import CellResult, CellTask, ProfileRequest, Runtime
from dsbench.checkpoints import WeightCache
from dsbench.atomic import write_atomic
from dsbench.variants.decoder import build_model
from dsbench.variants.precision import precision_of
from dsbench.workloads import Context, Diverged, WorkloadRun, point, workload_of

OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, one-line message) for an exception raised inside a cell."""
    message = f"{type(exc).__name__}: {exc}".strip().splitlines()
    last_line = (message[-1] if message else type(exc).__name__)[:500]
    if isinstance(exc, Diverged):
        return "diverged", last_line
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or any(m in str(exc).lower() for m in OOM_MESSAGES):
        return "oom", last_line
    return "error", last_line


def inject_fault(cell: Cell, model: torch.nn.Module, rank: int = 0) -> None:
    """Apply the first DSBENCH_INJECT_FAULT entry ("KIND@SELECTOR[@rank=R]", comma-separated) that matches."""
    for entry in filter(None, os.environ.get("DSBENCH_INJECT_FAULT", "").split(",")):
        kind, _, selector = entry.partition("@")
        selector, _, on_rank = selector.partition("@rank=")
        if on_rank and int(on_rank) != rank:
            continue
        if selector in cell.cell_id or selector in cell.label():
            _apply_fault(kind, cell, model)
            return


FAULT_KINDS = ("raise", "oom", "hang", "nan", "segfault", "exit")


def check_faults(value: str) -> None:
    """DSBENCH_INJECT_FAULT, checked before a sweep starts: an entry the worker would silently
    ignore (an unknown kind, no selector, a rank that is not a number) is one line instead."""
    for entry in filter(None, value.split(",")):
        kind, at, selector = entry.partition("@")
        selector, has_rank, on_rank = selector.partition("@rank=")
        if kind not in FAULT_KINDS or not at or not selector or (has_rank and not on_rank.isdigit()):
            raise UsageError(f"DSBENCH_INJECT_FAULT: {entry!r} is not KIND@SELECTOR[@rank=R]; KIND one of {', '.join(FAULT_KINDS)}")


def _apply_fault(kind: str, cell: Cell, model: torch.nn.Module) -> None:
    if kind == "raise":
        raise RuntimeError(f"injected fault in {cell.label()}")
    if kind == "oom":  # a real allocation failure: ask the allocator for 16 TiB
        torch.empty(1 << 44, dtype=torch.uint8, device=cell.device)
    if kind == "hang":
        time.sleep(1e6)
    if kind == "nan":
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    if kind == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "exit":
        os._exit(3)


def measure_cell(cell: Cell, runtime: Runtime, profile: ProfileRequest | None = None,
                 ranks: distributed.Ranks | None = None) -> tuple[dict, list]:
    """Build the model, run the workload, and return (metrics row, series rows).

    profile: afterwards, profile the cell (dsbench/profile.py). ranks: this process is one rank
    of a multi-process cell (dsbench/distributed.py), whose process group it has joined. Every
    op-family call goes through the cell's own kernel chooser (its `kernels.*` pins, else auto).
    """
    chooser = kernel_choice.Chooser(pins=dict(cell.measure.get("kernels", {})),
                                    after_trials=lambda: reset_peak_memory(torch.device(cell.device)))
    with kernel_choice.use(chooser) as kernels:
        return _measure_cell(cell, runtime, profile, ranks, kernels)


def check_data_unchanged(cell: Cell) -> None:
    """A data file replaced while the sweep runs: this cell fails in one line rather than train on
    the new contents under the digest (and cell id) the sweep recorded for the old. Failing it, not
    recording the new digest, keeps one corpus per run: --resume then refuses the folder too."""
    from dsbench.data import data_digest

    if cell.data_digest is None:
        return
    now = data_digest(cell.data)
    if now != cell.data_digest:
        raise DataError(f"data: {cell.data!r} changed while the sweep ran (sha256 {cell.data_digest[:12]}… when it started, "
                        f"{str(now)[:12]}… now); this cell was not run on it: restore the file, or run the sweep again into a new --out")


def _measure_cell(cell: Cell, runtime: Runtime, profile: ProfileRequest | None, ranks: distributed.Ranks | None,
                  kernels: kernel_choice.Chooser) -> tuple[dict, list]:
    device = torch.device(cell.device)
    precision = precision_of(cell.model)
    workload = workload_of(cell)
    threads, threads_source = choose_threads(runtime.threads) if ranks is None else distributed.threads_per_rank(runtime.threads, ranks)
    torch.set_num_threads(threads)
    setup_start = time.perf_counter()
    data = load_dataset(cell.data, cell.seed)
    check_data_unchanged(cell)  # after loading: what was read is what the cell's id says
    data.check_vocab(cell.model.vocab_size)
    data = data if ranks is None else distributed.RankSlice(data, ranks)
    torch.manual_seed(cell.seed)
    model = build_model(cell.model).to(device)
    if not (workload.trains or workload.trains_first):
        model = model.to(precision.inference_dtype)
    placements = None
    if ranks is not None and cell.parallel.get("redundant_experts"):  # prefill cells only (spec.parallel_of)
        calibration = data.batch(1, cell.workload["batch_size"], cell.workload["seq_len"])  # the timed steps use batch 0
        placements = distributed.eplb_placements(model, ranks, calibration.inputs.to(device), cell.parallel["redundant_experts"])
    shards = distributed.shard(model, ranks, placements)
    inject_fault(cell, model, 0 if ranks is None else ranks.rank)
    watch = compiled.compile_model(model, cell.measure.get("compile", "eager"), workload.trains)
    weights = WeightCache(runtime.weights_dir, cell.seed, cell.data) if runtime.weights_dir and ranks is None else None
    ctx = Context(model, data, device, precision, cell.measure["warmup"], cell.measure["repeats"], weights=weights, ranks=ranks)
    setup_s = time.perf_counter() - setup_start
    rss_before = current_rss_bytes()
    reset_peak_memory(device)
    workload_start = time.perf_counter()
    with NvmlSampler(device) as nvml, ContentionMeter(threads) as contention:
        if watch is not None:
            watch.meter = contention  # what the compiling steps ran beside is not what the timed ones competed with
        run = workload.run(ctx, cell.workload)
    workload_s = time.perf_counter() - workload_start
    ep_row = {}
    if ranks is not None:
        ep_row = distributed.ep_columns(shards, ranks, run, ctx.warmup, workload.trains)
        run.tokens_per_step *= ranks.world  # the cell's step: every rank's batch (timed on rank 0)
    row = {"setup_s": setup_s, "workload_wall_s": workload_s, "rss_before_workload_bytes": rss_before,
           "torch_num_threads": threads, "threads_source": threads_source}
    row.update(timing_columns(run))
    row.update(ep_row)
    row.update(contention.columns())
    row.update(peak_memory(device))
    row.update(energy_columns(nvml.summary(), run))
    row.update(mfu_columns(cell, row["tokens_per_s_median"], runtime, 1 if ranks is None else ranks.world))
    row.update(roofline.light_columns(cell, dataclasses.asdict(runtime), row["step_time_ms_median"] / 1e3,
                                      1 if ranks is None else ranks.world, row.get("gpu_busy_fraction")))
    row.update(run.summary)
    row.update(kernels.columns())
    if watch is not None:  # an eager cell's row has no compile columns, as before they existed
        row.update(watch.columns())
    row["emulated"] = precision.emulated_on(device)
    row["speed_note"] = precision.speed_note(device)
    series = [point(s, "step_time_ms", 1e3 * t) for s, t in enumerate(run.step_times_s)] + run.series
    # A multi-process cell is measured, not profiled; so is a compiled one (its graphs hold no profiler ranges).
    if profile is not None and ranks is None and watch is None:
        row.update(profile_columns(ctx, cell, runtime, profile, row["step_time_ms_median"] / 1e3))
    return row, series


def profile_columns(ctx: Context, cell: Cell, runtime: Runtime, profile: ProfileRequest, unprofiled_step_s: float) -> dict:
    """Profile the cell after its measured run (so the profiler never touches measured steps)."""
    from pathlib import Path

    from dsbench import profile as profile_lib

    root = Path(profile.root)
    folder = profile_lib.profile_folder(root, cell.cell_id)
    summary = profile_lib.profile_cell(ctx, cell, runtime, folder, unprofiled_step_s, profile.options)
    return profile_lib.row_columns(summary, folder, root)


def timing_columns(run: WorkloadRun) -> dict:
    """Step-time statistics in ms and the throughput they imply (p10 tokens/s ↔ p90 time)."""
    stats = summarize(run.step_times_s)
    tokens = run.tokens_per_step
    return {
        "step_time_ms_median": 1e3 * stats["median"],
        "step_time_ms_p10": 1e3 * stats["p10"],
        "step_time_ms_p90": 1e3 * stats["p90"],
        "step_time_ms_mean": 1e3 * stats["mean"],
        "step_time_n": stats["n"],
        "step_time_spread": stats["p90"] / stats["p10"] if stats["p10"] > 0 else None,  # p90/p10 (contention.SPREAD_LIMIT)
        "measured_work_s": float(sum(run.step_times_s)),
        "tokens_per_s_median": tokens / stats["median"],
        "tokens_per_s_p10": tokens / stats["p90"],
        "tokens_per_s_p90": tokens / stats["p10"],
    }


def energy_columns(nvml: dict, run: WorkloadRun) -> dict:
    energy = nvml.get("energy_j")
    tokens = run.tokens_per_step * len(run.step_times_s)
    return {**nvml, "energy_j_per_token": None if energy is None else energy / tokens}


def mfu_columns(cell: Cell, tokens_per_s: float, runtime: Runtime, devices: int = 1) -> dict:
    """MFU against the peak of the devices the cell ran on (a multi-process cell: one per rank)."""
    achieved = accounting.flops_per_token(cell) * tokens_per_s
    peak = runtime.peak_flops_per_s * devices if runtime.peak_flops_per_s else None
    return {
        "model_flops_per_s": achieved,
        "peak_flops_per_s": peak,
        "peak_source": runtime.peak_source,
        "mfu": achieved / peak if peak else None,
    }


def run_task(task: CellTask) -> CellResult:
    startup_s = time.time() - task.runtime.spawn_time if task.runtime.spawn_time is not None else None
    try:
        row, series = measure_cell(task.cell, task.runtime, task.profile, distributed.join(task.cell))
        return CellResult("ok", None, {"worker_startup_s": startup_s, **row}, series)
    except Exception as exc:  # noqa: BLE001 — every failure becomes a recorded status
        traceback.print_exc()  # the whole trace goes to the cell's log; the row keeps the last line
        status, message = classify(exc)
        if task.cell.ep > 1:
            message = distributed.failure_message(message)
        return CellResult(status, message, {"worker_startup_s": startup_s}, [])


def write_first(path: str, text: str) -> None:
    """Write path unless it exists (the first failing rank's error is the cell's)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)  # atomic, and fails if another rank got there first
    except FileExistsError:
        pass
    os.unlink(tmp)


def main(argv: list[str]) -> int:
    task_path, result_path = argv
    with open(task_path) as f:
        task = CellTask.from_json(f.read())
    result = run_task(task)
    if task.cell.ep == 1:
        write_atomic(result_path, result.to_json())
        return 0
    if result.status != "ok":  # non-zero: torchrun then ends the other ranks
        write_first(result_path, result.to_json())
        return 1
    if os.environ.get("RANK") == "0":
        write_atomic(result_path, result.to_json())
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is on disk: skip interpreter teardown (torch's takes ~0.5 s a cell).
    os._exit(code)

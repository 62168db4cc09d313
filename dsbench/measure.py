"""Step timing, summary statistics, memory peaks and NVML power/energy for one cell.

Imported by the per-cell worker subprocess, so it needs only the stdlib, numpy and torch;
pynvml is imported lazily and its absence (or failure) only turns fields into None.

Conventions:
  * times are seconds (`_s`), memory bytes (`_bytes`), power watts (`_w`), energy joules (`_j`);
  * a field that cannot be measured here is None, never 0.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dsbench import compiled
from dsbench.variants import profiling

__all__ = [
    "StepTimer",
    "summarize",
    "sync",
    "reset_peak_memory",
    "peak_memory",
    "current_rss_bytes",
    "NvmlSampler",
]


def sync(device: torch.device | str) -> None:
    """Wait until all queued work on `device` has finished (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------
# Step timing


class StepTimer:
    """Times repeated steps: `with timer.step(): ...` records one sample.

    CUDA: each step records a pair of `torch.cuda.Event(enable_timing=True)` on the current
    stream; nothing synchronizes until `samples_s()`, so timing adds no per-step host stall.
    An event pair measures stream time between the two records, i.e. the step's GPU time
    (plus any idle gap when the host launches slower than the GPU runs).
    CPU (and other devices): `time.perf_counter` around the block, after a `sync`.

    Warm-up: time warm-up steps with `record=False` (they run but leave no sample), or call
    `reset()` to drop everything recorded so far. A step during which torch.compile compiled or
    recorded a CUDA graph (dsbench/compiled.py), or a part did once-only work it announced
    (profiling.note_untimed_work: the MoE dispatch timing its paths), leaves no sample either.
    """

    def __init__(self, device: torch.device | str, kind: str = profiling.STEP):
        self.device = torch.device(device)
        self.kind = kind  # the profiler range around each step (variants/profiling.py)
        self._use_events = self.device.type == "cuda"
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._samples_s: list[float] = []
        self.dropped = 0  # timed steps left out: something compiled, or a part did once-only work (measure.py)
        self.timed_steps = 0  # steps run with record=True, dropped or not
        self.dropped_steps: list[int] = []  # their ordinals (0 = the first timed step) that left no sample
        self._ordinals: list[int] = []  # the ordinal of each sample, pending or not

    @contextlib.contextmanager
    def step(self, record: bool = True) -> Iterator[None]:
        watch = compiled.active_watch()
        before, untimed = len(self), profiling.untimed_work()
        # A compiled cell: a step during which something compiled leaves no sample.
        watched = watch.step(record and self.kind != profiling.WARMUP) if watch is not None else contextlib.nullcontext()
        with profiling.step_range(self.kind if record else profiling.WARMUP), watched:
            compiled.step_begin()
            yield from self._step(record)
        dropped = (watch is not None and watched.compiled) or profiling.untimed_work() != untimed
        if len(self) > before:
            ordinal = self.timed_steps
            self.timed_steps += 1
            if dropped:
                self._drop_last()
                self.dropped += 1
                self.dropped_steps.append(ordinal)
            else:
                self._ordinals.append(ordinal)

    def _step(self, record: bool) -> Iterator[None]:
        if not record:
            yield
        elif self._use_events:
            yield from self._step_events()
        else:
            yield from self._step_host_clock()

    def _drop_last(self) -> None:
        (self._pending or self._samples_s).pop()

    def _step_events(self) -> Iterator[None]:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(self.device)
        start.record(stream)
        yield
        end.record(stream)
        self._pending.append((start, end))

    def _step_host_clock(self) -> Iterator[None]:
        sync(self.device)  # a no-op on CPU; fences earlier async work on mps
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self._samples_s.append(time.perf_counter() - t0)

    def samples_s(self) -> list[float]:
        """All recorded step times in seconds; on CUDA this is the one synchronize."""
        if self._pending:
            sync(self.device)
            # elapsed_time is in milliseconds.
            self._samples_s.extend(s.elapsed_time(e) / 1e3 for s, e in self._pending)
            self._pending.clear()
        return list(self._samples_s)

    def samples_without(self, steps: set[int]) -> list[float]:
        """samples_s() less the samples of the timed steps whose ordinals are in `steps` (another
        rank's dropped steps: its once-only work held this rank at the all-to-all too)."""
        return [t for t, ordinal in zip(self.samples_s(), self._ordinals) if ordinal not in steps]

    def reset(self) -> None:
        """Drop every sample recorded so far (e.g. the warm-up steps)."""
        self._pending.clear()
        self._samples_s.clear()
        self._ordinals.clear()
        self.timed_steps, self.dropped_steps = 0, []

    def __len__(self) -> int:
        return len(self._pending) + len(self._samples_s)


def summarize(samples: Sequence[float]) -> dict:
    """Median, p10, p90, mean, min, max and n of `samples`.

    Percentiles use numpy's "linear" method (interpolating between closest ranks, numpy's
    default). Outlier rule: none is dropped; every sample counts, so the spread shows them.
    Raises ValueError on empty input.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError("summarize() needs at least one sample")
    p10, median, p90 = np.percentile(x, [10, 50, 90], method="linear")
    return {
        "median": float(median),
        "p10": float(p10),
        "p90": float(p90),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (H100: 50 MiB, H200 60 MiB, B200: 126 MiB)


def time_calls(fn, device: torch.device, reps: int, warmup: int = 3) -> dict:
    """summarize() of reps timed calls of fn(), after `warmup` untimed ones (compilation and
    autotuning excluded). CUDA: CUDA events per call, and the L2 flushed before each (a 256 MiB
    buffer zeroed outside the timed region), so operands come from HBM, as in Triton's do_bench."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    for _ in range(warmup):
        fn()
    timer = StepTimer(device)
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        with timer.step():
            fn()
    return summarize(timer.samples_s())


def bench_device(requested: str) -> tuple[torch.device, str, str]:
    """A kernel benchmark's --device (auto | cpu | cuda) → (device, its name, how time_calls times there)."""
    device = torch.device("cuda" if requested == "auto" and torch.cuda.is_available() else ("cpu" if requested == "auto" else requested))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    flush = "L2 flushed before every timed call (256 MiB zeroed)" if device.type == "cuda" else "no cache flush on CPU"
    return device, name, flush


def print_and_save(rows: list[dict], print_table, json_path: str | None, device_name: str, flush: str) -> None:
    """A kernel benchmark's ending: its table, and the rows as JSON where --json names a file."""
    print_table(rows)
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump({"device": device_name, "flush": flush, "rows": rows}, f, indent=2)


# ---------------------------------------------------------------------------------------------
# Memory

_PROC_STATUS = "/proc/self/status"
_PROC_STATM = "/proc/self/statm"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"


def reset_peak_memory(device: torch.device | str) -> None:
    """Restart peak-memory tracking: CUDA allocator peaks, and the process's RSS high-water mark.

    The RSS reset writes "5" to /proc/self/clear_refs (Linux >= 4.0); where that is not
    possible the RSS peak stays the lifetime peak of this (per-cell) process.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open(_PROC_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device | str) -> dict:
    """Peak memory since the last `reset_peak_memory` (or process start).

    `peak_rss_bytes` is VmHWM from /proc/self/status where present (the value clear_refs
    resets), else `getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux, bytes on macOS).
    `peak_mem_bytes` is the headline: CUDA max allocated on a GPU, peak RSS otherwise.
    """
    device = torch.device(device)
    rss_bytes = _peak_rss_bytes()
    if device.type == "cuda":
        allocated = int(torch.cuda.max_memory_allocated(device))
        reserved = int(torch.cuda.max_memory_reserved(device))
        headline = allocated
    else:
        allocated = reserved = None
        headline = rss_bytes
    return {
        "cuda_max_allocated_bytes": allocated,
        "cuda_max_reserved_bytes": reserved,
        "peak_rss_bytes": rss_bytes,
        "peak_mem_bytes": headline,
    }


def _peak_rss_bytes() -> int:
    hwm_kib = _proc_status_kib("VmHWM")
    if hwm_kib is not None:
        return hwm_kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def _proc_status_kib(field: str) -> int | None:
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # "VmHWM:   616888 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int | None:
    """This process's resident set size now, from /proc/self/statm; None where absent."""
    try:
        with open(_PROC_STATM) as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# NVML power / energy / device memory

# numpy 2 renamed trapz to trapezoid; dsbench supports numpy >= 1.24.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz

_NVML_FIELDS = (
    "power_w_mean", "power_w_max", "energy_j", "energy_source", "gpu_mem_used_bytes_max", "gpu_busy_fraction",
)


def _nvml_handle(pynvml, device: torch.device):
    """NVML handle of the torch CUDA device.

    Rule: match by UUID (torch's device properties -> nvmlDeviceGetHandleByUUID), which is
    right whatever CUDA_VISIBLE_DEVICES (indices or UUIDs) and CUDA_DEVICE_ORDER say. If that
    fails, map the torch index through an integer CUDA_VISIBLE_DEVICES list, else use it as is
    (NVML enumerates in PCI bus order, so this fallback assumes CUDA_DEVICE_ORDER=PCI_BUS_ID).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        if not uuid.startswith(("GPU-", "MIG-")):
            uuid = "GPU-" + uuid
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        pass
    return pynvml.nvmlDeviceGetHandleByIndex(_visible_index(index))


def _visible_index(index: int) -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return index
    try:
        return [int(tok) for tok in visible.split(",")][index]
    except (ValueError, IndexError):
        return index


class NvmlSampler:
    """Context manager sampling NVML power and device memory around a timed region.

    On a CUDA device with pynvml importable and nvmlInit succeeding, a daemon thread reads
    power (nvmlDeviceGetPowerUsage, mW) and memory used (nvmlDeviceGetMemoryInfo, whole device,
    all processes) every `interval_s`; the total-energy counter (mJ, Volta and newer) is read
    on entry and exit. Energy comes from that counter where supported ("nvml_counter"), else
    from the trapezoid integral of sampled power over time ("power_integral"). The counter
    updates every 20-100 ms, so regions much shorter than that are not resolved.

    Anywhere else (CPU, no pynvml, no driver, unsupported query) the fields are None. It never
    raises because of NVML.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.05):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self._nvml = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._power_samples: list[tuple[float, float]] = []  # (perf_counter s, W)
        self._mem_used_bytes_max: int | None = None
        self._busy_samples: list[float] = []  # NVML utilization.gpu ÷ 100 per sample
        self._energy_start_mj: int | None = None
        self._energy_end_mj: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "NvmlSampler":
        if self.device.type == "cuda" and self._open():
            self._energy_start_mj = self._read_energy_mj()
            self._sample_once()
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1.0)
        self._sample_once()
        self._energy_end_mj = self._read_energy_mj()
        self._close()

    def _open(self) -> bool:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:
            return False
        try:
            self._handle = _nvml_handle(pynvml, self.device)
        except Exception:
            pynvml.nvmlShutdown()
            return False
        self._nvml = pynvml
        return True

    def _close(self) -> None:
        # nvmlInit/nvmlShutdown are reference counted, so this pairs with our own init only.
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    # -- sampling --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_once()

    def _sample_once(self) -> None:
        try:
            power_w = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3  # mW -> W
            self._power_samples.append((time.perf_counter(), power_w))
        except Exception:
            pass
        try:
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self._mem_used_bytes_max = max(used, self._mem_used_bytes_max or 0)
        except Exception:
            pass
        try:  # the share of NVML's last sample period (1/6 s to 1 s) in which a kernel ran
            self._busy_samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100)
        except Exception:
            pass

    def _read_energy_mj(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None

    # -- results ---------------------------------------------------------------------------

    def summary(self) -> dict:
        """power_w_mean, power_w_max, energy_j, energy_source, gpu_mem_used_bytes_max, gpu_busy_fraction."""
        out = dict.fromkeys(_NVML_FIELDS)
        out["gpu_mem_used_bytes_max"] = self._mem_used_bytes_max
        if len(self._busy_samples) > 1:  # the first sample looks back at what ran before the region
            out["gpu_busy_fraction"] = float(np.mean(self._busy_samples[1:]))
        watts = [w for _, w in self._power_samples]
        if watts:
            out["power_w_mean"] = float(np.mean(watts))
            out["power_w_max"] = float(np.max(watts))
        energy_j, source = self._energy_j()
        out["energy_j"], out["energy_source"] = energy_j, source
        return out

    def _energy_j(self) -> tuple[float | None, str | None]:
        if self._energy_start_mj is not None and self._energy_end_mj is not None:
            return (self._energy_end_mj - self._energy_start_mj) / 1e3, "nvml_counter"
        if len(self._power_samples) >= 2:
            t_s, w = np.array(self._power_samples).T
            return float(_trapezoid(w, t_s)), "power_integral"
        return None, None

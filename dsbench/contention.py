"""What a measurement competed with: other processes, the hypervisor, its own threads.

A step time means something only if the process got the CPU it asked for. Each cell records,
over its workload (warm-up and timed steps):

- `cpu_share`: the CPU time the process got ÷ (wall time × its threads). A single-threaded
  cell on a quiet core gets ~0.97–1.0; a starved one much less.
- `cpu_others_cores`: how many cores everything else kept busy meanwhile (/proc/stat busy time
  less the cell's own), and `cpu_steal_fraction`: the share the hypervisor gave to other guests.
- `ctx_switches_involuntary_per_s`: preemptions of the cell's process.
- `loadavg_1m` at the end (a lagging, one-minute view; recorded for context, not used to flag).

`contended` is true, with the reason in `contention`, when the cell got less than
CPU_SHARE_MIN of one core (cpu_share × threads: a process whose ops are too small to use its
second thread gets one core and is not starved), or others needed more cores than were free
beside the cell's threads (by more than OTHERS_SLACK_CORES: how a starved multi-threaded cell
shows), or steal passed STEAL_MAX. The same rule is applied to each WINDOW_S-long window of the
cell, sampled every SAMPLE_S by a background thread: a neighbour that starts mid-cell and would
be diluted in the whole-cell average still marks the cell (the reason then says "in a
WINDOW_S window from t = …"). A neighbour that runs less than WINDOW_S may go unseen. Separately, a
step-time p90/p10 above SPREAD_LIMIT marks a noisy measurement (pyperf's habit of warning on
unstable samples). Both are warnings: the run's summary, `dsbench check` and the report name
the cells; nothing is silently compared.

Thread count: `measure.threads = 0` (the default) gives each cell the cores that are free when
it starts (the machine's cores less those others keep busy, sampled over FREE_CORES_WINDOW_S),
unless OMP_NUM_THREADS is set; the choice and its reason are recorded per cell.

Linux reads /proc/stat; elsewhere the machine-wide columns are None (never zero).
"""

from __future__ import annotations

import os
import resource
import threading
import time

CPU_SHARE_MIN = 0.90
OTHERS_SLACK_CORES = 0.5
STEAL_MAX = 0.05
SPREAD_LIMIT = 2.0  # step-time p90/p10 above this is flagged as noisy
FREE_CORES_WINDOW_S = 0.2
SAMPLE_S = 0.1  # the background sampler's period (reads /proc/stat and getrusage: ~50 µs each)
WINDOW_S = 1.0  # the shortest span judged alone: long enough that one scheduler hiccup is not a neighbour


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _proc_stat() -> tuple[float, float, float] | None:
    """(busy, steal, total) seconds of all CPUs since boot, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
    busy = user + nice + system + irq + softirq  # guest time is already inside user
    return busy / tick, steal / tick, (busy + idle + iowait + steal) / tick


def _own_cpu_s() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_nivcsw


def busy_cores_now(window_s: float = FREE_CORES_WINDOW_S) -> float | None:
    """Cores kept busy by other processes over a short window (this process sleeps meanwhile)."""
    first, (own0, _) = _proc_stat(), _own_cpu_s()
    if first is None:
        return None
    time.sleep(window_s)
    second, (own1, _) = _proc_stat(), _own_cpu_s()
    wall = second[2] - first[2]
    cores = usable_cores()
    return max(0.0, (second[0] - first[0] - (own1 - own0)) / max(wall / cores, 1e-9)) if wall > 0 else None


def choose_threads(requested: int) -> tuple[int, str]:
    """(threads, why) for a cell: the spec's measure.threads, else OMP_NUM_THREADS, else the free cores."""
    cores = usable_cores()
    if requested > 0:
        return requested, "measure.threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    busy = busy_cores_now()
    if busy is None:
        return cores, f"all {cores} cores (no /proc/stat to see the busy ones)"
    free = max(1, cores - round(busy))
    return free, f"free cores: {free} of {cores} (others kept {busy:.1f} busy at the start)"


# Set to 1, the meter takes no samples during the cell (only the whole-cell rule applies): the
# instruction-count gate sets it, as a sampler wakes once per SAMPLE_S of wall time and so adds
# instructions that grow with how slowly valgrind runs (dsbench/instructions.py count_env).
NO_SAMPLER_ENV = "DSBENCH_NO_CONTENTION_SAMPLER"


class ContentionMeter:
    """`with ContentionMeter(threads) as meter: <workload>`; then `meter.columns()`."""

    def __init__(self, threads: int):
        self.threads = threads
        # Left out (`leave_out`): a compiled cell's compiling steps, single-threaded and beside the
        # compiler's own processes, which say nothing of what the timed steps competed with.
        self._left_wall = self._left_own = self._left_nivcsw = 0.0
        self._left_stat = (0, 0, 0)

    def __enter__(self) -> ContentionMeter:
        self._stat0, (self._own0, self._nivcsw0) = _proc_stat(), _own_cpu_s()
        self._wall0 = time.perf_counter()
        self._samples, self._left_spans, self._stop = [self.snapshot()], [], threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="dsbench-contention", daemon=True)
        if os.environ.get(NO_SAMPLER_ENV) != "1":
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall0
        self._stat1, (self._own1, self._nivcsw1) = _proc_stat(), _own_cpu_s()
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join()
        self._samples.append(self.snapshot())

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._samples.append(self.snapshot())

    def snapshot(self) -> tuple:
        return _proc_stat(), _own_cpu_s(), time.perf_counter()

    def leave_out(self, before: tuple, after: tuple) -> None:
        """Leave the span between two snapshots out of every column."""
        (stat0, (own0, nivcsw0), wall0), (stat1, (own1, nivcsw1), wall1) = before, after
        self._left_spans.append((wall0, wall1))
        self._left_wall += wall1 - wall0
        self._left_own += own1 - own0
        self._left_nivcsw += nivcsw1 - nivcsw0
        if stat0 is not None and stat1 is not None:
            self._left_stat = tuple(left + b - a for left, a, b in zip(self._left_stat, stat0, stat1))

    def columns(self) -> dict:
        own = self._own1 - self._own0 - self._left_own
        wall = max(self.wall_s - self._left_wall, 1e-9)
        row = {
            "cpu_share": own / (wall * self.threads),
            "ctx_switches_involuntary_per_s": (self._nivcsw1 - self._nivcsw0 - self._left_nivcsw) / wall,
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cpu_others_cores": None,
            "cpu_steal_fraction": None,
        }
        if self._stat0 is not None and self._stat1 is not None:
            busy, steal, total = (b - a - left for a, b, left in zip(self._stat0, self._stat1, self._left_stat))
            row["cpu_others_cores"] = max(0.0, (busy - own) / wall)
            row["cpu_steal_fraction"] = steal / total if total > 0 else 0.0
        row["contention"] = contention_reason(row, self.threads) or window_reason(
            self._samples, self.threads, self._left_spans, self._wall0)
        row["contended"] = row["contention"] is not None
        return row


def window_reason(samples: list[tuple], threads: int, left_spans=(), start: float = 0.0) -> str | None:
    """contention_reason of the first contended WINDOW_S window of snapshots ((stat, (own cpu,
    nivcsw), wall) each), windows overlapping a left-out span skipped; None when none is."""
    j = 0
    for i, (stat0, (own0, _), wall0) in enumerate(samples):
        j = max(j, i + 1)
        while j < len(samples) and samples[j][2] - wall0 < WINDOW_S:
            j += 1
        if j == len(samples):
            return None
        stat1, (own1, _), wall1 = samples[j]
        if stat0 is None or stat1 is None or any(a < wall1 and wall0 < b for a, b in left_spans):
            continue
        wall, own = wall1 - wall0, own1 - own0
        row = {"cpu_share": own / (wall * threads), "cpu_others_cores": max(0.0, (stat1[0] - stat0[0] - own) / wall),
               "cpu_steal_fraction": (stat1[1] - stat0[1]) / max(stat1[2] - stat0[2], 1e-9)}
        if reason := contention_reason(row, threads):
            return f"in a {wall:.1f} s window from t = {wall0 - start:.1f} s: {reason}"
    return None


def contention_reason(row: dict, threads: int) -> str | None:
    """Why a measurement was contended, in words; None when it was not."""
    reasons = []
    cores_got = row["cpu_share"] * threads
    if cores_got < CPU_SHARE_MIN:
        reasons.append(f"got {cores_got:.0%} of a core with {threads} thread(s) (limit {CPU_SHARE_MIN:.0%})")
    free = usable_cores() - threads
    others = row.get("cpu_others_cores")
    if others is not None and others > free + OTHERS_SLACK_CORES:
        reasons.append(f"other processes kept {others:.1f} cores busy, {free} free beside its {threads} thread(s)")
    steal = row.get("cpu_steal_fraction")
    if steal is not None and steal > STEAL_MAX:
        reasons.append(f"the hypervisor took {steal:.0%} of the CPU time (steal; limit {STEAL_MAX:.0%})")
    return "; ".join(reasons) or None


def flag(value) -> bool:
    return value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1)


def measurement_warnings(cells) -> list[str]:
    """One line per ok cell (a results table's rows) that was contended, or whose step-time
    p90/p10 passed SPREAD_LIMIT."""
    lines = []
    for _, row in cells.iterrows():
        if row.get("status") != "ok":
            continue
        p10, p90 = row.get("step_time_ms_p10"), row.get("step_time_ms_p90")
        spread = float(p90) / float(p10) if p10 is not None and p90 is not None and p10 == p10 and p90 == p90 and p10 > 0 else None
        if flag(row.get("contended")):
            lines.append(f"{row['label']}: contended ({row.get('contention')})")
        elif spread is not None and spread > SPREAD_LIMIT:
            lines.append(f"{row['label']}: noisy, step-time p90/p10 = {spread:.2f} (limit {SPREAD_LIMIT:g})")
    return lines

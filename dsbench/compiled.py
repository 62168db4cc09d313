"""Compiled measurement: a cell's model under torch.compile, and what compiling did.

`measure.compile` is swept like an axis (`"measure.compile" = ["eager", "compile"]`):
- eager: as written (the default; an eager cell's id is what it was before this setting existed);
- compile: `torch.compile` (inductor) on the model's forward and, for train, on the loss forward
  whose backward AOTAutograd compiles with it; parts it cannot trace run eager (graph breaks);
- compile-graphs: the same with CUDA graphs (`mode="reduce-overhead"`), CUDA only. The KV
  caches are preallocated and marked static, so each decode position's graph is recorded once
  and replayed in every later round.

Compile time never lands in a timed step: `CompileWatch` counts dynamo's compilations and the
CUDA-graph recordings, and a step during which either happened is dropped from the samples
(measure.StepTimer asks it) and its wall time added to `compile_s`. The workloads that can keep
stepping (prefill, decode) step on until they hold `repeats` clean samples; a cell still
compiling after SETTLE_LIMIT extra rounds is reported as such (`compile_settled` false).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator

import torch

MODES = ("eager", "compile", "compile-graphs")
CUDA_ONLY = ("compile-graphs",)
BREAK_REASONS_KEPT = 3  # graph-break reasons written to the row (the most frequent first)

_active: CompileWatch | None = None  # one cell per process: the watch of this process's cell


SETTLE_LIMIT = 4  # extra rounds (or steps) a compiled cell may take, beyond those planned, to gather clean samples


def rounds(planned: int, enough) -> Iterator[int]:
    """Round (or step) indices: `planned` of them; in a compiled cell, on past those until
    enough() (the timer holds its samples) or SETTLE_LIMIT more, after which the cell is
    reported as still compiling."""
    yield from range(planned)
    if _active is None:
        return
    for extra in range(SETTLE_LIMIT):
        if enough():
            return
        yield planned + extra
    if not enough():
        _active.settled = False


def check_mode(mode: str, device: str) -> str | None:
    """A one-line problem for a mode this device cannot run, else None."""
    if mode in CUDA_ONLY and device != "cuda":
        return (f"measure.compile: {mode!r} needs CUDA graphs, so device cuda, and this run's device is {device}; "
                f"use 'compile' (or 'eager') here")
    return None


def active_watch() -> CompileWatch | None:
    return _active


def uncompiled() -> contextlib.AbstractContextManager:
    """Run compiled functions eager inside (untimed work that reads values on the host); a null
    context where nothing is compiled, so an eager cell never imports torch._dynamo."""
    return torch.compiler.set_stance("force_eager") if _active is not None else contextlib.nullcontext()


def stop() -> None:
    """No cell is compiled any more in this process (the tests run several in one)."""
    global _active
    _active = None


class CompileWatch:
    """What torch.compile did in this process since `start()`: compilations (dynamo frames
    converted), graph breaks with their reasons, CUDA-graph recordings, and the steps they cost."""

    def __init__(self, mode: str):
        self.mode = mode
        self.compile_s = 0.0  # wall time of the steps during which something compiled
        self.compile_steps = 0  # steps dropped from the samples because something compiled
        self.timed_compile_steps = 0  # of those, steps meant to be timed (past the warm-up)
        self.settled = True
        self._recordings = 0
        self.meter = None  # a contention.ContentionMeter: compiling steps are left out of its columns
        self._base_frames = 0
        self._base_breaks: collections.Counter = collections.Counter()

    def start(self) -> CompileWatch:
        global _active
        from torch._dynamo.utils import counters

        self._base_frames = counters["frames"]["total"]
        self._base_breaks = collections.Counter(counters["graph_break"])
        _count_cudagraph_recordings(self)
        _active = self
        return self

    def events(self) -> int:
        """A number that grows whenever something compiles or a CUDA graph is recorded."""
        from torch._dynamo.utils import counters

        return counters["frames"]["total"] + self._recordings

    def step(self, record: bool):
        """A context for one step: says afterwards whether the step compiled (`.compiled`)."""
        return _WatchedStep(self, record)

    def columns(self) -> dict:
        from torch._dynamo.utils import counters

        breaks = collections.Counter(counters["graph_break"]) - self._base_breaks
        reasons = [f"{n}× {_short(reason)}" for reason, n in breaks.most_common(BREAK_REASONS_KEPT)]
        return {
            "compile_mode": self.mode,
            "compile_s": self.compile_s,
            "compiles": counters["frames"]["total"] - self._base_frames,  # frames dynamo converted, recompilations included
            "compile_steps": self.compile_steps,
            "timed_compile_steps": self.timed_compile_steps,
            "compile_settled": self.settled,
            "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": "; ".join(reasons) or None,
            "cudagraph_recordings": self._recordings if self.mode == "compile-graphs" else None,
        }


class _WatchedStep:
    def __init__(self, watch: CompileWatch, record: bool):
        self.watch, self.record, self.compiled = watch, record, False

    def __enter__(self):
        meter = self.watch.meter
        self._before = meter.snapshot() if meter is not None else None
        self._events, self._t0 = self.watch.events(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.watch.events() != self._events:
            self.compiled = True
            if self._before is not None:
                self.watch.meter.leave_out(self._before, self.watch.meter.snapshot())
            self.watch.compile_s += time.perf_counter() - self._t0
            self.watch.compile_steps += 1
            self.watch.timed_compile_steps += self.record
        return False


def _short(reason: str) -> str:
    """A graph-break reason's first line (dynamo's carry explanations and links after it)."""
    return reason.strip().splitlines()[0][:120]


def _count_cudagraph_recordings(watch: CompileWatch) -> None:
    """Count CUDA-graph recordings through inductor's tree manager (it keeps no counter of them)."""
    if watch.mode != "compile-graphs":
        return
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.CUDAGraphTreeManager
    if getattr(manager, "_dsbench_counted", False):
        return
    record = manager.record_function

    def counted(self, *args, **kwargs):
        if _active is not None:
            _active._recordings += 1
        return record(self, *args, **kwargs)

    manager.record_function = counted
    manager._dsbench_counted = True


def compile_model(model: torch.nn.Module, mode: str, trains: bool) -> CompileWatch | None:
    """Compile `model` in place for `mode` and start watching; None for eager."""
    if mode == "eager":
        return None
    import torch._inductor.config as inductor_config

    from dsbench.variants import eager

    eager.prepare()  # the parts that run eager under compile (variants/eager.py)
    from dsbench.kernels import choice

    choice.families()  # every op family registered now: an import inside the trace is a graph break

    if next(model.parameters()).device.type == "cpu":
        # Compile in this process: inductor's pool of compile workers otherwise keeps running
        # beside the first timed steps, on the cores the cell times (seen on a 2-core CPU: decode
        # steps 100× slower for five steps after the last compilation, none with one thread).
        inductor_config.compile_threads = 1
    options = {"mode": "reduce-overhead"} if mode == "compile-graphs" else {}
    if mode == "compile-graphs":
        inductor_config.triton.cudagraph_dynamic_shape_warn_limit = None  # one graph per decode position is the plan
        _static_caches(model)
    model.compile(**options)  # __call__: the forward that prefill and decode run
    if trains:
        model.forward_losses = torch.compile(model.forward_losses, **options)
    return CompileWatch(mode).start()


def _static_caches(model: torch.nn.Module) -> None:
    """CUDA graphs replay fixed addresses: mark every KV cache the model allocates as static, so
    the graphs write the caches in place rather than being skipped for mutating their inputs."""
    new_caches = model.new_caches

    def static_caches(*args, **kwargs):
        caches = new_caches(*args, **kwargs)
        for cache in caches:
            for buffer in cache.buffers():
                torch._dynamo.mark_static_address(buffer)
        return caches

    model.new_caches = static_caches


def step_begin() -> None:
    """Tell CUDA graphs a new step begins (outputs of the last replay may be overwritten)."""
    if _active is not None and _active.mode == "compile-graphs":
        torch.compiler.cudagraph_mark_step_begin()


def keep(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor to keep past the next step: under CUDA graphs a replay overwrites its outputs."""
    if _active is not None and _active.mode == "compile-graphs":
        return tensor.clone()
    return tensor

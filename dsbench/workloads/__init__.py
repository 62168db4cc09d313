"""The workloads a cell can run, by axes.workload value. Each is one class in its own file
(the contract: base.py) that carries its spec section, description, `run cell` flags and checks;
registering one is one `register(...)` call (here for the built-ins, in a plug-in module for a
user's), and the spec, the CLI and the report read them from WORKLOADS.

- train: AdamW steps (forward, backward, clip, optimizer) on batch×seq tokens; loss every step.
- prefill: one forward over batch×seq tokens that fills a fresh KV cache.
- decode: prefill a context of L tokens, then generate tokens one at a time from the cache.
- speculative: train, then MTP self-speculative decoding against plain greedy (DeepSeek-V3 §5.4.3).
"""

from __future__ import annotations

from dsbench import schema

from .base import CellFlags, Context, Diverged, Workload, WorkloadRun, point
from .decode import MAX_PREFILL_TOKENS, Decode, DecodeSettings, generate, max_batch, prefill_caches
from .prefill import Prefill, PrefillSettings
from .speculative import Speculative, SpeculativeSettings
from .train import Train, TrainSettings, lr_at, make_optimizer

WORKLOADS: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    """Add a workload: its name becomes an axes.workload value and its Settings the spec section
    [<name>]; one entry per name."""
    if not isinstance(workload, Workload):
        raise TypeError(f"register: {workload!r} is not a Workload")
    if workload.name in WORKLOADS:
        raise ValueError(f"workload {workload.name!r} is registered twice")
    WORKLOADS[workload.name] = workload
    schema.WORKLOAD_SECTIONS.append(workload.name)
    return workload


for _workload in (Train(), Prefill(), Decode(), Speculative()):
    register(_workload)


def names_where(flag: str) -> tuple[str, ...]:
    """The workloads whose class sets this flag (trains, decodes, context_curve, …): what harness
    code filters rows by, instead of naming a workload."""
    return tuple(name for name, w in WORKLOADS.items() if getattr(w, flag))


def report_sections() -> list[str]:
    """Every registered workload's own report section, as "module:function"."""
    return [w.report_section for w in WORKLOADS.values() if w.report_section]


def workload_of(cell) -> Workload:
    """The workload a Cell runs."""
    return WORKLOADS[cell.axes["workload"]]


# The runs as plain functions (ctx, settings) → WorkloadRun, for tests and scripts.
run_train, run_prefill, run_decode = Train().run, Prefill().run, Decode().run

__all__ = ["WORKLOADS", "CellFlags", "Context", "Decode", "DecodeSettings", "Diverged", "MAX_PREFILL_TOKENS", "Prefill",
           "PrefillSettings", "Speculative", "SpeculativeSettings", "Train", "TrainSettings", "Workload", "WorkloadRun", "generate",
           "lr_at", "make_optimizer", "max_batch", "names_where", "point", "prefill_caches", "register", "report_sections", "run_decode", "run_prefill", "run_train",
           "workload_of"]

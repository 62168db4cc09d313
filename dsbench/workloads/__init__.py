"""The workloads a cell can run, by axes.workload value. Each is one class in its own file
(the contract: base.py); registering one is one line here.

- train: AdamW steps (forward, backward, clip, optimizer) on batch×seq tokens; loss every step.
- prefill: one forward over batch×seq tokens that fills a fresh KV cache.
- decode: prefill a context of L tokens, then generate tokens one at a time from the cache.
- speculative: train, then MTP self-speculative decoding against plain greedy (DeepSeek-V3 §5.4.3).
"""

from __future__ import annotations

from .base import Context, Diverged, Workload, WorkloadRun, point
from .decode import MAX_PREFILL_TOKENS, Decode, DecodeSettings, _prefill, max_batch
from .prefill import Prefill, PrefillSettings
from .speculative import Speculative, SpeculativeSettings
from .train import Train, TrainSettings, lr_at, make_optimizer

WORKLOADS: dict[str, Workload] = {w.name: w for w in (Train(), Prefill(), Decode(), Speculative())}


def workload_of(cell) -> Workload:
    """The workload a Cell runs."""
    return WORKLOADS[cell.axes["workload"]]


# The runs as plain functions (ctx, settings) → WorkloadRun, for tests and scripts.
run_train, run_prefill, run_decode = (WORKLOADS[name].run for name in ("train", "prefill", "decode"))

__all__ = ["WORKLOADS", "Context", "Decode", "DecodeSettings", "Diverged", "MAX_PREFILL_TOKENS", "Prefill",
           "PrefillSettings", "Speculative", "SpeculativeSettings", "Train", "TrainSettings", "Workload", "WorkloadRun", "_prefill", "lr_at",
           "make_optimizer", "max_batch", "point", "run_decode", "run_prefill", "run_train", "workload_of"]

"""[parallel]: a cell over several processes (dsbench/distributed.py), and the expert-parallel
checks of a spec: which cells take it, and that ep splits their routed experts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsbench.errors import SpecError
from dsbench.variants import registry
from dsbench.workloads import WORKLOADS

from .hooks import part_hook

if TYPE_CHECKING:
    from .sweep import SweepSpec


@dataclass(frozen=True)
class ParallelSettings:
    """A cell over several processes (dsbench/distributed.py): routed FFN cells of the train and
    prefill workloads only; elsewhere the section collapses to one process (n/a)."""

    ep: int = field(default=1, metadata={"min": 1})  # expert-parallel ranks: routed experts split across them
    # EPLB (V3 §3.4.1, inference): redundant expert replicas per MoE layer, placed from the load a calibration
    # batch measured; prefill cells only (training would have to keep replicas' weights in step)
    redundant_experts: int = field(default=0, metadata={"min": 0})


# The workloads whose cells run expert-parallel (each says so: Workload.expert_parallel).
PARALLEL_WORKLOADS = tuple(name for name, w in WORKLOADS.items() if w.expert_parallel)


def parallel_applies(axes: dict) -> bool:
    """Does [parallel] change this cell? Routed FFN cells of the expert-parallel workloads."""
    return registry.FFN[axes["ffn"]].routed and WORKLOADS[axes["workload"]].expert_parallel


def parallel_of(spec, axes: dict) -> dict:
    """A cell's parallel settings; empty for one process, so every one-process cell keeps its id."""
    p = spec.parallel
    if p.ep == 1 or not parallel_applies(axes):
        return {}
    redundant = p.redundant_experts if WORKLOADS[axes["workload"]].redundant_experts else 0
    return {"ep": p.ep, **({"redundant_experts": redundant} if redundant else {})}


def _check_parallel(spec: SweepSpec, configs: list) -> None:
    """ep must split every expert-parallel cell's routed experts evenly, and some cell must take it."""
    p = spec.parallel
    if p.ep == 1:
        if p.redundant_experts:
            raise SpecError(f"parallel.redundant_experts: {p.redundant_experts} needs parallel.ep > 1 (replicas are placed on ranks)")
        return
    taking = [(axes, cfg) for axes, cfg in configs if parallel_applies(axes)]
    if not taking:
        raise SpecError(f"parallel.ep: {p.ep} applies to routed FFN cells of the {' and '.join(PARALLEL_WORKLOADS)} workloads only; "
                        f"this sweep has none (axes.ffn = {', '.join(spec.axes['ffn'])}, axes.workload = {', '.join(spec.axes['workload'])})")
    if p.redundant_experts and not any(WORKLOADS[axes["workload"]].redundant_experts for axes, _ in taking):
        raise SpecError(f"parallel.redundant_experts: {p.redundant_experts} applies to prefill cells only (V3 deploys "
                        f"redundant experts for inference, §3.4.1); add prefill to [axes] workload or drop the key")
    for axes, cfg in taking:  # the routed FFN states what its expert parallelism needs
        redundant = parallel_of(spec, axes).get("redundant_experts", 0)
        if problem := part_hook("ffn", cfg, "check_parallel", str, cfg, p.ep, redundant):
            raise SpecError(problem)

"""The spec's sections and keys: the harness's own settings ([measure], [parallel]), every
registered workload's section, and the keys a spec, a [[sweep]] block and a dotted axis may name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dsbench import compiled
from dsbench.schema import AXES, PART_SECTIONS, RUN_SECTIONS
from dsbench.schema import dotted_sections as schema_dotted_sections
from dsbench.variants import registry
from dsbench.workloads import WORKLOADS

from .parallel import ParallelSettings

DEVICES = ("auto", "cpu", "cuda")
SPEC_VERSION = 1


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = field(default=3, metadata={"min": 0})
    repeats: int = 10
    timeout_s: float = 600.0
    calibrate: bool = True  # measure this machine's matmul rate for MFU where no datasheet peak applies
    replicates: int = 1  # run each cell this many times, each in its own process (repeatability)
    threads: int = field(default=0, metadata={"min": 0})  # torch threads per cell; 0 = the cores free when the cell starts, or OMP_NUM_THREADS (contention.py)
    # eager, or torch.compile without or with CUDA graphs (dsbench/compiled.py); sweep it as "measure.compile"
    compile: str = field(default="eager", metadata={"choices": compiled.MODES})


RUN_SETTINGS = dict(zip(RUN_SECTIONS, (MeasureSettings, ParallelSettings)))


class _Sections(Mapping):
    """Section key → its settings dataclass: each registered workload's, then [measure] and
    [parallel]; read live, so a workload registered later has its section."""

    def _table(self) -> dict:
        return {**{name: w.Settings for name, w in WORKLOADS.items()}, **RUN_SETTINGS}

    def __getitem__(self, key):
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self):
        return len(self._table())


SECTIONS = _Sections()
# Fields the axes set; a section may not set them directly.
AXIS_FIELDS = {("attention", "kind"): "attention", ("attention", "mla_impl"): "attention", ("attention", "compressor"): "attention", ("ffn", "kind"): "ffn",
               ("ffn", "balance"): "balance", ("model", "precision"): "precision"}


def default_axes() -> dict:
    """Each axis's value where a spec names none: the first registered (train, dense, mha, fp32, none)."""
    return {"workload": (next(iter(WORKLOADS)),), **{axis: values[:1] for axis, values in registry.axis_values().items()}}


DEFAULT_AXES = default_axes()


def sweep_keys() -> tuple[str, ...]:
    """What a [[sweep]] block may set: its own overrides and axes, merged over the top level's."""
    return ("model", *PART_SECTIONS, "axes", "kernels", *SECTIONS)


def top_keys() -> tuple[str, ...]:
    return ("name", "description", "device", "seed", "data", "plugins", "executor", "sweep", *sweep_keys())


def dotted_sections() -> tuple[str, ...]:
    """Sections whose fields can be swept as dotted-key axes ("ffn.n_experts" = [8, 64])."""
    return schema_dotted_sections(WORKLOADS)


def workload_sections() -> list[tuple[str, tuple[str, ...], str]]:
    """(name, its [section] keys, description) of each registered workload."""
    return [(name, tuple(w.Settings.__dataclass_fields__), w.description) for name, w in WORKLOADS.items()]


def available_axis_values() -> dict[str, tuple[str, ...]]:
    """Every axis and the values built today: the variants' registry's, and the registered workloads."""
    values = {**registry.axis_values(), "workload": tuple(WORKLOADS)}
    return {axis: values[axis] for axis in AXES}

"""Expansion: a validated SweepSpec → its Cells (the product of the axes for each sweep point,
collapsed where an axis does not apply, duplicates once), and the model config each cell builds."""

from __future__ import annotations

import itertools

from dsbench import compiled
from dsbench.cell import Cell
from dsbench.errors import SpecError
from dsbench.kernels import choice as kernel_choice
from dsbench.variants.precision import precision_of
from dsbench.schema import AXES, MODEL_KEYS, PART_SECTIONS
from dsbench.variants import registry
from dsbench.variants.config import SIZES, ModelConfig
from dsbench.workloads import WORKLOADS

from .parallel import parallel_applies, parallel_of

MAX_CELLS = 100_000  # a spec that expands further is a typo (replicates = 10000000), not a sweep


def part_configs(spec, kinds: dict, balance: str, precision: str = "fp32") -> ModelConfig:
    """The model a cell of these attention/ffn kinds builds: the named size, the [model]
    overrides, and each part from the [attention] / [ffn] keys its variant reads."""
    size = SIZES[spec.size]
    model = {k: v for k, v in {**size, **spec.model}.items() if k in MODEL_KEYS}
    attention, _ = registry.part_config("attention", kinds["attention"], {**size, **spec.attention})
    ffn, _ = registry.part_config("ffn", kinds["ffn"], {**size, **spec.ffn, "balance": balance})
    return ModelConfig(**model, precision=precision, attention=attention, ffn=ffn)


def base_config(spec) -> ModelConfig:
    """The model of the first values of the axes (what the model-wide checks look at)."""
    return part_configs(spec, {"attention": spec.axes["attention"][0], "ffn": spec.axes["ffn"][0]}, "n/a")


def cell_configs(spec):
    """(axes, model config) for each combination of the axes, as the cells are built."""
    for combo in itertools.product(*(spec.axes[a] for a in AXES)):
        axes = dict(zip(AXES, combo))
        if not registry.FFN[axes["ffn"]].routed:
            axes["balance"] = "n/a"
        yield axes, part_configs(spec, axes, axes["balance"], axes["precision"])


def workload_read(spec, workload) -> dict:
    """The other sections a workload reads (Workload.reads): all of the spec it is handed."""
    return {name: getattr(spec, name) for name in workload.reads}


def expand(spec, device: str) -> list[Cell]:
    """The product of the axes, for each sweep point; balance and dotted axes collapse to n/a
    where they do not apply; duplicates run once."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"expand() needs a resolved device (cpu or cuda), got {device!r}")
    from dsbench.data import data_digest

    digest = data_digest(spec.data)
    cells: dict[str, Cell] = {}
    for _, point in spec.each_point():
        if point.measure.replicates > MAX_CELLS:
            raise SpecError(f"measure.replicates: {point.measure.replicates} would expand to more than {MAX_CELLS:,} cells; "
                            f"allowed: up to {MAX_CELLS:,}")
    for dotted, point in spec.each_point():
        if problem := compiled.check_mode(point.measure.compile, device):
            raise SpecError(problem)
        measure = {"warmup": point.measure.warmup, "repeats": point.measure.repeats}
        if point.measure.compile != "eager":  # identity: an eager cell's id is what it was before compiling existed
            measure["compile"] = point.measure.compile
        if problem := kernel_choice.check_pins(point.kernels, device):
            raise SpecError(problem)
        # Replicate 0 is the plain cell, so its id matches an unreplicated run of the same spec.
        replicas = [measure] + [{**measure, "replicate": r} for r in range(1, point.measure.replicates)]
        for axes, cfg in cell_configs(point):
            workload = WORKLOADS[axes["workload"]]
            used = kernel_families(cfg, workload)
            axes = {**axes, **{k: v if _applies(k, axes, used) else "n/a" for k, v in dotted.items()}}
            pins = {f: v for f, v in point.kernels.items() if f in used and v != kernel_choice.AUTO}
            cell_replicas = [{**r, "kernels": pins} for r in replicas] if pins else replicas  # identity: auto adds nothing
            for settings in workload.cells_for(getattr(point, workload.name), cfg, workload_read(point, workload)):
                for replica in cell_replicas:
                    cell = Cell(axes, cfg, settings, replica, spec.seed, spec.data, device, spec.plugins, parallel_of(point, axes), digest)
                    cells.setdefault(cell.cell_id, cell)
                    if len(cells) > MAX_CELLS:
                        raise SpecError(f"spec: {spec.name!r} expands to more than {MAX_CELLS:,} cells; allowed: up to {MAX_CELLS:,} "
                                        "(split it, or sweep fewer values)")
    return list(cells.values())


def kernel_families(cfg: ModelConfig, workload) -> tuple[str, ...]:
    """The op families a cell of this model and workload calls (each part and the precision say)."""
    names = [*precision_of(cfg).kernel_families]
    for section in PART_SECTIONS:
        module = registry.TABLES[section][getattr(cfg, section).kind].module
        names += module.kernel_families(cfg, workload.decodes)
    return tuple(dict.fromkeys(names))


def kernel_plan(cell: Cell) -> dict[str, str]:
    """What each op family the cell calls will run, as --dry-run shows it: the pin, or auto's
    candidates on the cell's device (auto decides among them by measurement in the cell's process)."""
    pins = cell.measure.get("kernels", {})
    families = kernel_families(cell.model, WORKLOADS[cell.axes["workload"]])
    return {f: kernel_choice.preview(f, pins.get(f, kernel_choice.AUTO), cell.device) for f in families}


def _applies(key: str, axes: dict, families: tuple[str, ...] = ()) -> bool:
    """Does dotted axis `key` change this cell? Model keys always; a part's key when the cell's
    variant reads it; a workload section's key on cells of that workload; a kernels key when the
    cell calls that op family."""
    section, name = key.split(".", 1)
    if section == "kernels":
        return name in families
    if section in PART_SECTIONS:
        return bool(registry.readers(section, name, (axes[section],)))
    if section == "parallel":
        return parallel_applies(axes)
    return section in ("model", "measure") or section == axes["workload"]

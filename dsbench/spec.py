"""Sweep specs: TOML (or a shipped preset) → validated SweepSpec → the matrix of Cells.

Every rejection is a `SpecError` whose message is one line naming the key, the bad value and
what is allowed; the CLI prints it and exits 2 before anything runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dsbench.cell import AXES, PART_SECTIONS, Cell
from dsbench import compiled
from dsbench.kernels import choice as kernel_choice
from dsbench.errors import SpecError
from dsbench.executors import ExecutorSettings
from dsbench.validate import as_table, check_choice, check_float, check_int, check_section, check_str, check_value, reject_unknown  # noqa: F401
from dsbench.workloads import WORKLOADS, DecodeSettings, PrefillSettings, SpeculativeSettings, TrainSettings, max_batch  # noqa: F401 (importable from here)
from dsbench.variants import mtp, registry
from dsbench.variants.config import MODEL_FIELDS, SIZES, ModelConfig

DEFAULT_AXES = {"workload": ("train",), "ffn": ("dense",), "attention": ("mha",), "precision": ("fp32",), "balance": ("none",)}
DEVICES = ("auto", "cpu", "cuda")
SPEC_VERSION = 1


# --- settings sections: each field's type and bounds drive validation ---


def _min(value):
    return field(default=None, metadata={"min": value})


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


@dataclass(frozen=True)
class ParallelSettings:
    """A cell over several processes (dsbench/distributed.py): routed FFN cells of the train and
    prefill workloads only; elsewhere the section collapses to one process (n/a)."""

    ep: int = field(default=1, metadata={"min": 1})  # expert-parallel ranks: routed experts split across them
    # EPLB (V3 §3.4.1, inference): redundant expert replicas per MoE layer, placed from the load a calibration
    # batch measured; prefill cells only (training would have to keep replicas' weights in step)
    redundant_experts: int = field(default=0, metadata={"min": 0})


PARALLEL_WORKLOADS = ("train", "prefill")  # the workloads whose cells run expert-parallel
SECTIONS = {**{name: w.Settings for name, w in WORKLOADS.items()}, "measure": MeasureSettings, "parallel": ParallelSettings}
# Fields the axes set; a section may not set them directly.
AXIS_FIELDS = {("attention", "kind"): "attention", ("attention", "mla_impl"): "attention", ("ffn", "kind"): "ffn",
               ("ffn", "balance"): "balance", ("model", "precision"): "precision"}
MODEL_KEYS = ("size", "d_model", "n_layers", "vocab_size", "max_seq_len", "norm_eps", "tie_embeddings", "init_std", "mtp")
# What a [[sweep]] block may set: its own overrides and axes, merged over the top level's.
SWEEP_KEYS = ("model", *PART_SECTIONS, "axes", "kernels", *SECTIONS)
TOP_KEYS = ("name", "description", "device", "seed", "data", "plugins", "executor", "sweep", *SWEEP_KEYS)
# Sections whose fields can be swept as dotted-key axes ("ffn.n_experts" = [8, 64]).
DOTTED_SECTIONS = ("model", *PART_SECTIONS, *SECTIONS, "kernels")
# The [measure] keys that change what a cell runs, so can be swept; the rest say only how it is timed.
DOTTED_MEASURE_KEYS = ("compile",)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str = ""
    device: str = "auto"
    seed: int = 0
    data: str = "synthetic"
    size: str = "debug"
    model: dict = field(default_factory=dict)  # overrides of the named size
    attention: dict = field(default_factory=dict)
    ffn: dict = field(default_factory=dict)
    axes: dict = field(default_factory=lambda: dict(DEFAULT_AXES))
    train: TrainSettings = field(default_factory=TrainSettings)
    prefill: PrefillSettings = field(default_factory=PrefillSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    speculative: SpeculativeSettings = field(default_factory=SpeculativeSettings)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    # [kernels]: op family → "auto" or one implementation (dsbench/kernels/choice.py); absent: auto
    kernels: dict = field(default_factory=dict)
    plugins: tuple[str, ...] = ()  # modules imported first: they register their own variants
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)  # where cells run (not identity; may change on --resume)
    dotted: dict = field(default_factory=dict)  # dotted-key axes and their values over all points
    # Every plain sweep this spec runs: (dotted-axis values, spec without dotted axes or blocks).
    # Empty for a plain spec, which is its own one point.
    points: tuple[tuple[dict, SweepSpec], ...] = ()
    source: dict = field(default_factory=dict, compare=False)  # the spec as given (TOML's dict): what from_dict re-parses

    def each_point(self) -> list[tuple[dict, SweepSpec]]:
        return list(self.points) or [({}, self)]

    def to_dict(self) -> dict:
        """The resolved fields (the first sweep's settings, the union of the axes) and, for a spec
        of several points, its source, which from_dict re-parses."""
        recorded = dataclasses.asdict(dataclasses.replace(self, points=(), dotted={}, source={}))
        for key in ("points", "dotted", "source"):
            recorded.pop(key)
        if self.parallel == ParallelSettings():  # specs without it record what they recorded before it existed
            recorded.pop("parallel")
        if not self.kernels:
            recorded.pop("kernels")
        recorded["axes"] = {**recorded["axes"], **{k: list(v) for k, v in self.dotted.items()}}
        # Only the executor settings given: a local run records the spec it recorded before executors existed.
        default = dataclasses.asdict(ExecutorSettings())
        executor = {k: v for k, v in recorded.pop("executor").items() if v != default[k]}
        if executor:
            recorded["executor"] = executor
        if self.points:
            recorded["source"] = self.source
        return recorded

    @staticmethod
    def from_dict(recorded: dict) -> SweepSpec:
        """The spec a results folder recorded (to_dict's form), validated again."""
        # TOML has no null: a None was a default left unset.
        if recorded.get("source"):
            return parse_spec(recorded["source"])
        raw = {k: {kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v
               for k, v in recorded.items() if v is not None}
        raw["model"] = {**raw.get("model", {}), "size": raw.pop("size", "debug")}
        if not raw.get("plugins"):
            raw.pop("plugins", None)
        return parse_spec(raw)


# --- loading ---


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("dsbench.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> SweepSpec:
    names = preset_names()
    if name not in names:
        raise SpecError(f"preset: unknown preset {name!r}; allowed: {', '.join(names)}")
    text = resources.files("dsbench.presets").joinpath(f"{name}.toml").read_text()
    return parse_spec(_parse_toml(text, f"preset {name}"))


def load_spec_file(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec: file {str(path)!r} does not exist; pass a TOML file or --preset NAME")
    if not path.is_file():
        raise SpecError(f"spec: {str(path)!r} is not a file; pass a TOML file or --preset NAME")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"spec: {str(path)!r} is not valid TOML: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_spec(_parse_toml(text, str(path)))


def _parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec: {where} is not valid TOML: {e}") from None


def parse_spec(raw: dict) -> SweepSpec:
    """Validate a spec dict (as parsed from TOML) into a SweepSpec, or raise SpecError.

    A spec is one sweep, or several `[[sweep]]` blocks (each merged over the top level: its
    sections key by key, its axes axis by axis) run as one run; within each, dotted-key axes
    (`"ffn.n_experts" = [8, 64]`) multiply the named ones. Each resulting point is validated
    as the plain spec it is, so a dotted value gets the same one-line check as the same key
    written in its section.
    """
    reject_unknown("spec", raw, TOP_KEYS)
    plugins = _import_plugins(raw.get("plugins", []))
    blocks = _check_blocks(raw.get("sweep"))
    top = {k: v for k, v in raw.items() if k != "sweep"}
    # A block need not read the top level's [attention]/[ffn] keys; some block must (checked below).
    inherited = _part_keys(top) if blocks else {}
    points: list[tuple[dict, SweepSpec]] = []
    for i, block in enumerate(blocks or [{}]):
        try:
            points += _points(_merge_block(top, block), plugins, {s: keys - _part_keys(block).get(s, set())
                                                                  for s, keys in inherited.items()})
        except SpecError as e:
            raise SpecError(f"sweep[{i}] {e}" if blocks else str(e)) from None
    for section, keys in inherited.items():
        kinds = tuple(dict.fromkeys(k for _, p in points for k in p.axes[section]))
        for key in keys:
            _check_part_overrides(section, {key: None}, kinds, check_values=False)
    base = points[0][1]
    if len(points) == 1 and not points[0][0]:
        return dataclasses.replace(base, source=raw)
    axes = {a: tuple(dict.fromkeys(v for _, p in points for v in p.axes[a])) for a in AXES}
    dotted: dict[str, dict] = {}
    for values, _ in points:
        for k, v in values.items():
            dotted.setdefault(k, {})[json.dumps(v)] = v  # ordered and deduplicated
    dotted_values = {k: tuple(v.values()) for k, v in dotted.items()}
    return dataclasses.replace(base, axes=axes, dotted=dotted_values, points=tuple(points), source=raw)


def _import_plugins(value) -> tuple[str, ...]:
    names = value if isinstance(value, list) else [value]
    for name in names:
        if not isinstance(name, str) or not name:
            raise SpecError(f"plugins: expected a list of module names, got {value!r}")
        try:
            registry.import_plugins([name])
        except Exception as e:  # an import error or one the plugin's own code raises
            raise SpecError(f"plugins: cannot import {name!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return tuple(names)


def _part_keys(raw: dict) -> dict[str, set[str]]:
    """The [attention] / [ffn] keys a raw spec (or block) sets, its dotted axes' included."""
    keys = {s: set(raw.get(s, {})) if isinstance(raw.get(s), dict) else set() for s in PART_SECTIONS}
    for key in raw.get("axes", {}) if isinstance(raw.get("axes"), dict) else ():
        section, _, name = key.partition(".")
        if section in keys and name:
            keys[section].add(name)
    return keys


def _check_blocks(value) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list) or not value or not all(isinstance(b, dict) for b in value):
        raise SpecError(f"sweep: expected one or more [[sweep]] tables, got {value!r}")
    for i, block in enumerate(value):
        reject_unknown(f"sweep[{i}]", block, SWEEP_KEYS)
    return value


def _merge_block(top: dict, block: dict) -> dict:
    merged = dict(top)
    for key, table in block.items():
        merged[key] = {**as_table(key, top.get(key, {})), **as_table(key, table)}
    return merged


def _points(raw: dict, plugins: tuple[str, ...], inherited: dict | None = None) -> list[tuple[dict, SweepSpec]]:
    """(dotted-axis values, plain spec) for each combination of this sweep's dotted axes."""
    axes = as_table("axes", raw.get("axes", {}))
    plain = {**raw, "axes": {k: v for k, v in axes.items() if "." not in k}}
    dotted = _check_dotted({k: v for k, v in axes.items() if "." in k}, raw)
    points = []
    for combo in itertools.product(*dotted.values()):
        values = dict(zip(dotted, combo))
        point = dict(plain)
        for key, value in values.items():
            section, name = key.split(".", 1)
            point[section] = {**as_table(section, point.get(section, {})), name: value}
        points.append((values, _parse_plain(point, plugins, inherited or {})))
    return points


def dotted_field_exists(key: str) -> bool:
    """Whether "section.field" names a field some cell can have (a part variant's, the model's
    or a workload's setting)."""
    section, _, name = key.partition(".")
    if section in PART_SECTIONS:
        return bool(registry.readers(section, name))
    if section == "model":
        return name in MODEL_KEYS
    if section == "measure":
        return name in DOTTED_MEASURE_KEYS
    if section == "kernels":
        return name in kernel_choice.families()
    return section in SECTIONS and name in SECTIONS[section].__dataclass_fields__


def _check_dotted(dotted: dict, raw: dict) -> dict[str, list]:
    for key, value in dotted.items():
        section, name = key.split(".", 1)
        if section not in DOTTED_SECTIONS or not name:
            raise SpecError(f"axes.{key}: unknown key; allowed: {', '.join(AXES)}, or a dotted key section.field "
                            f"with section one of {', '.join(DOTTED_SECTIONS)}")
        if section == "measure" and name not in DOTTED_MEASURE_KEYS:
            raise SpecError(f"axes.{key}: measure.{name} says how cells are timed, not what they run; "
                            f"the [measure] keys an axis can sweep: {', '.join(DOTTED_MEASURE_KEYS)}")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise SpecError(f"axes.{key}: empty list; list the values to sweep")
        for v in values:
            if values.count(v) > 1:
                raise SpecError(f"axes.{key}: {v!r} is listed twice; list each value once")
        given = raw.get(section, {})
        if isinstance(given, dict) and name in given:
            raise SpecError(f"axes.{key}: also set in [{section}] {name} = {given[name]!r}; set it in one place")
    return {k: v if isinstance(v, list) else [v] for k, v in dotted.items()}


def _parse_plain(raw: dict, plugins: tuple[str, ...], inherited: dict | None = None) -> SweepSpec:
    """One sweep without dotted axes or blocks; `inherited` part keys (a block's, from the top
    level) may go unread here."""
    if "name" not in raw:
        raise SpecError("name: missing; every spec needs a name (a short string used for the results folder)")
    name = check_str("name", raw["name"])
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise SpecError(f"name: {name!r} cannot name a folder; use letters, digits, '-', '_' or '.'")
    device = check_choice("device", raw.get("device", "auto"), DEVICES)
    seed = check_int("seed", raw.get("seed", 0), minimum=0)
    data = check_str("data", raw.get("data", "synthetic"))
    model = dict(as_table("model", raw.get("model", {})))
    size = check_choice("model.size", model.pop("size", "debug"), tuple(SIZES))
    model = _check_config_overrides("model", model, ModelConfig, allowed=MODEL_KEYS[1:])
    parts = {s: as_table(s, raw.get(s, {})) for s in PART_SECTIONS}  # shape checked before the axes
    axes = _check_axes(as_table("axes", raw.get("axes", {})))
    spec = SweepSpec(
        name=name,
        description=check_str("description", raw.get("description", "")),
        device=device,
        seed=seed,
        data=data,
        size=size,
        model=model,
        **{s: _check_part_overrides(s, table, axes[s], optional=(inherited or {}).get(s, set())) for s, table in parts.items()},
        axes=axes,
        kernels=_check_kernels(as_table("kernels", raw.get("kernels", {}))),
        plugins=plugins,
        executor=check_section("executor", as_table("executor", raw.get("executor", {})), ExecutorSettings),
        **{key: check_section(key, as_table(key, raw.get(key, {})), cls) for key, cls in SECTIONS.items()},
    )
    _check_combinations(spec)
    return spec


def _check_kernels(table: dict) -> dict:
    """[kernels] family = "auto" | implementation: names checked here, the device in expand()."""
    for family, impl in table.items():
        check_str(f"kernels.{family}", impl)
    if problem := kernel_choice.check_pins(table, device=None):
        raise SpecError(problem)
    return dict(table)


def _check_config_overrides(section: str, table: dict, cls, allowed: tuple | None = None) -> dict:
    """Overrides of a model-config dataclass; fields the axes own are refused here."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("attention", "ffn")}
    for key in table:
        if (section, key) in AXIS_FIELDS:
            axis = AXIS_FIELDS[(section, key)]
            raise SpecError(f"{section}.{key}: {table[key]!r} cannot be set here; the axis sets it: use [axes] {axis} = [...]")
    names = allowed or tuple(k for k in fields if (section, k) not in AXIS_FIELDS)
    reject_unknown(section, table, names)
    hints = typing.get_type_hints(cls)
    return {k: check_value(f"{section}.{k}", v, hints[k], fields[k].metadata) for k, v in table.items()}


def _check_part_overrides(section: str, table: dict, kinds: tuple[str, ...], optional=frozenset(), check_values=True) -> dict:
    """[attention] / [ffn] keys: each must be read by at least one variant this sweep runs (it
    then applies to those cells only; `optional` keys may go unread), and is checked against
    that variant's field."""
    for key in table:
        if (section, key) in AXIS_FIELDS:
            axis = AXIS_FIELDS[(section, key)]
            raise SpecError(f"{section}.{key}: {table[key]!r} cannot be set here; the axis sets it: use [axes] {axis} = [...]")
    checked = {}
    for key, value in table.items():
        anyone = registry.readers(section, key)
        if not anyone:
            known = dict.fromkeys(k for kind in registry.TABLES[section] for k in registry.config_fields(section, kind)
                                  if (section, k) not in AXIS_FIELDS)
            raise SpecError(f"{section}.{key}: unknown key; allowed: {', '.join(known)}")
        if check_values:
            f = registry.config_fields(section, anyone[0])[key]
            hints = typing.get_type_hints(registry.TABLES[section][anyone[0]].config)
            checked[key] = check_value(f"{section}.{key}", value, hints[key], f.metadata)
        if key not in optional and not registry.readers(section, key, kinds):
            raise SpecError(f"{section}.{key}: no {section} variant of this sweep reads it (axes.{section} = "
                            f"{', '.join(kinds)}); it is read by {', '.join(anyone)}: add one to [axes] {section} or drop the key")
    return checked


def _check_axes(table: dict) -> dict:
    available = registry.axis_values()
    reject_unknown("axes", table, AXES)
    axes = dict(DEFAULT_AXES)
    for axis, value in table.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise SpecError(f"axes.{axis}: empty list; allowed values: {', '.join(available[axis])}")
        for v in values:
            if not isinstance(v, str) or v not in available[axis]:
                raise SpecError(f"axes.{axis}: {v!r} is not available; allowed: {', '.join(available[axis])}")
            if values.count(v) > 1:
                raise SpecError(f"axes.{axis}: {v!r} is listed twice; list each of {', '.join(available[axis])} at most once")
        axes[axis] = tuple(values)
    return axes


def _check_combinations(spec: SweepSpec) -> None:
    configs = list(_cell_configs(spec))
    cfg = configs[0][1]
    if spec.data in ("synthetic", "synthetic-long") and cfg.vocab_size < 256:
        raise SpecError(f"model.vocab_size: {cfg.vocab_size} is below 256, the byte vocabulary of the synthetic data")
    for axes, cell_cfg in configs:  # each variant refuses a config it cannot build, in one line
        problem = mtp.check_config(cell_cfg)
        if problem:
            raise SpecError(problem)
        for section in PART_SECTIONS:
            if problem := _part_hook(section, cell_cfg, "check_config", str, cell_cfg):
                raise SpecError(problem)
            _part_hook(section, cell_cfg, "param_count", int, cell_cfg)
        ffn = registry.module_of("ffn", cell_cfg)
        if ffn.routed and axes["balance"] not in ffn.balances:
            raise SpecError(f"axes.balance: {axes['balance']!r} is not implemented by ffn = {cell_cfg.ffn.kind}; "
                            f"it implements: {', '.join(ffn.balances)}")
    _check_distinct_variants(spec)
    _check_workloads(spec)
    _check_parallel(spec, configs)


def _part_hook(section: str, cfg: ModelConfig, hook: str, returns: type, *args):
    """A variant's hook called at spec time: what it returns (None, or a `returns`), or a SpecError
    naming the variant and its hook where it raises or returns something else (a plug-in's bug
    reaches the user as one line, not a traceback)."""
    module = registry.module_of(section, cfg)
    where = f"{section} = {getattr(cfg, section).kind} ({module.__module__}.{module.__name__}.{hook})"
    try:
        value = getattr(module, hook)(*args)
    except Exception as e:  # noqa: BLE001 — any failure of the plug-in's code is reported as its own
        raise SpecError(f"{where} raised {type(e).__name__}: {e}") from None
    if value is not None and (not isinstance(value, returns) or isinstance(value, bool)):
        raise SpecError(f"{where} returned {value!r}; it must return None or a {returns.__name__}")
    return value


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
    if p.redundant_experts and not any(axes["workload"] == "prefill" for axes, _ in taking):
        raise SpecError(f"parallel.redundant_experts: {p.redundant_experts} applies to prefill cells only (V3 deploys "
                        f"redundant experts for inference, §3.4.1); add prefill to [axes] workload or drop the key")
    for axes, cfg in taking:  # the routed FFN states what its expert parallelism needs
        redundant = parallel_of(spec, axes).get("redundant_experts", 0)
        if problem := _part_hook("ffn", cfg, "check_parallel", str, cfg, p.ep, redundant):
            raise SpecError(problem)


def parallel_applies(axes: dict) -> bool:
    """Does [parallel] change this cell? Routed FFN cells of the expert-parallel workloads."""
    return registry.FFN[axes["ffn"]].routed and axes["workload"] in PARALLEL_WORKLOADS


def parallel_of(spec: SweepSpec, axes: dict) -> dict:
    """A cell's parallel settings; empty for one process, so every one-process cell keeps its id."""
    p = spec.parallel
    if p.ep == 1 or not parallel_applies(axes):
        return {}
    redundant = p.redundant_experts if axes["workload"] == "prefill" else 0
    return {"ep": p.ep, **({"redundant_experts": redundant} if redundant else {})}


def _check_distinct_variants(spec: SweepSpec) -> None:
    """Two values of one axis must build different modules (mha with n_kv_heads set would be gqa)."""
    for section in PART_SECTIONS:
        built: dict[tuple, str] = {}
        for kind in spec.axes[section]:
            kinds = {"attention": spec.axes["attention"][0], "ffn": spec.axes["ffn"][0], section: kind}
            part = getattr(part_configs(spec, kinds, "none"), section)
            fields = {k: v for k, v in dataclasses.asdict(part).items() if k != "kind"}
            key = (registry.TABLES[section][kind].module, json.dumps(fields, sort_keys=True))
            if key in built:
                given = getattr(spec, section)
                settings = ", ".join(f"{section}.{k} = {v}" for k, v in (given or fields).items() if v is not None)
                raise SpecError(f"axes.{section}: {built[key]!r} and {kind!r} build the same model with these settings "
                                f"({settings}); drop one from [axes] {section} or change the settings that make them equal")
            built[key] = kind


def _check_workloads(spec: SweepSpec) -> None:
    """Each workload that runs checks its own section against the cells it would build."""
    for name, workload in WORKLOADS.items():
        if name in spec.axes["workload"]:
            workload.check(spec, list(_cell_configs(dataclasses.replace(spec, axes={**spec.axes, "workload": (name,)}))))


# --- expansion ---


def part_configs(spec: SweepSpec, kinds: dict, balance: str, precision: str = "fp32") -> ModelConfig:
    """The model a cell of these attention/ffn kinds builds: the named size, the [model]
    overrides, and each part from the [attention] / [ffn] keys its variant reads."""
    size = SIZES[spec.size]
    model = {k: v for k, v in {**size, **spec.model}.items() if k in MODEL_FIELDS}
    attention, _ = registry.part_config("attention", kinds["attention"], {**size, **spec.attention})
    ffn, _ = registry.part_config("ffn", kinds["ffn"], {**size, **spec.ffn, "balance": balance})
    return ModelConfig(**model, precision=precision, attention=attention, ffn=ffn)


def base_config(spec: SweepSpec) -> ModelConfig:
    """The model of the first values of the axes (what the model-wide checks look at)."""
    return part_configs(spec, {"attention": spec.axes["attention"][0], "ffn": spec.axes["ffn"][0]}, "n/a")


def _cell_configs(spec: SweepSpec):
    """(axes, model config) for each combination of the axes, as the cells are built."""
    for combo in itertools.product(*(spec.axes[a] for a in AXES)):
        axes = dict(zip(AXES, combo))
        if not registry.FFN[axes["ffn"]].routed:
            axes["balance"] = "n/a"
        yield axes, part_configs(spec, axes, axes["balance"], axes["precision"])


MAX_CELLS = 100_000  # a spec that expands further is a typo (replicates = 10000000), not a sweep


def expand(spec: SweepSpec, device: str) -> list[Cell]:
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
        for axes, cfg in _cell_configs(point):
            workload = WORKLOADS[axes["workload"]]
            used = kernel_families(cfg, workload)
            axes = {**axes, **{k: v if _applies(k, axes, used) else "n/a" for k, v in dotted.items()}}
            pins = {f: v for f, v in point.kernels.items() if f in used and v != kernel_choice.AUTO}
            cell_replicas = [{**r, "kernels": pins} for r in replicas] if pins else replicas  # identity: auto adds nothing
            for settings in workload.cells_for(point, cfg):
                for replica in cell_replicas:
                    cell = Cell(axes, cfg, settings, replica, spec.seed, spec.data, device, spec.plugins, parallel_of(point, axes), digest)
                    cells.setdefault(cell.cell_id, cell)
                    if len(cells) > MAX_CELLS:
                        raise SpecError(f"spec: {spec.name!r} expands to more than {MAX_CELLS:,} cells; allowed: up to {MAX_CELLS:,} "
                                        "(split it, or sweep fewer values)")
    return list(cells.values())


def kernel_families(cfg: ModelConfig, workload) -> tuple[str, ...]:
    """The op families a cell of this model and workload calls (each part and the precision say)."""
    from dsbench.variants.precision import PRECISIONS

    names = [*PRECISIONS[cfg.precision].kernel_families]
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

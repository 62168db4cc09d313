"""A spec's sweeps: the SweepSpec, and how a spec dict (TOML's, or a results folder's) becomes one:
`[[sweep]]` blocks merged over the top level, dotted-key axes multiplied into points, each point
validated as the plain spec it is."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field

from dsbench.errors import SpecError
from dsbench.executors import ExecutorSettings
from dsbench.schema import AXES, DOTTED_MEASURE_KEYS, MODEL_KEYS, PART_SECTIONS
from dsbench.validate import as_table, check_choice, check_int, check_section, check_str, reject_unknown
from dsbench.variants import registry
from dsbench.variants.config import SIZES, ModelConfig
from dsbench.workloads import WORKLOADS

from .checks import _check_axes, _check_combinations, _check_config_overrides, _check_kernels, _check_part_overrides, check_unread, given_keys
from .parallel import ParallelSettings
from .sections import DEVICES, SECTIONS, MeasureSettings, default_axes, dotted_sections, sweep_keys, top_keys


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
    axes: dict = field(default_factory=default_axes)
    # [<workload>] for each registered workload (dsbench/workloads): name → its Settings; read as spec.<name>
    workload_sections: dict = field(default_factory=lambda: {name: w.Settings() for name, w in WORKLOADS.items()})
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    # [kernels]: op family → "auto" or one implementation (dsbench/kernels/choice.py); absent: auto
    kernels: dict = field(default_factory=dict)
    plugins: tuple[str, ...] = ()  # modules imported first: they register their own variants or workloads
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)  # where cells run (not identity; may change on --resume)
    dotted: dict = field(default_factory=dict)  # dotted-key axes and their values over all points
    # Every plain sweep this spec runs: (dotted-axis values, spec without dotted axes or blocks).
    # Empty for a plain spec, which is its own one point.
    points: tuple[tuple[dict, SweepSpec], ...] = ()
    source: dict = field(default_factory=dict, compare=False)  # the spec as given (TOML's dict): what from_dict re-parses

    def __getattr__(self, name: str):
        sections = self.__dict__.get("workload_sections")  # absent while copy/pickle rebuild the object
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def each_point(self) -> list[tuple[dict, SweepSpec]]:
        return list(self.points) or [({}, self)]

    def to_dict(self) -> dict:
        """The resolved fields (the first sweep's settings, the union of the axes) and, for a spec
        of several points, its source, which from_dict re-parses."""
        recorded = dataclasses.asdict(dataclasses.replace(self, points=(), dotted={}, source={}))
        for key in ("points", "dotted", "source"):
            recorded.pop(key)
        # Each workload's section at the top level, after the axes, as a TOML spec writes it.
        sections = recorded.pop("workload_sections")
        recorded = {k: v for key, value in recorded.items() for k, v in ((key, value), *(sections.items() if key == "axes" else ()))}
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


def parse_spec(raw: dict) -> SweepSpec:
    """Validate a spec dict (as parsed from TOML) into a SweepSpec, or raise SpecError.

    A spec is one sweep, or several `[[sweep]]` blocks (each merged over the top level: its
    sections key by key, its axes axis by axis) run as one run; within each, dotted-key axes
    (`"ffn.n_experts" = [8, 64]`) multiply the named ones. Each resulting point is validated
    as the plain spec it is, so a dotted value gets the same one-line check as the same key
    written in its section.
    """
    plugins = _import_plugins(raw.get("plugins", []))  # first: a plug-in workload adds its spec section
    reject_unknown("spec", raw, top_keys())
    blocks = _check_blocks(raw.get("sweep"))
    top = {k: v for k, v in raw.items() if k != "sweep"}
    # A block need not read the top level's [attention]/[ffn] keys; some block must (checked below).
    inherited = _part_keys(top) if blocks else {}
    points: list[tuple[dict, SweepSpec]] = []
    given: list[tuple[SweepSpec, dict]] = []  # each point and the conditionally read keys it sets
    for i, block in enumerate(blocks or [{}]):
        try:
            points += _points(given, _merge_block(top, block), plugins, {s: keys - _part_keys(block).get(s, set())
                                                                  for s, keys in inherited.items()})
        except SpecError as e:
            raise SpecError(f"sweep[{i}] {e}" if blocks else str(e)) from None
    for section, keys in inherited.items():
        kinds = tuple(dict.fromkeys(k for _, p in points for k in p.axes[section]))
        for key in keys:
            _check_part_overrides(section, {key: None}, kinds, check_values=False)
    check_unread(given)
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
        reject_unknown(f"sweep[{i}]", block, sweep_keys())
    return value


def _merge_block(top: dict, block: dict) -> dict:
    merged = dict(top)
    for key, table in block.items():
        merged[key] = {**as_table(key, top.get(key, {})), **as_table(key, table)}
    return merged


def _points(given: list, raw: dict, plugins: tuple[str, ...], inherited: dict | None = None) -> list[tuple[dict, SweepSpec]]:
    """(dotted-axis values, plain spec) for each combination of this sweep's dotted axes; appends
    (plain spec, the CONDITIONAL_READS keys it sets) of each to `given`."""
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
        given.append((points[-1][1], given_keys(point)))
    return points


def _check_dotted(dotted: dict, raw: dict) -> dict[str, list]:
    for key, value in dotted.items():
        section, name = key.split(".", 1)
        if section not in dotted_sections() or not name:
            raise SpecError(f"axes.{key}: unknown key; allowed: {', '.join(AXES)}, or a dotted key section.field "
                            f"with section one of {', '.join(dotted_sections())}")
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
        workload_sections={key: check_section(key, as_table(key, raw.get(key, {})), w.Settings) for key, w in WORKLOADS.items()},
        **{key: check_section(key, as_table(key, raw.get(key, {})), cls) for key, cls in SECTIONS.items() if key not in WORKLOADS},
    )
    _check_combinations(spec)
    return spec



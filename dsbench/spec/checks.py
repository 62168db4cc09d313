"""The checks a spec point passes before anything runs: each key against the field that reads it
([model], [attention] / [ffn], [kernels], the axes), then the combinations its cells make (each
variant's and workload's own checks, distinct variants, expert parallelism). Each failure is one
SpecError line naming the key, the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import typing

from dsbench.errors import SpecError
from dsbench.kernels import choice as kernel_choice
from dsbench.schema import AXES, DOTTED_MEASURE_KEYS, MODEL_KEYS, PART_SECTIONS
from dsbench.validate import check_str, check_value, reject_unknown
from dsbench.variants import mtp, registry
from dsbench.workloads import WORKLOADS

from .expand import cell_configs, part_configs, workload_read
from .hooks import part_hook
from .parallel import _check_parallel
from .sections import AXIS_FIELDS, SECTIONS, available_axis_values, default_axes


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
    available = available_axis_values()
    reject_unknown("axes", table, AXES)
    axes = default_axes()
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


def _check_combinations(spec) -> None:
    configs = list(cell_configs(spec))
    cfg = configs[0][1]
    if spec.data in ("synthetic", "synthetic-long") and cfg.vocab_size < 256:
        raise SpecError(f"model.vocab_size: {cfg.vocab_size} is below 256, the byte vocabulary of the synthetic data")
    for axes, cell_cfg in configs:  # each variant refuses a config it cannot build, in one line
        problem = mtp.check_config(cell_cfg)
        if problem:
            raise SpecError(problem)
        for section in PART_SECTIONS:
            if problem := part_hook(section, cell_cfg, "check_config", str, cell_cfg):
                raise SpecError(problem)
            part_hook(section, cell_cfg, "param_count", int, cell_cfg)
        ffn = registry.module_of("ffn", cell_cfg)
        if ffn.routed and axes["balance"] not in ffn.balances:
            raise SpecError(f"axes.balance: {axes['balance']!r} is not implemented by ffn = {cell_cfg.ffn.kind}; "
                            f"it implements: {', '.join(ffn.balances)}")
    _check_distinct_variants(spec)
    _check_workloads(spec)
    _check_parallel(spec, configs)


def _check_distinct_variants(spec) -> None:
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


def _check_workloads(spec) -> None:
    """Each workload that runs checks its own section (and those it reads) against the cells it would build."""
    for name, workload in WORKLOADS.items():
        if name in spec.axes["workload"]:
            configs = list(cell_configs(dataclasses.replace(spec, axes={**spec.axes, "workload": (name,)})))
            workload.check(getattr(spec, name), configs, workload_read(spec, workload))

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
from dsbench.variants.config import ModelConfig
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


def _check_attention_layers(cfg) -> None:
    try:
        layers = {layer_cfg for _, layer_cfg in registry.attention_layers(cfg)}
    except Exception as e:  # noqa: BLE001 — a schedule plug-in's bug, as one line
        raise SpecError(f"attention = {cfg.attention.kind} (layer_config) raised {type(e).__name__}: {e}") from None
    for layer_cfg in sorted(layers, key=lambda c: c.attention.kind):
        if layer_cfg is not cfg and (problem := part_hook("attention", layer_cfg, "check_config", str, layer_cfg)):
            raise SpecError(problem)
        part_hook("attention", layer_cfg, "param_count", int, layer_cfg)


def _check_combinations(spec) -> None:
    configs = list(cell_configs(spec))
    cfg = configs[0][1]
    if spec.data in ("synthetic", "synthetic-long") and cfg.vocab_size < 256:
        raise SpecError(f"model.vocab_size: {cfg.vocab_size} is below 256, the byte vocabulary of the synthetic data")
    for axes, cell_cfg in configs:  # each variant refuses a config it cannot build, in one line
        problem = mtp.check_config(cell_cfg) or check_yarn_betas(cell_cfg)
        if problem:
            raise SpecError(problem)
        for section in PART_SECTIONS:
            if problem := part_hook(section, cell_cfg, "check_config", str, cell_cfg):
                raise SpecError(problem)
            if section == "attention":  # each layer as the kind it is built as (a schedule's are others)
                _check_attention_layers(cell_cfg)
            else:
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


# --- set fields no cell reads ---
# A key some variant or workload has, which a cell reads only under a condition: set where no
# cell of any sweep point meets it, it would change nothing (issue 31: model.mtp on a decode-only
# sweep, train.mtp_lambda without MTP, a YaRN factor where YaRN is off). Each row: the key, the
# test on a cell's (axes, model config, workload settings), and what a cell must be to read it.
def _carries(settings, key: str) -> bool:
    """Whether a cell's settings (nested: speculative holds train's) carry `key`."""
    return isinstance(settings, dict) and (key in settings or any(_carries(v, key) for v in settings.values()))


def _yarn_fields(part) -> dict:
    """The YaRN fields a part's config has (none for a variant without rotary scaling)."""
    return {f.name: getattr(part, f.name) for f in dataclasses.fields(part)
            if f.name in ("rope_factor", "original_seq_len", "beta_fast", "beta_slow")}


def _yarn_on(axes, cfg, settings) -> bool:
    yarn = _yarn_fields(cfg.attention)
    return "rope_factor" in yarn and yarn["rope_factor"] > 1 and cfg.max_seq_len > yarn["original_seq_len"]


_YARN_CELL = "a cell with YaRN on (attention mla/mla-naive/dsa, attention.rope_factor > 1, model.max_seq_len > attention.original_seq_len)"
CONDITIONAL_READS = {
    # train.settings_for keeps λ only where MTP modules train: the cells that run them.
    "model.mtp": (lambda axes, cfg, settings: _carries(settings, "mtp_lambda"), "a train or speculative cell"),
    "train.mtp_lambda": (lambda axes, cfg, settings: _carries(settings, "mtp_lambda"),
                         "a train or speculative cell with model.mtp >= 1"),
    **{f"attention.{k}": (_yarn_on, _YARN_CELL) for k in ("rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale")},
}


def _defaults(key: str) -> set:
    """The defaults of a CONDITIONAL_READS key's field, over every class that has it: a value equal
    to one changes nothing (and a run.json's spec writes every section field at its default)."""
    section, _, name = key.partition(".")
    if section in PART_SECTIONS:
        classes = [v.config for v in registry.TABLES[section].values()]
    elif section == "model":
        classes = [ModelConfig]
    else:
        classes = [SECTIONS[section]]
    fields = (f for c in classes for f in dataclasses.fields(c) if f.name == name)
    return {f.default for f in fields if f.default is not dataclasses.MISSING}


def given_keys(raw: dict) -> dict[str, object]:
    """section.field → value of each CONDITIONAL_READS key a plain point's raw dict sets away from its default."""
    given = {}
    for key in CONDITIONAL_READS:
        section, _, name = key.partition(".")
        table = raw.get(section)
        if isinstance(table, dict) and name in table and table[name] not in _defaults(key):
            given[key] = table[name]
    return given


def _cells_read(spec) -> set[str]:
    """The CONDITIONAL_READS keys some cell of this plain spec reads."""
    read = set()
    for axes, cfg in cell_configs(spec):
        workload = WORKLOADS[axes["workload"]]
        for settings in workload.cells_for(getattr(spec, workload.name), cfg, workload_read(spec, workload)):
            read |= {k for k, (reads, _) in CONDITIONAL_READS.items() if reads(axes, cfg, settings)}
    return read


def check_unread(points: list[tuple[object, dict]]) -> None:
    """(plain spec, its given CONDITIONAL_READS keys) of every point: a key given somewhere must be
    read by a cell somewhere (a [[sweep]] block may leave the top level's key to another block)."""
    given = {k: v for _, keys in points for k, v in keys.items()}
    read = set().union(*(_cells_read(spec) for spec, keys in points if keys)) if given else set()
    for key, value in given.items():
        if key not in read:
            raise SpecError(f"{key}: {value!r} is set but no cell of this sweep reads it; it is read only by "
                            f"{CONDITIONAL_READS[key][1]}: drop the key or add such a cell")


def check_yarn_betas(cfg) -> str | None:
    """YaRN's ramp runs from the dims rotating beta_fast times over original_seq_len (kept) to
    those rotating beta_slow times (scaled): it needs beta_fast > beta_slow (V3: 32, 1; both are
    positive integers by their type). Equal, the ramp has no width."""
    yarn = _yarn_fields(cfg.attention)
    if "beta_fast" not in yarn or yarn["beta_fast"] > yarn["beta_slow"]:
        return None
    return (f"attention.beta_fast: {yarn['beta_fast']} with attention.beta_slow {yarn['beta_slow']}; YaRN needs "
            f"beta_fast > beta_slow (DeepSeek-V3: beta_fast = 32, beta_slow = 1)")

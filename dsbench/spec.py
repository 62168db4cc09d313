"""Sweep specs: TOML (or a shipped preset) → validated SweepSpec → the matrix of Cells.

Every rejection is a `SpecError` whose message is one line naming the key, the bad value and
what is allowed; the CLI prints it and exits 2 before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dsbench.errors import SpecError
from dsbench.workloads import WORKLOADS, DecodeSettings, PrefillSettings, TrainSettings, max_batch  # noqa: F401 (importable from here)
from dsbench.variants import registry
from dsbench.variants.mla import MultiHeadLatentAttention, mla_dims
from dsbench.variants.config import SIZES, AttentionConfig, FFNConfig, ModelConfig, config_from_size

AXES = ("workload", "ffn", "attention", "precision", "balance")  # expansion order
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


SECTIONS = {**{name: w.Settings for name, w in WORKLOADS.items()}, "measure": MeasureSettings}
# Fields the axes set; a section may not set them directly.
AXIS_FIELDS = {("attention", "kind"): "attention", ("attention", "mla_impl"): "attention", ("ffn", "kind"): "ffn",
               ("ffn", "balance"): "balance", ("model", "precision"): "precision"}
MODEL_KEYS = ("size", "d_model", "n_layers", "vocab_size", "max_seq_len", "norm_eps", "tie_embeddings", "init_std")
TOP_KEYS = ("name", "description", "device", "seed", "data", "model", "attention", "ffn", "axes", *SECTIONS)


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
    measure: MeasureSettings = field(default_factory=MeasureSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(recorded: dict) -> SweepSpec:
        """The spec a results folder recorded (to_dict's form), validated again."""
        # TOML has no null: a None was a default left unset.
        raw = {k: {kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v
               for k, v in recorded.items() if v is not None}
        raw["model"] = {**raw.get("model", {}), "size": raw.pop("size", "debug")}
        return parse_spec(raw)


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: a model config, one workload's settings, how it is measured."""

    axes: dict  # workload, ffn, attention, precision, balance ("n/a" where it does not apply)
    model: ModelConfig
    workload: dict  # settings of this cell's workload only
    measure: dict  # warmup, repeats, and replicate ≥ 1 for extra replicates (timeout is not identity)
    seed: int
    data: str
    device: str

    @property
    def cell_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def identity(self) -> dict:
        model = {**self.model.to_dict(), "attention": registry.relevant_fields(self.model.attention),
                 "ffn": registry.relevant_fields(self.model.ffn)}
        return {"axes": self.axes, "model": model, "workload": self.workload,
                "measure": self.measure, "seed": self.seed, "data": self.data, "device": self.device}

    def label(self) -> str:
        a = self.axes
        parts = [a["workload"], a["ffn"], a["attention"], a["precision"]]
        if a["balance"] != "n/a":
            parts.append(a["balance"])
        shape = WORKLOADS[a["workload"]].shape_label(self.workload)
        replicate = self.measure.get("replicate", 0)
        return "/".join(parts) + " " + shape + (f" #{replicate}" if replicate else "")

    def to_json(self) -> str:
        return json.dumps({**self.identity(), "cell_id": self.cell_id})

    @staticmethod
    def from_json(text: str) -> Cell:
        d = json.loads(text)
        model = d["model"]
        cfg = ModelConfig(**{**model, "attention": AttentionConfig(**model["attention"]), "ffn": FFNConfig(**model["ffn"])})
        return Cell(d["axes"], cfg, d["workload"], d["measure"], d["seed"], d["data"], d["device"])


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
    """Validate a spec dict (as parsed from TOML) into a SweepSpec, or raise SpecError."""
    _reject_unknown("spec", raw, TOP_KEYS)
    if "name" not in raw:
        raise SpecError("name: missing; every spec needs a name (a short string used for the results folder)")
    name = _check_str("name", raw["name"])
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise SpecError(f"name: {name!r} cannot name a folder; use letters, digits, '-', '_' or '.'")
    device = check_choice("device", raw.get("device", "auto"), DEVICES)
    seed = _check_int("seed", raw.get("seed", 0), minimum=0)
    data = _check_str("data", raw.get("data", "synthetic"))
    model = dict(_table("model", raw.get("model", {})))
    size = check_choice("model.size", model.pop("size", "debug"), tuple(SIZES))
    spec = SweepSpec(
        name=name,
        description=_check_str("description", raw.get("description", "")),
        device=device,
        seed=seed,
        data=data,
        size=size,
        model=_check_config_overrides("model", model, ModelConfig, allowed=MODEL_KEYS[1:]),
        attention=_check_config_overrides("attention", _table("attention", raw.get("attention", {})), AttentionConfig),
        ffn=_check_config_overrides("ffn", _table("ffn", raw.get("ffn", {})), FFNConfig),
        axes=_check_axes(_table("axes", raw.get("axes", {}))),
        **{key: _check_section(key, _table(key, raw.get(key, {})), cls) for key, cls in SECTIONS.items()},
    )
    _check_combinations(spec)
    return spec


def _reject_unknown(where: str, table: dict, allowed) -> None:
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where != "spec" else ""
            raise SpecError(f"{prefix}{key}: unknown key; allowed: {', '.join(allowed)}")


def _table(key: str, value) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{key}: expected a table ([{key}]), got {value!r}")
    return value


# --- scalar checks ---


def _check_str(key: str, value) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{key}: expected a string, got {value!r}")
    return value


def check_choice(key: str, value, allowed: tuple, error: type[ValueError] = SpecError) -> str:
    """value if it is one of allowed, else `error` naming the key, the value and the choices."""
    if value not in allowed:
        raise error(f"{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


def _check_int(key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise SpecError(f"{key}: expected {what}, got {value!r}")
    return value


def _check_float(key: str, value, minimum: float | None = None, max_exclusive: float | None = None) -> float:
    bounds = "> 0" if minimum is None else f"≥ {minimum:g}"
    bounds += f" and < {max_exclusive:g}" if max_exclusive is not None else ""
    is_number = not isinstance(value, bool) and isinstance(value, (int, float))
    if (
        not is_number
        or not math.isfinite(value)
        or (minimum is None and value <= 0)
        or (minimum is not None and value < minimum)
        or (max_exclusive is not None and value >= max_exclusive)
    ):
        raise SpecError(f"{key}: expected a number {bounds} (finite), got {value!r}")
    return float(value)


def _check_value(key: str, value, annotation, metadata) -> object:
    """Check one value against a dataclass field's annotation and bounds."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        return _check_value(key, value, next(a for a in args if a is not type(None)), metadata)
    if annotation is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        return _check_int(key, value, minimum=metadata.get("min", 1))
    if annotation is float:
        return _check_float(key, value, metadata.get("min"), metadata.get("max_exclusive"))
    if annotation is str:
        if "choices" in metadata:  # a str field with a fixed set of values (field metadata)
            return check_choice(key, value, tuple(metadata["choices"]))
        return _check_str(key, value)
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise SpecError(f"{key}: expected a non-empty list, got []")
        return tuple(_check_value(f"{key}", item, args[0], metadata) for item in items)
    raise TypeError(f"no checker for {annotation!r}")  # a programming error, not a user one


def _check_section(section: str, table: dict, cls) -> object:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(section, table, tuple(fields))
    values = {k: _check_value(f"{section}.{k}", v, hints[k], fields[k].metadata) for k, v in table.items()}
    return cls(**values)


def _check_config_overrides(section: str, table: dict, cls, allowed: tuple | None = None) -> dict:
    """Overrides of a model-config dataclass; fields the axes own are refused here."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("attention", "ffn")}
    for key in table:
        if (section, key) in AXIS_FIELDS:
            axis = AXIS_FIELDS[(section, key)]
            raise SpecError(f"{section}.{key}: {table[key]!r} cannot be set here; the axis sets it: use [axes] {axis} = [...]")
    names = allowed or tuple(k for k in fields if (section, k) not in AXIS_FIELDS)
    _reject_unknown(section, table, names)
    hints = typing.get_type_hints(cls)
    return {k: _check_value(f"{section}.{k}", v, hints[k], fields[k].metadata) for k, v in table.items()}


def _check_axes(table: dict) -> dict:
    available = registry.axis_values()
    _reject_unknown("axes", table, AXES)
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
    cfg = base_config(spec)
    H, G, C = cfg.attention.n_heads, cfg.n_kv_heads(), cfg.d_model
    if cfg.attention.head_dim is None and C % H:
        raise SpecError(f"attention.n_heads: {H} does not divide model.d_model {C}; choose a divisor or set attention.head_dim")
    if H % G:
        raise SpecError(f"attention.n_kv_heads: {G} does not divide attention.n_heads {H}")
    if cfg.head_dim() % 2:
        raise SpecError(f"attention.head_dim: {cfg.head_dim()} is odd; RoPE needs an even head dim")
    if spec.data == "synthetic" and cfg.vocab_size < 256:
        raise SpecError(f"model.vocab_size: {cfg.vocab_size} is below 256, the byte vocabulary of the synthetic data")
    for kind in spec.axes["ffn"]:  # a variant may refuse a config it cannot build, in one line
        module = registry.FFN[kind].module
        if hasattr(module, "check_config"):
            problem = module.check_config(dataclasses.replace(cfg, ffn=dataclasses.replace(cfg.ffn, kind=kind)))
            if problem:
                raise SpecError(problem)
    _check_workloads(spec)
    _check_attention_variants(spec)


def _check_attention_variants(spec: SweepSpec) -> None:
    kinds, G = spec.axes["attention"], base_config(spec).attention.n_kv_heads
    if "mha" in kinds and "gqa" in kinds and G not in (None, base_config(spec).attention.n_heads):
        raise SpecError(f"attention.n_kv_heads: {G} would group the mha cells' KV heads too, making mha the same model as "
                        "gqa; leave it unset (gqa then uses n_heads/4) or drop mha from [axes] attention")
    for _, cfg in _cell_configs(spec):
        if registry.ATTENTION[cfg.attention.kind].module is MultiHeadLatentAttention:
            rope = mla_dims(cfg).Dr
            if rope % 2:
                raise SpecError(f"attention.qk_rope_head_dim: {rope} is odd; RoPE needs an even dim")


def _check_workloads(spec: SweepSpec) -> None:
    """Each workload that runs checks its own section against the cells it would build."""
    for name, workload in WORKLOADS.items():
        if name in spec.axes["workload"]:
            workload.check(spec, list(_cell_configs(dataclasses.replace(spec, axes={**spec.axes, "workload": (name,)}))))


# --- expansion ---


def base_config(spec: SweepSpec) -> ModelConfig:
    return config_from_size(spec.size, **spec.model, **spec.attention, **spec.ffn)


def _cell_configs(spec: SweepSpec):
    """(axes, model config) for each combination of the axes, as the cells are built."""
    base = base_config(spec)
    for combo in itertools.product(*(spec.axes[a] for a in AXES)):
        axes = dict(zip(AXES, combo))
        if not registry.FFN[axes["ffn"]].routed:
            axes["balance"] = "n/a"
        cfg = dataclasses.replace(
            base,
            precision=axes["precision"],
            attention=registry.normalize(dataclasses.replace(base.attention, kind=axes["attention"])),
            ffn=registry.normalize(dataclasses.replace(base.ffn, kind=axes["ffn"], balance=axes["balance"])),
        )
        yield axes, cfg


def expand(spec: SweepSpec, device: str) -> list[Cell]:
    """The product of the axes; balance collapses to n/a on unrouted FFNs; duplicates run once."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"expand() needs a resolved device (cpu or cuda), got {device!r}")
    measure = {"warmup": spec.measure.warmup, "repeats": spec.measure.repeats}
    # Replicate 0 is the plain cell, so its id matches an unreplicated run of the same spec.
    replicas = [measure] + [{**measure, "replicate": r} for r in range(1, spec.measure.replicates)]
    cells: dict[str, Cell] = {}
    for axes, cfg in _cell_configs(spec):
        workload = WORKLOADS[axes["workload"]]
        for settings in workload.cells(getattr(spec, workload.name), cfg):
            for replica in replicas:
                cell = Cell(axes, cfg, settings, replica, spec.seed, spec.data, device)
                cells.setdefault(cell.cell_id, cell)
    return list(cells.values())

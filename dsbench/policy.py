"""The check policy: how each metric of a cell is compared, baseline → current, and when timings
are. The shipped dsbench/policies/default.toml holds the [cells] and [timing] rules (its comments
state each); the [metrics] defaults come from the metric registry (dsbench/metrics.py); a user's
`--policy FILE` lays its keys over both, one by one.

    policy = load_policy()                  # the default
    policy = load_policy("my-policy.toml")  # the default with my keys over it
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dsbench.metrics import default_check_rules, metric_of, timing_columns
from dsbench.validate import check_choice
from dsbench.errors import PolicyError

RULES = ("exact", "relative", "absolute", "ignore")
DIRECTIONS = ("both", "higher", "lower")
POLICY_VERSION = 1


@dataclass(frozen=True)
class MetricRule:
    rule: str  # exact | relative | absolute
    tolerance: float = 0.0
    worse: str = "both"  # which direction of change fails: both | higher | lower

    def describe(self) -> str:
        if self.rule == "exact":
            return "exact"
        sign = {"both": "±", "higher": "+", "lower": "−"}[self.worse]
        return f"{sign}{self.tolerance:.0%}" if self.rule == "relative" else f"{sign}{self.tolerance:g}"


@dataclass(frozen=True)
class TimingRule:
    enabled: bool = True
    metric: str = "step_time_ms_min"
    reference: str = "first"
    threshold: float = 1.10
    spread_weight: float = 0.1
    noted_threshold: float = 1.5
    confirm_absolute: bool = True  # a regression must also show in the cell's own current ÷ baseline time
    # The samples rule (see default.toml): per-process values, a rank test and an effect size.
    samples_metric: str = "step_time_ms_min"  # each process's fastest step: half the spread of its median (default.toml)
    min_processes: int = 3
    samples_threshold: float = 1.05
    alpha: float = 0.05

    def limit(self, spread: float, noted: bool) -> float:
        base = self.noted_threshold if noted else self.threshold
        return base * max(1.0, spread) ** self.spread_weight


@dataclass(frozen=True)
class Policy:
    metrics: dict[str, MetricRule]
    timing: TimingRule
    match: str = "label"  # label | cell_id
    missing: str = "fail"  # fail | warn
    source: str = "default"


def _default_text() -> str:
    return resources.files("dsbench.policies").joinpath("default.toml").read_text()


def load_policy(path: str | Path | None = None) -> Policy:
    """The shipped default, with the keys of `path` (if given) laid over it one by one."""
    raw = tomllib.loads(_default_text())
    raw["metrics"] = {**default_check_rules(), **raw.get("metrics", {})}  # the registry's rules, then the file's
    if path is None:
        return parse_policy(raw, "default")
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"--policy: {str(path)!r} is not a file; pass a policy TOML file (see dsbench/policies/default.toml)")
    try:
        user = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"--policy: {str(path)!r} is not valid TOML: {e}") from None
    for key, value in user.items():
        if key not in raw:
            raise PolicyError(f"policy.{key}: unknown key; allowed: {', '.join(raw)}")
        raw[key] = {**raw[key], **value} if isinstance(raw[key], dict) and isinstance(value, dict) else value
    return parse_policy(raw, str(path))


def parse_policy(raw: dict, source: str) -> Policy:
    version = raw.get("version")
    if version != POLICY_VERSION:
        raise PolicyError(f"policy.version: {version!r} is not supported; this dsbench reads version {POLICY_VERSION}")
    cells = _table(raw, "cells", ("match", "missing"))
    timing = _table(raw, "timing", tuple(TimingRule.__dataclass_fields__))
    metrics = {name: _metric_rule(name, spec) for name, spec in _table(raw, "metrics", None).items()}
    return Policy(
        metrics={k: v for k, v in metrics.items() if v.rule != "ignore"},
        timing=_timing_rule(timing),
        match=_choice("cells.match", cells.get("match", "label"), ("label", "cell_id")),
        missing=_choice("cells.missing", cells.get("missing", "fail"), ("fail", "warn")),
        source=source,
    )


def _table(raw: dict, key: str, allowed: tuple | None) -> dict:
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise PolicyError(f"policy.{key}: expected a table ([{key}]), got {table!r}")
    for k in table if allowed is not None else ():
        if k not in allowed:
            raise PolicyError(f"policy.{key}.{k}: unknown key; allowed: {', '.join(allowed)}")
    return table


def _choice(key: str, value, allowed: tuple) -> str:
    return check_choice(f"policy.{key}", value, allowed, error=PolicyError)


def _number(key: str, value, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise PolicyError(f"policy.{key}: expected a number ≥ {minimum:g}, got {value!r}")
    return float(value)


def _metric_rule(name: str, spec) -> MetricRule:
    key = f"metrics.{name}"
    if not isinstance(spec, dict):
        raise PolicyError(f"policy.{key}: expected a table like {{ rule = \"exact\" }}, got {spec!r}")
    for k in spec:
        if k not in ("rule", "tolerance", "worse"):
            raise PolicyError(f"policy.{key}.{k}: unknown key; allowed: rule, tolerance, worse")
    rule = _choice(f"{key}.rule", spec.get("rule"), RULES)
    if rule in ("relative", "absolute") and "tolerance" not in spec:
        raise PolicyError(f"policy.{key}.tolerance: missing; a {rule} rule needs a tolerance ≥ 0")
    tolerance = _number(f"{key}.tolerance", spec.get("tolerance", 0.0), 0.0)
    if metric_of(name) is None or ("." in name and not _dotted_field_exists(name)):  # a typo would check nothing and pass
        raise PolicyError(f"policy.{key}: {name!r} is not a result column (dsbench/metrics.py lists them; a plug-in "
                          "registers its own there)")
    return MetricRule(rule, tolerance, _choice(f"{key}.worse", spec.get("worse", "both"), DIRECTIONS))


def _dotted_field_exists(name: str) -> bool:
    from dsbench.spec import dotted_field_exists  # the spec knows its sections (and imports the registry)

    return dotted_field_exists(name)


def _timing_rule(t: dict) -> TimingRule:
    for key in ("enabled", "confirm_absolute"):
        if not isinstance(t.get(key, True), bool):
            raise PolicyError(f"policy.timing.{key}: expected true or false, got {t.get(key)!r}")
    for key in ("metric", "reference", "samples_metric"):
        if not isinstance(t.get(key, "x"), str) or not t.get(key, "x"):
            raise PolicyError(f"policy.timing.{key}: expected a non-empty string, got {t.get(key)!r}")
    for key in ("metric", "samples_metric"):  # a column no cell has would time nothing and pass
        if key in t and t[key] not in timing_columns():
            raise PolicyError(f"policy.timing.{key}: {t[key]!r} is not a timing column; allowed: {', '.join(timing_columns())}")
    if "min_processes" in t and (isinstance(t["min_processes"], bool) or not isinstance(t["min_processes"], int)):
        raise PolicyError(f"policy.timing.min_processes: expected a whole number ≥ 2, got {t['min_processes']!r}")
    return TimingRule(
        enabled=t.get("enabled", True),
        confirm_absolute=t.get("confirm_absolute", True),
        metric=t.get("metric", TimingRule.metric),
        reference=t.get("reference", TimingRule.reference),
        threshold=_number("timing.threshold", t.get("threshold", TimingRule.threshold), 1.0),
        spread_weight=_number("timing.spread_weight", t.get("spread_weight", TimingRule.spread_weight), 0.0),
        noted_threshold=_number("timing.noted_threshold", t.get("noted_threshold", TimingRule.noted_threshold), 1.0),
        samples_metric=t.get("samples_metric", TimingRule.samples_metric),
        min_processes=int(_number("timing.min_processes", t.get("min_processes", TimingRule.min_processes), 2)),
        samples_threshold=_number("timing.samples_threshold", t.get("samples_threshold", TimingRule.samples_threshold), 1.0),
        alpha=_alpha(t.get("alpha", TimingRule.alpha)),
    )


def _alpha(value) -> float:
    alpha = _number("timing.alpha", value, 0.0)
    if not 0 < alpha < 0.5:
        raise PolicyError(f"policy.timing.alpha: expected a number between 0 and 0.5 (a one-sided significance level), got {value!r}")
    return alpha

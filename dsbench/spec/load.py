"""Loading a spec: a TOML file, or a preset shipped in dsbench/presets/."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from dsbench.errors import SpecError
from dsbench.presets import RENAMED

from .sweep import SweepSpec, parse_spec


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("dsbench.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> SweepSpec:
    names = preset_names()
    if name in RENAMED:
        raise SpecError(f"preset: {name!r} was renamed {RENAMED[name]!r} (names say the model size they hold); use --preset {RENAMED[name]}")
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

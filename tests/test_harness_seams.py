"""The harness asks variants through their contract (variants/base.py), never by probing or
importing one: no `hasattr` on a config or variant object, no import of a concrete variant module
outside the registry. The claims (dsbench/claims/) and the official configs (dsbench/official*)
are about DeepSeek's own models, so they may name them."""

from __future__ import annotations

import ast
from pathlib import Path

from dsbench.variants import registry

ROOT = Path(__file__).resolve().parents[1]
# Modules of the registered variants and the files they are split into (router, experts, …)
CONCRETE = {"attention", "mla", "dsa", "lightning_indexer", "ffn", "moe", "router", "experts", "dispatch"} | {
    cls.__module__.rsplit(".", 1)[-1] for table in registry.TABLES.values() for v in table.values() for cls in (v.module, v.config)}
CONFIG_NAMES = {"cfg", "config", "a", "f", "attention", "ffn", "part", "module", "variant"}


def harness_files() -> list[Path]:
    return [p for p in sorted((ROOT / "dsbench").rglob("*.py"))
            if "claims" not in p.relative_to(ROOT / "dsbench").parts and not p.name.startswith("official")]


def probes_a_config(call: ast.Call) -> bool:
    """hasattr(x, …) where x is a config or variant: cfg, a, f, cfg.ffn, model.cfg.attention, …"""
    if not (isinstance(call.func, ast.Name) and call.func.id == "hasattr" and call.args):
        return False
    target = call.args[0]
    names = [n.id for n in ast.walk(target) if isinstance(n, ast.Name)] + [n.attr for n in ast.walk(target) if isinstance(n, ast.Attribute)]
    return bool(set(names) & CONFIG_NAMES)


def concrete_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("dsbench.variants."):
                found += [node.module] if node.module.split(".")[2] in CONCRETE else []
            elif node.module == "dsbench.variants":
                found += [f"dsbench.variants.{a.name}" for a in node.names if a.name in CONCRETE]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("dsbench.variants.") and a.name.split(".")[2] in CONCRETE]
    return found


def test_no_hasattr_probe_of_a_config_in_the_harness():
    probes = [f"{p.relative_to(ROOT)}:{n.lineno} {ast.unparse(n)}" for p in harness_files()
              for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Call) and probes_a_config(n)]
    assert probes == []


def test_no_concrete_variant_import_in_the_harness():
    imports = [f"{p.relative_to(ROOT)}: {m}" for p in harness_files() for m in concrete_imports(ast.parse(p.read_text()))]
    assert imports == []


VARIANT_NAMES = {name for table in registry.TABLES.values() for name in table}


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (examples there name variants on purpose)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def variant_names(tree: ast.AST) -> list[str]:
    """String literals, docstrings aside, that are exactly a registered variant's name ("mla", "dense")."""
    skip = docstrings(tree)
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in VARIANT_NAMES and id(n) not in skip]


def test_no_concrete_variant_name_in_the_harness():
    named = [f"{p.relative_to(ROOT)}: {v}" for p in harness_files() for v in variant_names(ast.parse(p.read_text()))]
    assert named == []


def test_the_checks_see_what_they_look_for():
    assert variant_names(ast.parse('if cfg.ffn.kind == "deepseekmoe": pass')) == ["deepseekmoe"]
    assert variant_names(ast.parse('def f():\n    """pairs(cells, "attention", "mha", "mla")"""')) == []
    assert probes_a_config(ast.parse('hasattr(cfg.ffn, "layout")').body[0].value)
    assert not probes_a_config(ast.parse('hasattr(value, "item")').body[0].value)
    assert concrete_imports(ast.parse("from dsbench.variants.mla import mla_dims")) == ["dsbench.variants.mla"]
    assert concrete_imports(ast.parse("from dsbench.variants import decoder, registry")) == []

"""Size and coupling of the package, measured (the "open seams" issue's evidence):
import cycles among its modules, the largest modules and the longest functions.

    python scripts/code_metrics.py [--top 5]

Modules: dsbench/ as dsbench, variants/ as dsbench.variants, kernels/ as dsbench.kernels (the
pyproject mapping). Every import counts, top level or inside a function (a lazy import still
couples two modules); TYPE_CHECKING-only imports do not. Lines are physical lines of the file;
a function's length runs from its `def` (decorators excluded) to its last line, nested
functions counted in their parent too.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dsbench": ROOT / "dsbench", "dsbench.variants": ROOT / "variants", "dsbench.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    base = name if is_package else name.rsplit(".", 1)[0]
    guarded = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            anchor = base
            for _ in range(max(node.level - 1, 0)):
                anchor = anchor.rsplit(".", 1)[0]
            module = (anchor + ("." + node.module if node.module else "")) if node.level else node.module
            targets |= {module} | {f"{module}.{a.name}" for a in node.names}
    return targets


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in found.items():
        edges = set()
        for target in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            while target and target not in found:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            is_parent = found.get(target, Path()).name == "__init__.py" and name.startswith(target + ".")
            if target and target != name and not is_parent:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop(); on_stack.discard(w); component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]; counter[0] += 1; stack.append(child); on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[v] = min(low[v], index[child])
    return found


def function_lengths(found: dict[str, Path]) -> list[tuple[int, str]]:
    lengths = []
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name} ({path.relative_to(ROOT)}:{node.lineno})"))
    return sorted(lengths, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5)
    top = parser.parse_args().top
    found = modules()
    found_cycles = cycles(import_graph(found))
    print(f"import cycles among {len(found)} modules: {len(found_cycles)}")
    for c in found_cycles:
        print("  cycle:", " <-> ".join(c))
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(ROOT))) for p in found.values()), reverse=True)
    print(f"largest modules (lines): " + ", ".join(f"{path} {n}" for n, path in sizes[:top]))
    print("longest functions (lines):")
    for n, where in function_lengths(found)[:top]:
        print(f"  {n:4d}  {where}")


if __name__ == "__main__":
    main()

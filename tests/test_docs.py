"""Every code block of the docs (docs/**/*.md) runs here, so the docs cannot drift from the code.

The rule per fenced block, by its language (any other language fails `test_every_block_has_a_rule`):

- `python`: a block titled `title="NAME.py"` is a file: written into the page's working folder
  (which is on sys.path, as `PYTHONPATH=.` puts it). Every other block is executed, in page
  order, in one namespace per page.
- `toml`: parsed; a block titled `title="NAME.toml"` is also written into the working folder.
  A sweep spec (every block but `pyproject.toml` and policies) is validated with dsbench's spec
  parser (`parse_spec`, plug-ins named in it imported); a fragment without `name` gets one.
  `pyproject.toml` blocks must name the `dsbench.variants` entry-point group; `policy.toml`
  blocks load as a check policy.
- `bash`: each command (lines joined at `\\`, split at `&&`, comments and `VAR=value` prefixes
  dropped; the prefixes set the environment) must parse as a dsbench command line (Typer's own
  parser: options and types) and then runs cheaply: `run sweep` with `--dry-run` added (a GPU
  preset on a machine without one: previewed on the assumed target GPU); `presets`, `env` (no `--calibrate`), `claims` and `check` as written where every path
  they name exists; every other dsbench command is parsed only. `python scripts/X.py` and
  `scripts/X.sh` lines must name an existing script and only flags and environment variables
  it reads; `python -m M` an importable module; `pip install` only extras pyproject declares and
  .ci/run's torch pin; venv, activate, pytest and mkdocs lines are set-up and are not run.
- `text`: illustrative only (program output, error messages, folder layouts): not run. This
  is the one exemption, and it is explicit.

Each page runs in its own folder with the committed `results/<run>` folders linked in (read
only: nothing here writes into them) and `examples/`. The worked plug-ins of docs/extending/ are
also held to the variant contract and to a sweep → report → profile → check round trip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from dsbench import metrics, schema, workloads
from dsbench.cli import app
from dsbench.errors import SpecError
from dsbench.policy import load_policy
from dsbench.spec import expand, parse_spec
from dsbench.variants import registry
from dsbench.variants.config import config_from_size
from test_contract import check_contract  # the contract's own checks, which walk the registry's variants

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
LANGUAGES = ("python", "toml", "bash", "text")
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w+-]*)(?P<attrs>[^\n]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
SETUP = ("python3 -m venv", "python -m venv", ". ", "source ", "cd ", "python -m pytest", "python3 -m pytest",
         "python3 -m mkdocs", "python -m mkdocs")
RUN_AS_WRITTEN = ("presets", "env", "claims", "check")


@dataclasses.dataclass
class Block:
    page: str
    line: int
    lang: str
    title: str
    body: str

    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text()
    found = []
    for m in FENCE.finditer(text):
        title = re.search(r'title="([^"]+)"', m.group("attrs"))
        indent = len(m.group("indent"))
        body = "\n".join(line[indent:] for line in m.group("body").splitlines()) + "\n"
        found.append(Block(page, text[:m.start()].count("\n") + 1, m.group("lang"), title.group(1) if title else "", body))
    return found


def commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped, split at &&."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        out += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return out


# --- the rules ---


def test_the_docs_have_pages_and_every_block_has_a_rule():
    assert {"index.md", "metrics.md", "extending/dense-ffn.md", "extending/routed-ffn.md", "extending/workload.md"} <= set(PAGES)
    for page in PAGES:
        for block in blocks(page):
            assert block.lang in LANGUAGES, f"{block.where()}: fence language {block.lang!r}; use one of {LANGUAGES} (text: not run)"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert f": {page}\n" in nav, f"docs/{page} is not in mkdocs.yml's nav"


def test_command_splitting_rule():
    assert commands("a --x \\\n  --y  # note\nb && c # more\n# only a comment\n") == ["a --x --y", "b", "c"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A page's working folder: committed results linked in, on sys.path, the registry restored after."""
    (tmp_path / "results").mkdir()
    for run in (ROOT / "results").iterdir():
        (tmp_path / "results" / run.name).symlink_to(run, target_is_directory=True)
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    saved = {name: dict(table) for name, table in registry.TABLES.items()}, dict(metrics.METRICS), set(sys.modules)
    saved_workloads = dict(workloads.WORKLOADS), list(schema.WORKLOAD_SECTIONS)
    yield tmp_path
    for name, table in registry.TABLES.items():
        table.clear()
        table.update(saved[0][name])
    metrics.METRICS.clear()
    metrics.METRICS.update(saved[1])
    workloads.WORKLOADS.clear()
    workloads.WORKLOADS.update(saved_workloads[0])
    schema.WORKLOAD_SECTIONS[:] = saved_workloads[1]
    for module in set(sys.modules) - saved[2]:  # plug-ins a page imported: the next page imports its own
        if any(str(folder) in str(getattr(sys.modules[module], "__file__", None)) for folder in (tmp_path, ROOT / "examples")):
            del sys.modules[module]


def check_toml(block: Block, work: Path) -> None:
    data = tomllib.loads(block.body)
    if block.title:
        (work / block.title).write_text(block.body)
    if block.title == "pyproject.toml":
        assert data["project"]["entry-points"][registry.ENTRY_POINT_GROUP], block.where()
    elif block.title.endswith("policy.toml"):
        load_policy(path=work / block.title)
    else:
        parse_spec(data if "name" in data else {"name": "doc", **data})


def dsbench_command(args: list[str], env: dict, block: Block, work: Path) -> None:
    cmd, rest, path = typer.main.get_command(app), list(args), []
    while hasattr(cmd, "get_command"):
        assert rest, f"{block.where()}: `dsbench {' '.join(args)}` names no command"
        name = rest.pop(0)
        cmd = cmd.get_command(cmd.make_context("dsbench", [name, "--help"], resilient_parsing=True), name)
        assert cmd is not None, f"{block.where()}: `dsbench {' '.join(args)}`: no command {name!r}"
        path.append(name)
    try:
        cmd.make_context(" ".join(["dsbench", *path]), list(rest))  # options and their types; runs nothing
    except Exception as e:  # Typer's click: a usage error has format_message
        if not hasattr(e, "format_message"):
            raise
        raise AssertionError(f"{block.where()}: `dsbench {' '.join(args)}` does not parse: {e.format_message()}") from None
    run = None
    if path == ["run", "sweep"]:
        run = args if "--dry-run" in args else [*args, "--dry-run"]  # a GPU preset too: previewed on a target GPU anywhere
    elif path[0] in RUN_AS_WRITTEN and "--calibrate" not in args:
        paths = [a for a in rest if "/" in a and not a.startswith("-")]
        if all((work / p).exists() for p in paths):
            run = args
    if run is not None:
        done = CliRunner().invoke(app, run, env=env, catch_exceptions=False)
        assert done.exit_code == 0, f"{block.where()}: `dsbench {' '.join(run)}` exited {done.exit_code}:\n{done.output[-2000:]}"


def other_command(words: list[str], env: dict, line: str, block: Block) -> None:
    where = f"{block.where()}: `{line}`"
    if words[:1] in (["python"], ["python3"]) and len(words) > 1 and words[1].startswith("scripts/"):
        source = (ROOT / words[1]).read_text()
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"{where}: {words[1]} has no {flag}"
    elif words[:2] in (["python", "-m"], ["python3", "-m"]) and not line.startswith(SETUP):
        import importlib.util
        assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"
    elif words[0].startswith("scripts/") or words[:1] == ["bash"]:
        script = words[1] if words[0] == "bash" else words[0]
        source = (ROOT / script).read_text()
        for name in env:
            assert name in source, f"{where}: {script} reads no {name}"
    elif words[:2] == ["pip", "install"]:
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        pin = re.search(r"pip install --quiet (torch==\S+)", (ROOT / ".ci" / "run").read_text()).group(1)
        for word in words[2:]:
            if word.startswith("torch"):
                assert word == pin, f"{where}: .ci/run installs {pin}"
            for extra in re.findall(r"\[([\w,-]+)\]", word):
                assert set(extra.split(",")) <= extras, f"{where}: pyproject has no extra {extra}"
    else:
        assert line.startswith(SETUP), f"{where}: no rule runs this command (see tests/test_docs.py), or mark the block text"


def check_bash(block: Block, work: Path) -> None:
    for line in commands(block.body):
        words = shlex.split(line)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if "PYTHONPATH" in env:  # relative to the working folder, for the cells' own processes
            env["PYTHONPATH"] = os.pathsep.join(str(work / p) for p in env["PYTHONPATH"].split(os.pathsep))
        if words[0] == "dsbench":
            dsbench_command(words[1:], env, block, work)
        else:
            other_command(words, env, line, block)


@pytest.mark.parametrize("page", PAGES)
def test_page_code_blocks_run(page, workdir):
    namespace: dict = {"__name__": f"docs_{page}"}
    for block in blocks(page):
        if block.lang == "python" and block.title.endswith(".py"):
            (workdir / block.title).write_text(block.body)
        elif block.lang == "python":
            exec(compile(block.body, block.where(), "exec"), namespace)  # noqa: S102 — the docs' own example code
        elif block.lang == "toml":
            check_toml(block, workdir)
        elif block.lang == "bash":
            check_bash(block, workdir)


def test_readme_links_into_the_docs_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to a missing {target}"


# --- the contract tables: the docs' copy is the code's ---


def table_rows(text: str, header: str) -> list[str]:
    """The rows of the markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[at:]:
        if not line.startswith("|"):
            break
        rows.append(line.strip())
    return rows


def test_the_variant_contract_table_is_base_pys():
    from dsbench.variants import base
    page = table_rows((DOCS / "extending" / "index.md").read_text(), "| member | attention | FFN |")
    assert page == table_rows(base.__doc__, "| member | attention | FFN |"), "docs/extending/index.md's table differs from variants/base.py's"


def test_the_workload_page_names_every_member_of_the_contract():
    from dsbench.workloads.base import Workload
    text = (DOCS / "extending" / "workload.md").read_text()
    tables = "\n".join(table_rows(text, "| member |") + table_rows(text, "| method |"))
    members = set(Workload.__annotations__) | {name for name in vars(Workload) if not name.startswith("_")}
    missing = sorted(m for m in members if f"`{m}`" not in tables and f"`{m}(" not in tables)
    assert not missing, f"docs/extending/workload.md's contract tables do not name {missing}"


# --- the worked plug-ins: the contract, then one sweep → report → profile → check round trip ---

PLUGINS = {"relu2": ("extending/dense-ffn.md", "relu2_ffn.py", "relu2.toml"),
           "switch": ("extending/routed-ffn.md", "switch_ffn.py", "switch.toml")}
WORKLOAD = ("chunked-prefill", "extending/workload.md", "chunked_prefill.py", "chunked.toml")


def write_titled(page: str, folder: Path, *titles: str) -> None:
    titled = {b.title: b.body for b in blocks(page) if b.title}
    for title in titles:
        (folder / title).write_text(titled[title])


def write_plugin(kind: str, folder: Path) -> None:
    write_titled(*PLUGINS[kind][:1], folder, *PLUGINS[kind][1:])


@pytest.mark.parametrize("kind", PLUGINS)
def test_worked_plugin_meets_the_contract(kind, workdir):
    """tests/test_contract.py's checks, on the page's file, at every balance value it declares."""
    write_plugin(kind, workdir)
    registry.import_plugins([PLUGINS[kind][1].removesuffix(".py")])
    variant = registry.FFN[kind]
    assert variant.module.__module__ == PLUGINS[kind][1].removesuffix(".py")
    for balance in variant.module.balances if variant.routed else ("n/a",):
        routed = {"first_k_dense": 1, "balance": balance} if variant.routed else {}
        cfg = config_from_size("debug", ffn=kind, n_layers=3, **routed)
        check_contract("ffn", kind, cfg)


def test_the_routed_plugin_is_refused_expert_parallelism_in_the_pages_one_line(workdir):
    write_plugin("switch", workdir)
    raw = tomllib.loads((workdir / "switch.toml").read_text())
    with pytest.raises(SpecError) as e:
        parse_spec({**raw, "parallel": {"ep": 2}})
    assert "\n" not in str(e.value) and f"error: {e.value}" in (DOCS / PLUGINS["switch"][0]).read_text()
    with pytest.raises(SpecError, match="axes.balance: 'top2' is not available"):  # a value outside the axis
        parse_spec({**raw, "axes": {**raw["axes"], "balance": ["top2"]}})


def dsbench_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def merged_spec(specs: list[dict]) -> dict:
    """The pages' sweep specs as one: what they share at the top, each page's own settings a
    [[sweep]] block (cells that two pages share, the dense train cell, run once)."""
    keys = {k for spec in specs for k in spec} - {"name", "plugins"}
    shared = {k: specs[0][k] for k in keys if all(k in spec and spec[k] == specs[0][k] for spec in specs)}
    plugins = list(dict.fromkeys(p for spec in specs for p in spec.get("plugins", [])))
    sweep = [{k: v for k, v in spec.items() if k not in shared and k not in ("name", "plugins")} for spec in specs]
    return {"name": "worked-plugins", "plugins": plugins, **shared, "sweep": sweep}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_text(spec: dict) -> str:
    """A spec dict as TOML: top-level keys inline, then its [[sweep]] blocks."""
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in spec.items() if k != "sweep"]
    for block in spec.get("sweep", []):
        lines += ["", "[[sweep]]", *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in block.items())]
    return "\n".join(lines) + "\n"


def test_merged_spec_is_the_pages_sweeps(workdir):
    """The round trip's one spec holds every page's cells, and only those."""
    for kind in PLUGINS:
        write_plugin(kind, workdir)
    write_titled(WORKLOAD[1], workdir, *WORKLOAD[2:])
    names = (*(p[2] for p in PLUGINS.values()), WORKLOAD[3])
    specs = [tomllib.loads((workdir / name).read_text()) for name in names]
    merged = parse_spec(tomllib.loads(toml_text(merged_spec(specs))))
    ids = {c.cell_id for c in expand(merged, "cpu")}
    assert ids == {c.cell_id for spec in specs for c in expand(parse_spec(spec), "cpu")}


@pytest.mark.slow
def test_worked_plugins_sweep_profile_report_and_check(tmp_path):
    """The three worked plug-ins' specs as one sweep (with --profile), its report and its check."""
    for kind in PLUGINS:
        write_plugin(kind, tmp_path)
    write_titled(WORKLOAD[1], tmp_path, *WORKLOAD[2:])
    specs = [tomllib.loads((tmp_path / name).read_text()) for name in (*(p[2] for p in PLUGINS.values()), WORKLOAD[3])]
    (tmp_path / "worked.toml").write_text(toml_text(merged_spec(specs)))
    out = tmp_path / "results" / "worked"
    done = dsbench_process(["run", "sweep", "worked.toml", "--out", str(out), "--profile", "--profile-steps", "1"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = pd.read_parquet(out / "cells.parquet")
    assert (cells["status"] == "ok").all(), cells[["label", "error"]]
    train = cells[cells["workload"] == "train"]
    dense = train[train["ffn"] == "dense"]
    assert len(dense) == 1  # the pages share it: run once
    for kind in PLUGINS:
        for cell_id in train[train["ffn"] == kind]["cell_id"]:
            assert json.loads((out / "profiles" / cell_id / "profile.json").read_text())["parts"], cell_id
    # relu2: equal parameters to the dense FFN it is compared with, by construction
    relu2 = train[train["ffn"] == "relu2"]
    assert relu2["params_total"].item() == dense["params_total"].item() and (relu2["relu2_hidden"] == 288).all()
    # switch: each balance value, the balance columns and series from routing_metrics, its own column
    switch = train[train["ffn"] == "switch"]
    assert set(switch["balance"]) == {"none", "aux", "bias"} and set(dense["balance"]) == {"n/a"}
    assert (switch["n_experts"] == 4).all() and switch["maxvio_global"].notna().all()
    assert switch["router_entropy"].gt(0).all() and switch["switch_top1_prob"].between(0, 1).all()
    series = pd.read_parquet(out / "series.parquet")
    by_balance = dict(zip(switch["balance"], switch["cell_id"]))
    assert {"expert_load", "maxvio_batch", "router_entropy"} <= set(series[series["cell_id"] == by_balance["none"]]["metric"])
    assert "loss.aux" in set(series[series["cell_id"] == by_balance["aux"]]["metric"])
    assert "expert_bias" in set(series[series["cell_id"] == by_balance["bias"]]["metric"])
    # the workload: its cells beside prefill's, the same KV bytes per token
    chunked = cells[cells["workload"] == WORKLOAD[0]].set_index("attention")
    prefill = cells[cells["workload"] == "prefill"].set_index("attention")
    assert set(chunked.index) == {"mha", "mla"} and chunked["label"].str.endswith("b2×t64/c16").all()
    assert (chunked["kv_cache_bytes_per_token_measured"] == prefill["kv_cache_bytes_per_token_measured"]).all()
    report = dsbench_process(["report", str(out), "--out", str(tmp_path / "report")], tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    index = (tmp_path / "report" / "index.md").read_text()
    assert all(name in index for name in (*PLUGINS, WORKLOAD[0]))
    assert list((tmp_path / "report" / "figures").glob("*expert*load*.png"))
    check = dsbench_process(["check", "--baseline", str(out), "--current", str(out)], tmp_path)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]

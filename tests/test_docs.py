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
  preset on a machine without one: its cells expanded for cuda); `presets`, `env` (no `--calibrate`), `claims` and `check` as written where every path
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
import torch
import typer
from typer.testing import CliRunner

from dsbench import metrics
from dsbench.cli import app
from dsbench.policy import load_policy
from dsbench.spec import expand, load_preset, parse_spec
from dsbench.variants import registry
from dsbench.variants.base import FeedForward, PartConfig, PassShape
from dsbench.variants.config import config_from_size

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
    yield tmp_path
    for name, table in registry.TABLES.items():
        table.clear()
        table.update(saved[0][name])
    metrics.METRICS.clear()
    metrics.METRICS.update(saved[1])
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
        preset = rest[rest.index("--preset") + 1] if "--preset" in rest else None
        if preset and load_preset(preset).device == "cuda" and not torch.cuda.is_available():
            expand(load_preset(preset), "cuda")  # a GPU preset without a GPU: its cells expand as on one
            return
        run = args if "--dry-run" in args else [*args, "--dry-run"]
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


# --- the worked plug-ins: the contract, then a sweep → report → profile → check round trip ---

PLUGINS = {"relu2": ("extending/dense-ffn.md", "relu2_ffn.py", "relu2.toml"),
           "switch": ("extending/routed-ffn.md", "switch_ffn.py", "switch.toml")}
SHAPES = [PassShape(tokens=64, mean_context_len=16.5, decode=False, batch=2, act_bytes=4, weight_bytes=4),
          PassShape(tokens=2, mean_context_len=40.5, decode=True, batch=2, act_bytes=2, weight_bytes=2)]


def write_plugin(kind: str, folder: Path) -> None:
    page, module, spec = PLUGINS[kind]
    titled = {b.title: b.body for b in blocks(page) if b.title}
    (folder / module).write_text(titled[module])
    (folder / spec).write_text(titled[spec])


@pytest.mark.parametrize("kind", PLUGINS)
def test_worked_plugin_meets_the_contract(kind, workdir):
    write_plugin(kind, workdir)
    registry.import_plugins([PLUGINS[kind][1].removesuffix(".py")])
    variant = registry.FFN[kind]
    assert issubclass(variant.module, FeedForward) and dataclasses.is_dataclass(variant.config)
    assert issubclass(variant.config, PartConfig)
    for balance in ("none", "aux", "bias") if variant.routed else ("n/a",):
        cfg = config_from_size("debug", ffn=kind, n_layers=3, balance=balance)
        assert type(cfg.ffn) is variant.config and cfg.ffn.kind == kind
        assert variant.module.check_config(cfg) is None
        columns = variant.module.row_columns(cfg)
        assert all(isinstance(k, str) and (v is None or isinstance(v, (int, float, str, bool))) for k, v in columns.items())
        assert all(k in metrics.METRICS for k in columns)
        torch.manual_seed(0)
        for layer in range(cfg.n_layers):
            module = variant.build(cfg, layer)
            assert variant.module.param_count(cfg, layer) == sum(p.numel() for p in module.parameters())
            assert variant.module.active_param_count(cfg, layer) <= variant.module.param_count(cfg, layer)
            for shape in SHAPES:
                costs = variant.module.part_costs(cfg, layer, shape)
                total = shape.tokens * variant.module.flops_per_token(cfg, layer)
                assert sum(c.flops for c in costs.values()) == pytest.approx(total, rel=1e-12)
                assert all(c.bytes is None or c.bytes > 0 for c in costs.values())
            x = torch.randn(2, 5, cfg.d_model)
            assert module(x).shape == x.shape


def dsbench_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("kind", PLUGINS)
def test_worked_plugin_sweeps_profiles_reports_and_checks(kind, tmp_path):
    write_plugin(kind, tmp_path)
    out, spec = tmp_path / "results" / kind, PLUGINS[kind][2]
    done = dsbench_process(["run", "sweep", spec, "--out", str(out), "--profile", "--profile-steps", "1"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = pd.read_parquet(out / "cells.parquet")
    assert (cells["status"] == "ok").all(), cells[["label", "error"]]
    ours = cells[cells["ffn"] == kind]
    dense = cells[cells["ffn"] == "dense"]
    for cell_id in ours["cell_id"]:
        assert json.loads((out / "profiles" / cell_id / "profile.json").read_text())["parts"], cell_id
    if kind == "relu2":  # equal parameters to the dense FFN it is compared with, by construction
        assert ours["params_total"].item() == dense["params_total"].item() and (ours["relu2_hidden"] == 288).all()
    else:
        assert set(ours["balance"]) == {"none", "aux", "bias"} and set(dense["balance"]) == {"n/a"}
        assert ours["maxvio_global"].notna().all() and ours["switch_top1_prob"].between(0, 1).all()
        series = pd.read_parquet(out / "series.parquet")
        by_balance = dict(zip(ours["balance"], ours["cell_id"]))
        assert {"expert_load", "maxvio_batch", "routing_by_domain"} <= set(series[series["cell_id"] == by_balance["none"]]["metric"])
        assert "loss.aux" in set(series[series["cell_id"] == by_balance["aux"]]["metric"])
        assert "expert_bias" in set(series[series["cell_id"] == by_balance["bias"]]["metric"])
    report = dsbench_process(["report", str(out), "--out", str(tmp_path / "report")], tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert kind in (tmp_path / "report" / "index.md").read_text()
    if kind == "switch":
        assert list((tmp_path / "report" / "figures").glob("*expert*load*.png"))
    check = dsbench_process(["check", "--baseline", str(out), "--current", str(out)], tmp_path)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]

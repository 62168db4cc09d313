"""A variant from outside the package (examples/sliding_window.py) sweeps, profiles, reports and
checks like a built-in one: loaded by a spec's `plugins` key, or by the `dsbench.variants`
entry-point group of an installed distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SPEC = """
name = "swa"
device = "cpu"
plugins = ["sliding_window"]

[model]
size = "debug"
n_layers = 1

[attention]
window = 8

[axes]
workload = ["train"]
attention = ["mha", "swa"]

[train]
steps = 4
batch_size = 2
seq_len = 16
eval_batches = 1

[measure]
warmup = 1
repeats = 2
calibrate = false
"""


def run(args: list[str], cwd: Path, pythonpath: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_plugin_variant_sweeps_profiles_reports_and_checks(tmp_path):
    spec = tmp_path / "swa.toml"
    spec.write_text(SPEC)
    out = tmp_path / "results"
    done = run(["run", "sweep", str(spec), "--out", str(out), "--profile", "--profile-steps", "1"], tmp_path, str(EXAMPLES))
    assert done.returncode == 0, done.stderr[-2000:]
    cells = pd.read_parquet(out / "cells.parquet")
    assert set(cells["attention"]) == {"mha", "swa"} and (cells["status"] == "ok").all()
    swa = cells[cells["attention"] == "swa"]
    assert (swa["window"] == 8).all() and cells[cells["attention"] == "mha"]["window"].isna().all()
    # its own FLOP formula: the window caps the keys (mean causal context (16 + 1)/2 > 8)
    assert swa["flops_per_token"].item() < cells[cells["attention"] == "mha"]["flops_per_token"].item()
    for cell_id in swa["cell_id"]:
        profile = json.loads((out / "profiles" / cell_id / "profile.json").read_text())
        assert profile["parts"], cell_id
    report = run(["report", str(out), "--out", str(tmp_path / "report")], tmp_path, str(EXAMPLES))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "swa" in (tmp_path / "report" / "index.md").read_text()
    check = run(["check", "--baseline", str(out), "--current", str(out)], tmp_path, str(EXAMPLES))
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "bad"\nplugins = ["no_such_plugin_module"]\n')
    done = run(["run", "sweep", str(spec), "--dry-run"], tmp_path, "")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: plugins: cannot import 'no_such_plugin_module'")
    assert "Traceback" not in done.stderr


def test_entry_point_group_registers_an_installed_plugin(tmp_path):
    # A distribution as pip installs it: a dist-info folder with entry_points.txt on the path.
    site = tmp_path / "site"
    info = site / "swa_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: swa-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dsbench.variants]\nswa = sliding_window\n")
    code = textwrap.dedent("""
        from dsbench.spec import parse_spec, expand
        spec = parse_spec({"name": "t", "axes": {"attention": ["swa"]}, "attention": {"window": 4}})
        print(expand(spec, "cpu")[0].label())
    """)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{EXAMPLES}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("train/dense/swa/fp32")

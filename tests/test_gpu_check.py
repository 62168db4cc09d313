"""scripts/gpu_check.sh, on this CPU machine: it says in one line that there is no CUDA device
and exits 1, and every dsbench command and script flag it will run on a GPU exists (a typo there
would only show on the first GPU, which a session may get once)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsbench.cli import app

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def commands() -> list[str]:
    """The script's command lines, continuation lines joined."""
    return SCRIPT.read_text().replace("\\\n", " ").splitlines()


def test_the_script_parses_and_without_cuda_says_so(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" or Path("/dev/nvidia0").exists():
        pytest.skip("a CUDA machine: the script would run for minutes")
    done = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| cuda | no CUDA device visible to" in summary
    assert (tmp_path / "out" / "gpu_check.tar.gz").exists()


@pytest.mark.parametrize("sub", [("run", "sweep"), ("run", "cell"), ("report",), ("profile",)])
def test_every_dsbench_flag_the_script_passes_exists(sub):
    lines = [line for line in commands() if re.search(r"\bdsbench " + " ".join(sub) + r"\b", line)]
    if not lines:
        pytest.skip(f"the script runs no dsbench {' '.join(sub)}")
    help_text = CliRunner().invoke(app, [*sub, "--help"], env={"COLUMNS": "240", "NO_COLOR": "1"}).output
    for line in lines:
        for flag in re.findall(r"(?<=\s)--[a-z][a-z0-9-]*", line.split("dsbench " + " ".join(sub), 1)[1]):
            assert flag in help_text, f"dsbench {' '.join(sub)} has no {flag} (gpu_check.sh: {line.strip()})"


@pytest.mark.parametrize("script", ["fp8_gemm_bench.py", "mla_decode_bench.py"])
def test_every_benchmark_flag_the_script_passes_exists(script):
    lines = [line for line in commands() if f"scripts/{script}" in line]
    assert lines, f"gpu_check.sh runs no {script}"
    help_text = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True,
                               timeout=60, cwd=ROOT).stdout
    for flag in re.findall(r"(?<=\s)--[a-z][a-z0-9-]*", lines[0].split(script, 1)[1]):
        assert flag in help_text, f"{script} has no {flag}"


@pytest.mark.parametrize("steps", ["nope", "kernel_tests,kernel_test", "medium-gpu-sweep"])
def test_an_unknown_step_in_gpu_check_steps_is_one_line_and_exit_2(tmp_path, steps):
    done = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_STEPS": steps},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("GPU_CHECK_STEPS: '") and "allowed: nvidia_smi," in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written

"""A GPU sweep previewed anywhere: `dsbench run sweep --preset X-gpu --dry-run [--target GPU]` on a
machine without CUDA lists the cells as they would run on the target (memory against its memory,
the datasheet's fastest step, the kernels auto would consider on CUDA) and names the cells that
would not fit; a real run still refuses cuda without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_cli import assert_usage_error, dsbench_in_process

from dsbench import targets
from dsbench.errors import UsageError
from dsbench.hardware import KNOWN_PEAKS
from dsbench.spec import expand, load_preset

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="previews a GPU sweep on a machine without one")
GPU_PRESETS = ("paper-gpu", "medium-gpu", "long-context-gpu")


@no_cuda
@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_dry_run_without_target_says_what_it_assumed(preset):
    done = dsbench_in_process("run", "sweep", "--preset", preset, "--dry-run")
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and f"--target {targets.ASSUMED} (assumed" in notes[0], done.stderr  # one line
    n = len(expand(load_preset(preset), "cuda"))
    assert f"{preset}: {n} cells on {targets.ASSUMED}" in done.stdout
    assert f"all {n} cells fit on {targets.ASSUMED}" in done.stdout


@no_cuda
@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_dry_run_on_a_named_target(preset):
    done = dsbench_in_process("run", "sweep", "--preset", preset, "--dry-run", "--target", "h200-141gb", "--executor", "slurm")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""  # named: nothing assumed
    header = next(line for line in done.stdout.splitlines() if "cell_id" in line)
    for column in ("params_", "flops/token", "kv B/token", "est. MiB", "fits", "≥ ms/step", "kernels"):
        assert column in header
    assert "H200: 141 GB, bf16 989 TFLOP/s, fp8 1,979 TFLOP/s, 4.80 TB/s" in done.stdout
    assert "cells fit on h200-141gb (141 GB)" in done.stdout


@no_cuda
def test_a_cell_that_does_not_fit_is_named_and_refused_unless_forced():
    """large-gpu's b64 × ctx8064 decode cell needs ~138 GB: not on an 80 GB H100, on an H200 yes."""
    big = [c for c in expand(load_preset("large-gpu"), "cuda") if targets.memory_need(c) > 80e9]
    assert len(big) == 1
    done = dsbench_in_process("run", "sweep", "--preset", "large-gpu", "--dry-run", "--target", "h100-80gb")
    assert_usage_error(done, "memory: 1 of 5 cells would not fit on h100-80gb (80 GB)", big[0].cell_id, "--force")
    assert "NO" in done.stdout  # the table first, the cell marked
    forced = dsbench_in_process("run", "sweep", "--preset", "large-gpu", "--dry-run", "--target", "h100-80gb", "--force")
    assert forced.returncode == 0 and "1 of 5 cells would not fit (marked NO) on h100-80gb" in forced.stdout
    assert dsbench_in_process("run", "sweep", "--preset", "large-gpu", "--dry-run", "--target", "h200-141gb").returncode == 0
    assumed = dsbench_in_process("run", "sweep", "--preset", "large-gpu", "--dry-run")  # no GPU named: listed, not refused
    assert assumed.returncode == 0 and "1 of 5 cells would not fit (marked NO) on h100-80gb" in assumed.stdout


def test_an_unknown_target_is_one_line_and_exit_2():
    done = dsbench_in_process("run", "sweep", "--preset", "medium-gpu", "--dry-run", "--target", "h100")
    assert_usage_error(done, "--target", "'h100'", "h100-80gb", "h200-141gb", "a100-80gb")


def test_target_needs_dry_run_and_a_gpu_spec():
    assert_usage_error(dsbench_in_process("run", "sweep", "--preset", "medium-gpu", "--target", "h100-80gb"), "--target", "--dry-run")
    assert_usage_error(dsbench_in_process("run", "sweep", "--preset", "smoke", "--dry-run", "--device", "cpu", "--target", "h100-80gb"),
                       "--target", "device is cpu")


@no_cuda
def test_a_real_run_of_a_gpu_preset_still_refuses_cuda(tmp_path):
    done = dsbench_in_process("run", "sweep", "--preset", "medium-gpu", "--out", str(tmp_path / "run"))
    assert_usage_error(done, "device", "'cuda' requested", "is_available() is False")
    assert not (tmp_path / "run").exists()


@no_cuda
def test_cuda_kernel_preview_on_a_cpu_imports_no_triton():
    """kernels.choice.preview for CUDA on a CPU machine: auto's CUDA candidates (our Triton kernel and
    cuBLASLt for fp8_gemm) from each implementation's device_ok, never by importing triton."""
    code = ("import sys; from typer.testing import CliRunner; from dsbench.cli import app; "
            "r = CliRunner().invoke(app, ['run', 'sweep', '--preset', 'paper-gpu', '--dry-run', '--target', 'h100-80gb']); "
            "assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "400", "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    from dsbench.spec import kernel_plan

    fp8 = next(c for c in expand(load_preset("paper-gpu"), "cuda") if c.model.precision == "fp8")
    plan = kernel_plan(fp8)["fp8_gemm"]
    assert plan.startswith("auto(") and "triton" in plan and "cublas" in plan
    on_cpu = kernel_plan(next(c for c in expand(load_preset("paper-cpu"), "cpu") if c.model.precision == "fp8"))["fp8_gemm"]
    assert "cublas" not in on_cpu  # cuBLASLt: CUDA only (triton shows here only under TRITON_INTERPRET=1, as the tests run)


def test_every_target_has_its_datasheet_row():
    assert targets.ASSUMED in targets.TARGETS
    for name, t in targets.TARGETS.items():
        assert t.name == name and t.gpu in KNOWN_PEAKS and t.memory_gb > 0
        assert t.peak_flops_per_s("bf16") and t.bandwidth_bytes_per_s
        assert name.endswith(f"-{t.memory_gb:g}gb")  # the name says the memory it is checked against
    assert targets.TARGETS["a100-80gb"].peak_flops_per_s("fp8") is None  # Ampere: no FP8 tensor cores


def test_preview_device_rules():
    assert targets.preview_device("cuda", None, cuda_here=False).target.name == targets.ASSUMED
    assert targets.preview_device("cuda", None, cuda_here=False).note
    assert targets.preview_device("cuda", None, cuda_here=True) == targets.Preview("cuda", None)  # this GPU's own memory
    assert targets.preview_device("auto", None, cuda_here=False) == targets.Preview("cpu", None)
    assert targets.preview_device("auto", "a100-40gb", cuda_here=False).device == "cuda"
    with pytest.raises(UsageError, match="device is cpu"):
        targets.preview_device("cpu", "h100-80gb", cuda_here=False)


def test_light_ms_is_the_roofline_light_step_on_the_target():
    from dsbench.roofline import light_step

    h100 = targets.TARGETS["h100-80gb"]
    cells = expand(load_preset("medium-gpu"), "cuda")
    for cell in cells:
        ms, bound = targets.light_ms(cell, h100)
        seconds, expected, _ = light_step(cell, h100.peak_flops_per_s("bf16"), h100.bandwidth_bytes_per_s)
        assert ms == pytest.approx(1e3 * seconds) and bound == expected
    assert {targets.light_ms(c, h100)[1] for c in cells} == {"compute", "memory"}  # train/prefill compute, decode memory
    fp8 = next(c for c in expand(load_preset("paper-gpu"), "cuda") if c.model.precision == "fp8")
    assert targets.light_ms(fp8, targets.TARGETS["a100-80gb"]) == (None, "fp8 emulated on a100-80gb")

import json
import math
import time

import pytest
import torch

from dsbench import hardware
from dsbench.hardware import (
    KNOWN_PEAKS,
    calibrate,
    dtype_key,
    environment,
    lookup_bandwidth_bytes_per_s,
    lookup_peak,
    match_gpu,
    peak_flops_per_s,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# -- environment ---------------------------------------------------------------------------------


def test_environment_is_json_with_expected_keys():
    t0 = time.perf_counter()
    env = environment()
    assert time.perf_counter() - t0 < 2.0  # budget is 0.5 s; slack for a loaded CI box
    json.dumps(env)
    for key in ("python_version", "platform", "hostname", "torch_version", "torch_cuda_version",
                "triton_version", "cudnn_version", "cuda_available", "driver_version",
                "gpu_name", "gpu_count", "gpu_total_memory_bytes", "cpu_model",
                "cpu_count_logical", "torch_num_threads", "ram_total_bytes", "numpy_version",
                "env"):
        assert key in env
    assert env["torch_version"] == torch.__version__
    assert env["cpu_count_logical"] >= 1 and env["ram_total_bytes"] > 0


def test_environment_records_numerics_env_vars(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    env = environment()["env"]
    assert env["OMP_NUM_THREADS"] == "3" and "TRITON_INTERPRET" not in env


# -- datasheet peaks -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H200", "H200"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H800", "H800 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA B200", "B200"),
])
def test_match_gpu(name, key):
    assert match_gpu(name) == key


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA L40",
                                  "NVIDIA GeForce RTX 4090 D", "Tesla T4", ""])
def test_unknown_gpus_do_not_match(name):
    assert match_gpu(name) is None
    assert lookup_peak(name, "bf16") is None


def test_lookup_peak_values():
    assert lookup_peak("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert lookup_peak("NVIDIA H100 80GB HBM3", "fp8") == pytest.approx(1978.9e12)
    assert lookup_peak("NVIDIA H100 PCIe", "bf16") < lookup_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert lookup_peak("NVIDIA H200", "bfloat16") == lookup_peak("NVIDIA H200", "bf16")
    assert lookup_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 tensor cores
    assert lookup_bandwidth_bytes_per_s("NVIDIA H200") == pytest.approx(4.8e12)


def test_known_peaks_table_is_complete_and_dense():
    for key, row in KNOWN_PEAKS.items():
        assert set(row) == {"fp32", "tf32", "bf16", "fp16", "fp8", "hbm_bytes_per_s"}, key
        assert row["hbm_bytes_per_s"] > 1e11
        # bf16 runs at 2x tf32 on every listed part; 2.1 allows the B200 datasheet's rounding
        # (TF32 2.2 PF sparse vs BF16 4.5 PF). A sparse figure left unhalved would break this.
        assert row["fp32"] <= row["bf16"] <= 2.1 * row["tf32"]
        # fp8 is 2x bf16; rel 0.02 because the L40S datasheet prints BF16 362.05 vs FP8 733.
        assert row["fp8"] is None or row["fp8"] == pytest.approx(2 * row["bf16"], rel=0.02)


def test_dtype_key():
    assert dtype_key(torch.float32) == "fp32"
    assert dtype_key(torch.bfloat16) == "bf16"
    assert dtype_key(torch.float16, "cpu") == "fp16"


# -- calibration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, key", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_calibrate_cpu_small_budget(dtype, key):
    t0 = time.perf_counter()
    cal = calibrate(torch.device("cpu"), dtype, budget_s=0.5)
    elapsed_s = time.perf_counter() - t0
    assert elapsed_s < 5.0
    json.dumps(cal)
    assert cal["dtype"] == key and cal["device"] == "cpu"
    assert cal["matmul_flops_per_s_by_size"] and 512 in cal["matmul_flops_per_s_by_size"]
    for v in (cal["matmul_flops_per_s"], cal["copy_bytes_per_s"],
              *cal["matmul_flops_per_s_by_size"].values()):
        assert math.isfinite(v) and v > 0
    assert cal["matmul_flops_per_s"] == max(cal["matmul_flops_per_s_by_size"].values())
    assert cal["method"] and cal["measured_at"]


@pytest.mark.gpu
@needs_cuda
def test_calibrate_cuda():
    cal = calibrate(torch.device("cuda"), torch.bfloat16, budget_s=2.0)
    assert cal["matmul_flops_per_s"] > 1e12 and cal["copy_bytes_per_s"] > 1e11


# -- peak selection ------------------------------------------------------------------------------

_CAL = {"matmul_flops_per_s": 1e11, "dtype": "bf16", "device": "cpu", "method": "test"}


def test_peak_datasheet_on_known_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "_gpu_name", lambda device: "NVIDIA H200")
    peak, source = peak_flops_per_s(torch.device("cuda:0"), "bf16", None)
    assert peak == pytest.approx(989.4e12) and source == "datasheet:H200"


def test_peak_calibrated_on_unknown_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "_gpu_name", lambda device: "Tesla T4")
    cal = {**_CAL, "device": "cuda:0"}
    assert peak_flops_per_s("cuda:0", "bf16", cal) == (1e11, "calibrated:test")


def test_peak_calibrated_on_cpu():
    assert peak_flops_per_s("cpu", "bf16", _CAL) == (1e11, "calibrated:test")


def test_peak_unknown():
    assert peak_flops_per_s("cpu", "bf16", None) == (None, "unknown")
    # Never divide an fp8 run by a bf16 calibration, nor a CPU run by a GPU one.
    assert peak_flops_per_s("cpu", "fp8", _CAL) == (None, "unknown")
    assert peak_flops_per_s("cpu", "bf16", {**_CAL, "device": "cuda:0"}) == (None, "unknown")


def test_peak_known_gpu_without_dtype_falls_back(monkeypatch):
    monkeypatch.setattr(hardware, "_gpu_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert peak_flops_per_s("cuda:0", "fp8", None) == (None, "unknown")


# --- the best-known ceiling per machine fingerprint ---

def _calibration(gflops: float, gbs: float = 10.0) -> dict:
    return {"matmul_flops_per_s": gflops * 1e9, "copy_bytes_per_s": gbs * 1e9, "dtype": "fp32", "device": "cpu",
            "method": "test", "measured_at": "2026-12-07T00:00:00+00:00"}


def test_a_loaded_calibration_does_not_lower_the_ceiling(tmp_path):
    from dsbench.hardware import with_best_known

    cache = str(tmp_path / "c.json")
    first = with_best_known(_calibration(190.0, 12.0), cache)
    loaded = with_best_known(_calibration(40.0, 3.0), cache)  # a neighbour's load only slows a measurement
    better = with_best_known(_calibration(200.0, 11.0), cache)
    assert first["matmul_flops_per_s"] == 190e9 and loaded["matmul_flops_per_s"] == 190e9
    assert loaded["matmul_flops_per_s_measured"] == 40e9 and loaded["copy_bytes_per_s"] == 12e9
    assert better["matmul_flops_per_s"] == 200e9 and better["copy_bytes_per_s"] == 12e9
    assert "best of 3 calibrations" in better["ceiling_source"] and "measured 200.0 GFLOP/s" in better["ceiling_source"]


def test_the_fingerprint_separates_thread_counts_and_dtypes(tmp_path, monkeypatch):
    from dsbench import hardware

    one = hardware.machine_fingerprint("cpu", "fp32")
    monkeypatch.setattr(hardware.torch, "get_num_threads", lambda: 97)
    assert hardware.machine_fingerprint("cpu", "fp32") != one and "threads=97" in hardware.machine_fingerprint("cpu", "fp32")
    assert hardware.machine_fingerprint("cpu", "bf16") != hardware.machine_fingerprint("cpu", "fp32")


def test_a_corrupt_or_disabled_cache_is_no_error(tmp_path, monkeypatch):
    from dsbench.hardware import with_best_known

    bad = tmp_path / "c.json"
    bad.write_text("[not json")
    assert with_best_known(_calibration(50.0), str(bad))["matmul_flops_per_s"] == 50e9
    monkeypatch.setenv("DSBENCH_CALIBRATION_CACHE", "off")
    assert with_best_known(_calibration(5.0)) == _calibration(5.0)

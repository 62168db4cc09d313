"""What machine a result came from, and what its peak throughput is.

`environment()` is the fast fingerprint stored with every run; `KNOWN_PEAKS` holds datasheet
peaks; `calibrate()` measures matmul FLOP/s and copy bandwidth where no datasheet applies;
`peak_flops_per_s()` picks between the two for MFU.

Imported by the per-cell worker: stdlib, numpy and torch only; pynvml lazily.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import socket
import time

import numpy as np
import torch

from dsbench.measure import StepTimer

__all__ = [
    "environment",
    "KNOWN_PEAKS",
    "match_gpu",
    "lookup_peak",
    "lookup_bandwidth_bytes_per_s",
    "dtype_key",
    "calibrate",
    "with_best_known",
    "peak_flops_per_s",
]

# ---------------------------------------------------------------------------------------------
# Environment

# Env vars that change numerics, threading or which device runs.
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")


def environment() -> dict:
    """A JSON-serialisable description of this machine and software stack (no benchmarking)."""
    env = {
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "triton_version": _triton_version(),
        "cudnn_version": _cudnn_version(),
        "numpy_version": np.__version__,
        "cuda_available": torch.cuda.is_available(),
        "driver_version": _nvidia_driver_version(),
        **_gpu_info(),
        "cpu_model": _cpu_model(),
        "cpu_count_logical": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "ram_total_bytes": _ram_total_bytes(),
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
    }
    return env


def _triton_version() -> str | None:
    # Read the distribution metadata: importing triton itself costs a second or more.
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cudnn_version() -> int | None:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        return None


def _nvidia_driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {"gpu_name": None, "gpu_names": [], "gpu_count": 0,
                "gpu_total_memory_bytes": None, "gpu_compute_capability": None}
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {
        "gpu_name": props[0].name,  # the device a cell runs on unless told otherwise
        "gpu_names": [p.name for p in props],
        "gpu_count": len(props),
        "gpu_total_memory_bytes": int(props[0].total_memory),
        "gpu_compute_capability": f"{props[0].major}.{props[0].minor}",
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_total_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Datasheet peaks
#
# Dense peaks only: datasheets print Tensor Core FLOP/s "with sparsity" (2:4 structured,
# marked *); those figures are halved here. "fp32" is the non-tensor FP32 (CUDA core) rate;
# "tf32" is fp32 matmul on tensor cores; "bf16"/"fp16" and "fp8" are tensor-core rates with
# FP32 accumulation. hbm_bytes_per_s is the DRAM bandwidth (GDDR on L40S / RTX 4090).
# A value of None means the arithmetic has no hardware support on that GPU.

_T = 1e12

KNOWN_PEAKS: dict[str, dict[str, float | None]] = {
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM / H100 NVL columns).
    "H100 SXM": {"fp32": 66.9 * _T, "tf32": 494.7 * _T, "bf16": 989.4 * _T,
                 "fp16": 989.4 * _T, "fp8": 1978.9 * _T, "hbm_bytes_per_s": 3.35e12},
    "H100 NVL": {"fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T,
                 "fp16": 835.5 * _T, "fp8": 1670.5 * _T, "hbm_bytes_per_s": 3.9e12},
    # NVIDIA H100 PCIe product brief / H100 datasheet (PCIe column).
    "H100 PCIe": {"fp32": 51.2 * _T, "tf32": 378 * _T, "bf16": 756.5 * _T,
                  "fp16": 756.5 * _T, "fp8": 1513 * _T, "hbm_bytes_per_s": 2.0e12},
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM / H200 NVL columns).
    "H200": {"fp32": 66.9 * _T, "tf32": 494.7 * _T, "bf16": 989.4 * _T,
             "fp16": 989.4 * _T, "fp8": 1978.9 * _T, "hbm_bytes_per_s": 4.8e12},
    "H200 NVL": {"fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T,
                 "fp16": 835.5 * _T, "fp8": 1670.5 * _T, "hbm_bytes_per_s": 4.8e12},
    # NVIDIA H800 datasheet: H100 silicon with FP64 and NVLink cut; tensor rates as H100.
    "H800 SXM": {"fp32": 66.9 * _T, "tf32": 494.7 * _T, "bf16": 989.4 * _T,
                 "fp16": 989.4 * _T, "fp8": 1978.9 * _T, "hbm_bytes_per_s": 3.35e12},
    "H800 PCIe": {"fp32": 51.2 * _T, "tf32": 378 * _T, "bf16": 756.5 * _T,
                  "fp16": 756.5 * _T, "fp8": 1513 * _T, "hbm_bytes_per_s": 2.0e12},
    # NVIDIA A100 Tensor Core GPU datasheet; no FP8 tensor cores (Ampere).
    "A100 SXM 80GB": {"fp32": 19.5 * _T, "tf32": 156 * _T, "bf16": 312 * _T,
                      "fp16": 312 * _T, "fp8": None, "hbm_bytes_per_s": 2.039e12},
    "A100 SXM 40GB": {"fp32": 19.5 * _T, "tf32": 156 * _T, "bf16": 312 * _T,
                      "fp16": 312 * _T, "fp8": None, "hbm_bytes_per_s": 1.555e12},
    "A100 PCIe 80GB": {"fp32": 19.5 * _T, "tf32": 156 * _T, "bf16": 312 * _T,
                       "fp16": 312 * _T, "fp8": None, "hbm_bytes_per_s": 1.935e12},
    "A100 PCIe 40GB": {"fp32": 19.5 * _T, "tf32": 156 * _T, "bf16": 312 * _T,
                       "fp16": 312 * _T, "fp8": None, "hbm_bytes_per_s": 1.555e12},
    # NVIDIA L40S GPU datasheet.
    "L40S": {"fp32": 91.6 * _T, "tf32": 183 * _T, "bf16": 362.05 * _T,
             "fp16": 362.05 * _T, "fp8": 733 * _T, "hbm_bytes_per_s": 864e9},
    # NVIDIA Ada Lovelace GPU architecture whitepaper, GeForce RTX 4090 column (FP32-accumulate
    # rates; GeForce halves them relative to FP16-accumulate).
    "RTX 4090": {"fp32": 82.6 * _T, "tf32": 82.6 * _T, "bf16": 165.2 * _T,
                 "fp16": 165.2 * _T, "fp8": 330.3 * _T, "hbm_bytes_per_s": 1008e9},
    # NVIDIA Blackwell / HGX B200 datasheet, per-GPU column (1000 W HGX configuration).
    "B200": {"fp32": 75 * _T, "tf32": 1100 * _T, "bf16": 2250 * _T,
             "fp16": 2250 * _T, "fp8": 4500 * _T, "hbm_bytes_per_s": 7.7e12},
}

# Ordered: the first pattern found (re.search, case-insensitive) in the torch device name wins,
# so specific variants come before their family. Names as torch reports them, e.g.
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA GeForce RTX 4090".
# \b keeps GH200 / GB200 (different parts) from matching H200 / B200.
_GPU_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b", "H100 SXM"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200"),
    (r"\bh800\b.*\bpcie\b", "H800 PCIe"),
    (r"\bh800\b", "H800 SXM"),
    (r"\ba100\b.*(80gb.*pcie|pcie.*80gb)", "A100 PCIe 80GB"),
    (r"\ba100\b.*pcie", "A100 PCIe 40GB"),
    (r"\ba100\b.*80gb", "A100 SXM 80GB"),
    (r"\ba100\b", "A100 SXM 40GB"),
    (r"\bl40s\b", "L40S"),
    (r"\brtx 4090\b(?! d)", "RTX 4090"),  # the 4090 D is a cut-down part
    (r"\bb200\b", "B200"),
)

_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}


def match_gpu(gpu_name: str) -> str | None:
    """The KNOWN_PEAKS key for a torch device name, or None if it is not in the table."""
    lowered = gpu_name.lower()
    for pattern, key in _GPU_PATTERNS:
        if re.search(pattern, lowered):
            return key
    return None


def lookup_peak(gpu_name: str, dtype: str) -> float | None:
    """Dense datasheet peak FLOP/s for `dtype` ("fp32", "tf32", "bf16", "fp16", "fp8")."""
    key = match_gpu(gpu_name)
    if key is None:
        return None
    return KNOWN_PEAKS[key].get(_DTYPE_ALIASES.get(dtype, dtype))


def lookup_bandwidth_bytes_per_s(gpu_name: str) -> float | None:
    """Datasheet DRAM bandwidth in bytes/s, or None for an unknown GPU."""
    key = match_gpu(gpu_name)
    return None if key is None else KNOWN_PEAKS[key]["hbm_bytes_per_s"]


def dtype_key(dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
    """The peak-table name of the arithmetic a matmul in `dtype` runs on `device`.

    fp32 on CUDA with TF32 allowed (float32 matmul precision other than "highest") is "tf32",
    so MFU is taken against the peak of the arithmetic that actually runs.
    """
    name = str(dtype).removeprefix("torch.")
    key = _DTYPE_ALIASES.get(name, name)
    tf32_allowed = torch.get_float32_matmul_precision() != "highest"
    if key == "fp32" and torch.device(device).type == "cuda" and tf32_allowed:
        return "tf32"
    return key


# ---------------------------------------------------------------------------------------------
# Calibration

_CPU_SIZES = (512, 1024, 2048)
_GPU_SIZES = (1024, 2048, 4096, 8192)
_WARMUP_STEPS = 2
_MIN_REPS = 3
_MAX_REPS = 20
_MATMUL_BUDGET_SHARE = 0.75  # the rest of the budget goes to the copy measurement
_CPU_COPY_BYTES = 64 << 20  # well past any CPU last-level cache
_GPU_COPY_BYTES = 512 << 20  # ~10x the largest L2 in the table


def calibrate(device: torch.device | str, dtype: torch.dtype, budget_s: float = 3.0) -> dict:
    """Measure matmul FLOP/s and copy bandwidth on `device` in about `budget_s` seconds.

    Matmul: square `torch.mm` at growing sizes n; each size gets warm-up steps (excluded),
    then the fastest of up to 20 timed repeats; FLOPs per matmul = 2·n³ (one multiply and one
    add per inner-product term). The reported peak is the best size. A ceiling is the best the
    device did, not its typical: a neighbour's load only slows repeats, so the fastest one
    moves least between calibrations (the median moved ×3.4 between runs on a shared VM, and a
    cell then ran above its "peak"). A size is skipped when
    its predicted cost (n³ scaling from the last size) would overrun the budget; the first
    size always runs.
    Copy: `dst.copy_(src)` of a large tensor; bytes moved = 2 × nbytes (read src + write dst).
    `matmul_flops_per_s_by_size` has int keys; a JSON round trip turns them into strings.
    """
    device = torch.device(device)
    start_s = time.perf_counter()
    matmul_deadline_s = start_s + _MATMUL_BUDGET_SHARE * budget_s
    sizes = _GPU_SIZES if device.type == "cuda" else _CPU_SIZES
    by_size = _calibrate_matmul(device, dtype, sizes, matmul_deadline_s)
    copy_bytes = _GPU_COPY_BYTES if device.type == "cuda" else _CPU_COPY_BYTES
    copy_bytes_per_s = _calibrate_copy(device, dtype, copy_bytes, start_s + budget_s)
    key = dtype_key(dtype, device)
    return {
        "matmul_flops_per_s": max(by_size.values()),
        "matmul_flops_per_s_by_size": by_size,
        "copy_bytes_per_s": copy_bytes_per_s,
        "dtype": key,
        "device": str(device),
        "method": (f"torch.mm {key} n={list(by_size)} best of per-size fastest repeats, 2n^3 FLOPs; "
                   f"copy_ {copy_bytes >> 20} MiB fastest repeat, 2*nbytes"),
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


CALIBRATION_CACHE_ENV = "DSBENCH_CALIBRATION_CACHE"  # a JSON file; "off": no cache


def calibration_cache_path() -> str | None:
    """Where the best calibration per machine fingerprint is kept ($DSBENCH_CALIBRATION_CACHE, else
    $XDG_CACHE_HOME/dsbench or ~/.cache/dsbench/calibrations.json); None when set to "off"."""
    path = os.environ.get(CALIBRATION_CACHE_ENV)
    if path == "off":
        return None
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dsbench", "calibrations.json")


def machine_fingerprint(device: torch.device | str, key: str) -> str:
    """What a ceiling depends on: the processor (model, ISA extensions that change the GEMM path),
    the threads that run, the torch build, and on CUDA the GPU; not the host name (a VM moved to an
    identical host keeps its ceiling)."""
    device = torch.device(device)
    isa = sorted(f for f in _cpu_flags() if f in _CEILING_ISA)
    parts = [_cpu_model() or platform.machine(), ",".join(isa), f"threads={torch.get_num_threads()}",
             f"torch={torch.__version__}", key]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return " | ".join(parts)


_CEILING_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def with_best_known(calibration: dict, path: str | None = None) -> dict:
    """The calibration with the best ceiling this machine has shown: a ceiling is the best the
    device did, and a neighbour's load only lowers a measurement, so the highest matmul and copy
    rate measured under the same fingerprint is the closest to the real one. This run's own
    figures stay in *_measured; the cache keeps the best of every calibration (written atomically).
    Without a cache (path None and $DSBENCH_CALIBRATION_CACHE=off) the calibration is returned as is."""
    path = path or calibration_cache_path()
    if path is None:
        return calibration
    fingerprint = machine_fingerprint(calibration["device"], calibration["dtype"])
    cache = _read_cache(path)
    best = cache.get(fingerprint, {})
    out = dict(calibration, fingerprint=fingerprint,
               matmul_flops_per_s_measured=calibration["matmul_flops_per_s"],
               copy_bytes_per_s_measured=calibration["copy_bytes_per_s"])
    for metric in ("matmul_flops_per_s", "copy_bytes_per_s"):
        out[metric] = max(calibration[metric], best.get(metric, 0.0))
    n = int(best.get("calibrations", 0)) + 1
    out["ceiling_source"] = (f"best of {n} calibrations on this machine fingerprint (this one measured "
                             f"{calibration['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s), cache {path}")
    cache[fingerprint] = {"matmul_flops_per_s": out["matmul_flops_per_s"], "copy_bytes_per_s": out["copy_bytes_per_s"],
                          "calibrations": n, "updated_at": calibration.get("measured_at")}
    _write_cache(path, cache)
    return out


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: str, cache: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: this run's calibration is still the best it knows


def _calibrate_matmul(device, dtype, sizes, deadline_s) -> dict[int, float]:
    by_size: dict[int, float] = {}
    last_n, last_s = None, None
    for n in sizes:
        if last_n is not None:
            predicted_s = last_s * (n / last_n) ** 3 * (_WARMUP_STEPS + _MIN_REPS)
            if time.perf_counter() + predicted_s > deadline_s:
                break
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        last_s = _fastest_step_s(device, lambda: torch.mm(a, b), deadline_s)
        last_n = n
        by_size[n] = 2 * n**3 / last_s
    return by_size


def _calibrate_copy(device, dtype, nbytes, deadline_s) -> float:
    numel = nbytes // torch.empty((), dtype=dtype).element_size()
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    fastest_s = _fastest_step_s(device, lambda: dst.copy_(src), deadline_s)
    return 2 * src.nbytes / fastest_s


def _fastest_step_s(device, fn, deadline_s) -> float:
    """Fastest seconds of `fn` after warm-up: at least _MIN_REPS, more while time remains."""
    timer = StepTimer(device)
    for _ in range(_WARMUP_STEPS):
        with timer.step(record=False):
            fn()
    for rep in range(_MAX_REPS):
        if rep >= _MIN_REPS and time.perf_counter() > deadline_s:
            break
        with timer.step():
            fn()
    return float(np.min(timer.samples_s()))


# ---------------------------------------------------------------------------------------------
# Peak selection for MFU


def peak_flops_per_s(
    device: torch.device | str, dtype_name: str, calibration: dict | None
) -> tuple[float | None, str]:
    """(peak FLOP/s, source) for MFU of `dtype_name` arithmetic on `device`.

    1. A GPU in KNOWN_PEAKS with a value for the dtype: ("datasheet:<key>").
    2. Else a calibration measured on the same device type in the same dtype:
       ("calibrated:<method>"). A calibration in another dtype is never used, so an fp8 run
       is not divided by a bf16 peak.
    3. Else (None, "unknown").
    """
    device = torch.device(device)
    dtype_name = _DTYPE_ALIASES.get(dtype_name, dtype_name)
    if device.type == "cuda":
        gpu_name = _gpu_name(device)
        peak = lookup_peak(gpu_name, dtype_name)
        if peak is not None:
            return peak, f"datasheet:{match_gpu(gpu_name)}"
    if _calibration_applies(calibration, device, dtype_name):
        return float(calibration["matmul_flops_per_s"]), f"calibrated:{calibration['method']}"
    return None, "unknown"


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _calibration_applies(calibration: dict | None, device: torch.device, dtype_name: str) -> bool:
    if not calibration or calibration.get("matmul_flops_per_s") is None:
        return False
    same_device_type = torch.device(calibration["device"]).type == device.type
    return same_device_type and calibration.get("dtype") == dtype_name

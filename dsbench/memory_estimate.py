"""A cell's memory before it runs: weights, gradients, optimizer state, activations, logits, KV
cache; and the memory this machine has for it. The runner refuses a cell that cannot fit.

The estimate is of what the cell's own tensors hold at their peak (what CUDA max_memory_allocated
counts; on a CPU, peak RSS less the interpreter's baseline), per process (a multi-process cell:
per rank). Weights, gradients, optimizer state and KV cache are exact counts from the accounting
formulas; activations are an approximation, per layer per token, of what autograd keeps for the
backward (train) or the largest transient of one layer (inference). tests/test_memory_estimate.py
checks it against measured peaks of real small cells within ESTIMATE_FACTOR.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dsbench.cell import Cell
from dsbench import optimizers
from dsbench.errors import UsageError
from dsbench.variants import decoder, registry
from dsbench.variants.base import Activations
from dsbench.variants.precision import dtype_bytes, precision_of
from dsbench.workloads import workload_of

ESTIMATE_FACTOR = 2.0  # the tests hold estimate / measured peak within [1/2, 2] over small real cells
FP32_BYTES = 4
ADAMW_FOREACH_TEMPS = 1  # torch's foreach AdamW holds one parameter-sized temporary (the denominator)


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # kept for backward (train) or one layer's transients (inference)
    logits_bytes: int  # B·T·V logits, their FP32 copy and the loss's, and their gradient (train)
    kv_cache_bytes: int
    build_bytes: int = 0  # an inference cell is built in FP32, then cast: both copies, briefly, before it runs

    @property
    def total_bytes(self) -> int:
        """The peak: during a train step's backward the activations are freed as the gradients
        fill in, and the optimizer's temporaries come after both: max of the two phases."""
        forward = self.activations_bytes + self.logits_bytes + self.kv_cache_bytes
        return self.weights_bytes + self.optimizer_bytes + max(forward, self.gradients_bytes)

    @property
    def process_bytes(self) -> int:
        """What the cell's process needs at some point: the peak, or building the model if larger."""
        return max(self.total_bytes, self.build_bytes)

    def columns(self) -> dict:
        return {"memory_estimate_bytes": self.total_bytes, "memory_estimate_weights_bytes": self.weights_bytes,
                "memory_estimate_optimizer_bytes": self.optimizer_bytes + self.gradients_bytes,
                "memory_estimate_activations_bytes": self.activations_bytes + self.logits_bytes,
                "memory_estimate_kv_cache_bytes": self.kv_cache_bytes}


def estimate(cell: Cell) -> MemoryEstimate:
    cfg, workload, settings = cell.model, workload_of(cell), cell.workload
    precision = precision_of(cfg)
    trains = workload.trains or workload.trains_first
    params = _params_per_rank(cell)
    act_dtype = precision.autocast_dtype or precision.inference_dtype
    act_bytes = dtype_bytes(act_dtype) if workload.trains else dtype_bytes(precision.inference_dtype)
    kv_bytes = dtype_bytes(precision.inference_dtype)
    batch = settings["batch_size"]
    if trains:
        # FP32 masters (V3 §3.3); under autocast, a cached low-precision copy of every matmul weight
        weights = params * FP32_BYTES + (params * act_bytes if precision.autocast_dtype is not None else 0)
        gradients = params * FP32_BYTES * (1 + ADAMW_FOREACH_TEMPS)
        optimizer = optimizers.state_floats(settings, cfg, params) * FP32_BYTES  # AdamW 2, Muon 1 per param
    else:
        weights, gradients, optimizer = params * kv_bytes, 0, 0
    counts = decoder.param_counts(cfg)  # every rank builds the whole model in FP32, then shards and casts it
    build = (counts["params_total"] + counts["params_mtp"]) * FP32_BYTES + (0 if trains or kv_bytes == FP32_BYTES else weights)
    if workload.trains:
        T = settings["seq_len"]
        tokens = batch * T
        wide_bytes = FP32_BYTES if precision.autocast_dtype is not None else act_bytes
        layers = range(cfg.n_layers + cfg.mtp)  # an MTP module is one more block (V3 §2.2)
        activations = tokens * sum(_train_bytes_per_layer_token(cfg, i, T, act_bytes, wide_bytes) for i in layers)
        logits = tokens * (1 + cfg.mtp) * cfg.vocab_size * (2 * act_bytes + 2 * FP32_BYTES)
        kv = 0
    else:
        T = settings.get("seq_len") or settings["context_len"]  # prefill's rows, or decode's context
        tokens = batch * T
        activations = tokens * max(_inference_elements_per_token(cfg, i, T) for i in range(cfg.n_layers)) * act_bytes
        logits = tokens * cfg.vocab_size * (act_bytes + FP32_BYTES)
        slots = workload.cache_slots(settings)
        kv = decoder.kv_cache_bytes(cfg, kv_bytes, slots) * batch * workload.cache_copies
    return MemoryEstimate(int(weights), int(gradients), int(optimizer), int(activations), int(logits), int(kv), int(build))


def _params_per_rank(cell: Cell) -> int:
    """Every parameter one process holds: with expert parallelism each FFN states what a rank
    keeps of it (a routed layer: its block of experts and redundant copies); the rest is replicated."""
    cfg = cell.model
    counts = decoder.param_counts(cfg)
    total = counts["params_total"] + counts["params_mtp"]
    if cell.ep <= 1:
        return total
    ffn, redundant = registry.module_of("ffn", cfg), cell.parallel.get("redundant_experts", 0)
    return total - sum(ffn.param_count(cfg, i) - ffn.rank_param_count(cfg, i, cell.ep, redundant) for i in range(cfg.n_layers))


def _parts(cfg, layer_idx: int) -> tuple[type, object, type]:
    """Layer layer_idx's attention class, the config it is priced from, and the FFN class."""
    return *registry.attention_layer(cfg, layer_idx), registry.module_of("ffn", cfg)


def _train_bytes_per_layer_token(cfg, layer_idx: int, T: int, act_bytes: int, wide_bytes: int) -> float:
    """What one block keeps for its backward, per token: its two RMSNorms (input and output
    each, model width) and what its attention and FFN state they keep (Part.train_activations).
    The model-width tensors are `wide_bytes` each: FP32 under autocast, which runs norms in FP32."""
    attention, layer_cfg, ffn = _parts(cfg, layer_idx)
    connection = registry.RESIDUAL[cfg.residual].connection  # mHC keeps its streams and mixing weights
    kept = Activations(wide=4 * cfg.d_model) + attention.train_activations(layer_cfg, T) + ffn.train_activations(cfg, T)
    kept = kept + connection.train_activations(cfg) + connection.train_activations(cfg)
    return kept.wide * wide_bytes + kept.narrow * act_bytes + kept.fp32 * FP32_BYTES


def _inference_elements_per_token(cfg, layer_idx: int, T: int) -> float:
    """The largest live set of one layer's forward without autograd, per token: the residual,
    its norm and the block's output (model width), and what its attention and FFN state."""
    attention, layer_cfg, ffn = _parts(cfg, layer_idx)
    streams = registry.RESIDUAL[cfg.residual].connection.inference_activations(cfg)
    return 3 * cfg.d_model + streams + attention.inference_activations(layer_cfg, T) + ffn.inference_activations(cfg, T)


# --- what this machine has ---


def available_bytes(device: str) -> tuple[int | None, str]:
    """(bytes a cell may use on this machine, where that figure came from); None: unknown.

    CUDA: the GPU's free memory from NVML (not torch.cuda.mem_get_info: the parent holds no CUDA
    context, dsbench/runner.py); no NVML: unknown. CPU: the smaller of MemAvailable and the
    cgroup's limit less its usage.
    """
    if device.startswith("cuda"):
        free = _nvml_free_bytes()
        return (free, "NVML: the GPU's free memory") if free is not None else (None, "unknown")
    found = [(v, what) for v, what in (_meminfo_available_bytes(), _cgroup_headroom_bytes()) if v is not None]
    return min(found) if found else (None, "unknown")


def _meminfo_available_bytes() -> tuple[int | None, str]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"
    except (OSError, ValueError, IndexError):
        pass
    return None, ""


def _cgroup_headroom_bytes() -> tuple[int | None, str]:
    """The cgroup's memory limit less what it uses (v2 memory.max, v1 memory.limit_in_bytes)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, ""
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":
            files = Path("/sys/fs/cgroup") / group.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            files = Path("/sys/fs/cgroup/memory") / group.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        folder, limit_name, usage_name = files
        try:
            limit = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or v1's near-2**63: no limit
            return int(limit) - usage, f"the cgroup's {limit_name} less its usage"
    return None, ""


def _nvml_free_bytes() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            index = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 — no pynvml, no driver, a UUID in CUDA_VISIBLE_DEVICES: unknown
        return None


# --- the pre-flight check ---


def available_for(executor, device: str) -> tuple[int | None, str]:
    """The memory a cell gets where it runs: this machine's (local), a Slurm job's mem_gb (its
    GPU's is unknown here: no check), or None."""
    if executor.kind == "local":
        return available_bytes(device)
    if executor.mem_gb and device == "cpu":
        return int(executor.mem_gb * 1e9), "[executor] mem_gb"
    return None, "unknown"


def check_fits(cells: list[Cell], device: str, available: tuple[int | None, str], force: bool = False) -> None:
    """Refuse (UsageError, one line) the first cell whose estimate exceeds what is available.

    No margin either way: refused only when the estimate alone is larger than the free memory
    (the interpreter's own few hundred MiB and the allocator's slack are not added: on a CPU peak
    RSS runs up to ~3× the estimate, the tests measure), so a refusal means the cell cannot fit;
    a cell under the limit may still run out. A multi-process cell on a CPU needs its estimate
    once per rank (the ranks share the host).
    """
    limit, source = available
    if force or limit is None:
        return
    for cell in cells:
        ranks = cell.ep if device == "cpu" else 1
        need = estimate(cell).process_bytes * ranks
        if need > limit:
            per_rank = f"{ranks} ranks × {_gib(need // ranks)}, " if ranks > 1 else ""
            raise UsageError(f"memory: cell {cell.cell_id} {cell.label()} needs about {_gib(need)} ({per_rank}estimated: "
                             f"weights, optimizer state, activations, KV cache) but {_gib(limit)} is available "
                             f"({source}); pass --force to run it anyway")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def held_weight_bytes(cell: Cell) -> int:
    """The weights the process holds before its workload starts (in rss_before_workload_bytes):
    FP32 for a cell that trains, the inference dtype otherwise. Measured peak RSS less
    (rss_before_workload_bytes − this) is the cell's own peak, comparable with the estimate."""
    workload = workload_of(cell)
    precision = precision_of(cell.model)
    width = FP32_BYTES if workload.trains or workload.trains_first else dtype_bytes(precision.inference_dtype)
    return _params_per_rank(cell) * width

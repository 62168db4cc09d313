"""Roofline placement of each profiled part: analytic FLOPs and bytes per step, measured time,
and the machine's ceilings (matmul FLOP/s and copy bandwidth from `dsbench env --calibrate`,
or a GPU's datasheet).

FLOPs are the accounting's (decoder.FLOP_CONVENTION): each part's share of the cell's
flops_per_token, so the parts' FLOPs sum exactly to the cell's (a test checks it). Parts the
convention does not count (norms, RoPE, dispatch, softmax, optimizer) have 0 FLOPs: they can
only be memory-bound, and are placed by bytes/s against the copy bandwidth.

Bytes are compulsory traffic, a lower bound: each pass reads a part's weights once and its
input activations once and writes its outputs once; attention reads each key/value once (a
fused kernel's traffic; decode reads the whole cache); the optimizer reads and writes its
state. Training's backward reads weights and activations again for dX and dW and writes the
gradients: counted as 2× the forward's traffic, as its FLOPs are 2× (so train = 3× forward).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsbench import accounting
from dsbench.cell import Cell
from dsbench.variants import registry
from dsbench.variants.base import PartCost, PassShape
from dsbench.variants.precision import precision_of
from dsbench.variants.precision import dtype_bytes
from dsbench.workloads import workload_of


def part_costs(cell: Cell) -> dict[str, PartCost]:
    """FLOPs and compulsory bytes per step of every part the cell's step runs."""
    cfg, workload = cell.model, workload_of(cell)
    precision = precision_of(cfg)
    train = workload.trains
    act = dtype_bytes(precision.autocast_dtype or precision.inference_dtype) if train else dtype_bytes(precision.inference_dtype)
    weight = 4 if train else dtype_bytes(precision.inference_dtype)  # train: FP32 master weights
    N = accounting.tokens_per_step(cell)
    ctx = accounting.mean_context_len(cell)
    decode = workload.decodes  # timed tokens from the cache: attention reads all of it
    C, V = cfg.d_model, cfg.vocab_size
    costs: dict[str, PartCost] = {}

    def add(part: str, flops_per_token: float = 0.0, nbytes: float = 0.0) -> None:
        costs.setdefault(part, PartCost()).add(N * flops_per_token, nbytes)

    add("embedding", 0.0, N * C * (weight + act))  # gather one row per token, write it
    add("norm", 0.0, (2 * cfg.n_layers + 1) * 2 * N * C * act)
    batch = cell.workload["batch_size"]
    shape = PassShape(tokens=N, mean_context_len=ctx, decode=decode, batch=batch, act_bytes=act, weight_bytes=weight)
    ffn = registry.FFN[cfg.ffn.kind].module
    for i, (attention, layer_cfg) in enumerate(registry.attention_layers(cfg)):  # each variant prices its own parts (variants/base.py)
        for layer_costs in (attention.part_costs(layer_cfg, shape), ffn.part_costs(cfg, i, shape)):
            for name, cost in layer_costs.items():
                costs.setdefault(name, PartCost()).add(cost.flops, cost.bytes)
    add("residual", 0.0, cfg.n_layers * 2 * 3 * N * C * act)  # two adds a block: read both, write one
    add("lm_head", 2 * C * V, C * V * weight + N * (C + V) * act)
    workload.add_step_costs(cell, costs, add, act)
    if precision.fp8_recipe:
        costs["fp8_quant"] = PartCost(0.0, None)
    return costs


@dataclass(frozen=True)
class Ceilings:
    peak_flops_per_s: float | None
    bandwidth_bytes_per_s: float | None
    source: str

    @property
    def ridge_flops_per_byte(self) -> float | None:
        if not self.peak_flops_per_s or not self.bandwidth_bytes_per_s:
            return None
        return self.peak_flops_per_s / self.bandwidth_bytes_per_s


def ceilings(runtime: dict, device: str) -> Ceilings:
    """The cell's peak FLOP/s (as for MFU) and the copy bandwidth calibrated beside it, else a
    GPU's datasheet bandwidth."""
    calibration = runtime.get("calibration") or {}
    bandwidth = calibration.get("copy_bytes_per_s")
    bw_source = "calibrated copy_" if bandwidth else None
    if bandwidth is None and device.startswith("cuda"):
        import torch

        from dsbench.hardware import lookup_bandwidth_bytes_per_s

        bandwidth = lookup_bandwidth_bytes_per_s(torch.cuda.get_device_name(torch.device(device)))
        bw_source = "datasheet" if bandwidth else None
    return Ceilings(runtime.get("peak_flops_per_s"), bandwidth, f"FLOP/s {runtime.get('peak_source', 'unknown')}; bytes/s {bw_source or 'unknown'}")


def place(cost: PartCost | None, seconds: float, roof: Ceilings) -> dict:
    """Achieved rates of one part and where they sit under the roofline."""
    row = {"flops": None, "bytes": None, "flops_per_byte": None, "achieved_flops_per_s": None,
           "achieved_bytes_per_s": None, "bound": None, "roof_fraction": None}
    if cost is None or seconds <= 0:
        return row
    row["flops"], row["bytes"] = cost.flops, cost.bytes
    if cost.flops:
        row["achieved_flops_per_s"] = cost.flops / seconds
    if not cost.bytes:
        return row
    row["achieved_bytes_per_s"] = cost.bytes / seconds
    row["flops_per_byte"] = intensity = cost.flops / cost.bytes
    ridge = roof.ridge_flops_per_byte
    if cost.flops == 0:
        row["bound"] = "memory"
        if roof.bandwidth_bytes_per_s:
            row["roof_fraction"] = row["achieved_bytes_per_s"] / roof.bandwidth_bytes_per_s
        return row
    if ridge is None:
        return row
    row["bound"] = "compute" if intensity >= ridge else "memory"
    attainable = min(roof.peak_flops_per_s, intensity * roof.bandwidth_bytes_per_s)
    row["roof_fraction"] = row["achieved_flops_per_s"] / attainable
    return row


# --- speed of light per cell (issue 27) ---


def light_columns(cell: Cell, runtime: dict, step_s: float | None, devices: int = 1, gpu_busy: float | None = None) -> dict:
    """How far the cell's measured step is from the fastest this device could run it.

    The light-speed step time is Σ over the step's parts of max(FLOPs ÷ peak, bytes ÷ bandwidth):
    each part at the roof of its own intensity, parts one after another (one stream; a part's
    compute never hides another's traffic). Its bound is the side that holds most of that time.
    sol_fraction = light ÷ measured step time: 1 is at the roof; above 1 means a ceiling is under
    what the cell achieved (a calibration taken under load), and the row says so. Parts with
    no analytic byte count (fp8_quant) add only their FLOPs (0): the bound stays a lower bound.
    For routed FFN cells the same sums are MoE-CAP's S-MFU and S-MBU (Jiang et al. 2412.07067:
    activated experts' FLOPs, and only the weights of experts the step touches, part_costs).
    gpu_busy: on CUDA, NVML's share of the cell's time in which a kernel ran (low: launch-bound).
    """
    roof = ceilings(runtime, cell.device)
    empty = {"sol_bound": None, "sol_step_ms": None, "sol_fraction": None, "sol_note": None,
             "achieved_bytes_per_s": None, "mbu": None}
    if precision_of(cell.model).emulated_on(_torch_device(cell.device)):
        return {**empty, "sol_note": f"{cell.model.precision} emulated on {cell.device}: no ceiling for arithmetic "
                                     "the device does not have, so no bound"}
    if not step_s or not roof.peak_flops_per_s or not roof.bandwidth_bytes_per_s:
        missing = "step time" if not step_s else "peak FLOP/s" if not roof.peak_flops_per_s else "copy bandwidth"
        return {**empty, "sol_note": f"no {missing} ({roof.source}): no bound"}
    peak, bandwidth = roof.peak_flops_per_s * devices, roof.bandwidth_bytes_per_s * devices
    light_s, bound, total_bytes = light_step(cell, peak, bandwidth)
    fraction = light_s / step_s
    row = {**empty, "sol_bound": bound, "sol_step_ms": 1e3 * light_s,
           "sol_fraction": fraction, "achieved_bytes_per_s": total_bytes / step_s, "mbu": total_bytes / step_s / bandwidth}
    if fraction > 1:
        row["sol_note"] = (f"above 1: the step ran faster than its ceilings allow ({roof.source}); a ceiling measured "
                           "under load, or a byte count above what the kernels moved")
    if gpu_busy is not None and gpu_busy < LAUNCH_BOUND_BUSY:
        row["sol_note"] = f"launch-bound: a kernel ran {gpu_busy:.0%} of the time (NVML)"
    if registry.FFN[cell.model.ffn.kind].routed:  # MoE-CAP's names: the same activated-only sums
        row["s_mfu"] = sum(c.flops for c in part_costs(cell).values()) / step_s / peak
        row["s_mbu"] = row["mbu"]
    return row


def light_step(cell: Cell, peak_flops_per_s: float, bandwidth_bytes_per_s: float) -> tuple[float, str, float]:
    """(light-speed step seconds, "compute" | "memory", compulsory bytes per step) at these ceilings:
    each part at the roof of its own intensity, parts one after another (light_columns says why)."""
    compute_s = memory_s = total_bytes = 0.0
    for cost in part_costs(cell).values():
        flops_s, bytes_s = cost.flops / peak_flops_per_s, (cost.bytes or 0.0) / bandwidth_bytes_per_s
        compute_s, memory_s = compute_s + (flops_s if flops_s >= bytes_s else 0.0), memory_s + (bytes_s if bytes_s > flops_s else 0.0)
        total_bytes += cost.bytes or 0.0
    return compute_s + memory_s, "compute" if compute_s >= memory_s else "memory", total_bytes


def _torch_device(device: str):
    import torch

    return torch.device(device)


LAUNCH_BOUND_BUSY = 0.5  # a GPU idle half the time waits on the host: the cell is launch-bound

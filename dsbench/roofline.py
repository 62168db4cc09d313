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
from dsbench.variants.precision import PRECISIONS, dtype_bytes
from dsbench.workloads import workload_of


def part_costs(cell: Cell) -> dict[str, PartCost]:
    """FLOPs and compulsory bytes per step of every part the cell's step runs."""
    cfg, workload = cell.model, workload_of(cell)
    precision = PRECISIONS[cfg.precision]
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
    attention, ffn = registry.ATTENTION[cfg.attention.kind].module, registry.FFN[cfg.ffn.kind].module
    for i in range(cfg.n_layers):  # each variant prices its own parts (variants/base.py)
        for layer_costs in (attention.part_costs(cfg, shape), ffn.part_costs(cfg, i, shape)):
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

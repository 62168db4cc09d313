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
from dsbench.spec import Cell
from dsbench.variants import registry
from dsbench.variants.mla import MultiHeadLatentAttention, mla_dims
from dsbench.variants.moe import layout
from dsbench.variants.precision import PRECISIONS, dtype_bytes
from dsbench.workloads import workload_of


@dataclass
class PartCost:
    flops: float = 0.0
    bytes: float | None = 0.0  # None: no analytic count (time only)

    def add(self, flops: float = 0.0, nbytes: float = 0.0) -> None:
        self.flops += flops
        self.bytes = None if self.bytes is None else self.bytes + nbytes


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
    for i in range(cfg.n_layers):
        _attention(cfg, ctx, decode, N, act, weight, add, cell)
        _ffn(cfg, i, N, act, weight, add)
    add("residual", 0.0, cfg.n_layers * 2 * 3 * N * C * act)  # two adds a block: read both, write one
    add("lm_head", 2 * C * V, C * V * weight + N * (C + V) * act)
    workload.add_step_costs(cell, costs, add, act)
    if precision.fp8_recipe:
        costs["fp8_quant"] = PartCost(0.0, None)
    return costs


def _attention(cfg, ctx: float, decode: bool, N: int, act: int, weight: int, add, cell: Cell) -> None:
    module = registry.ATTENTION[cfg.attention.kind].module
    total = module.flops_per_token(cfg, ctx, decode)
    C = cfg.d_model
    # Activation traffic of the weight matmuls: each linear reads its input and writes its output.
    if module is MultiHeadLatentAttention:
        d = mla_dims(cfg)
        matmul_params = MultiHeadLatentAttention._matmul_params(cfg)
        q_width = d.H * (d.Dn + d.Dr)
        queries = (C + d.Dq) + (d.Dq + q_width) if d.Dq else C + q_width
        proj_io = queries + (C + d.Dc + d.Dr) + (d.Dc + d.H * (d.Dn + d.Dv)) + (d.H * d.Dv + C)
        rope_io = 2 * (d.H + 1) * d.Dr  # q^R of every head and the one shared k^R, read and written
        absorbed = decode and cfg.attention.mla_impl == "absorbed"
        qo_width = d.H * (2 * d.Dc + d.Dr) if absorbed else d.H * (d.Dn + d.Dr + d.Dv)  # q read, o written
    else:
        H, G, D = cfg.attention.n_heads, cfg.n_kv_heads(), cfg.head_dim()
        matmul_params = module.param_count(cfg)
        proj_io = (C + H * D) + 2 * (C + G * D) + (H * D + C)
        rope_io = 2 * (H + G) * D
        qo_width = 2 * H * D
    kv_layer = module.kv_cache_bytes_per_token(cfg, act)
    proj_flops = 2 * matmul_params
    add("attn.proj", proj_flops, matmul_params * weight + N * proj_io * act)
    add("attn.rope", 0.0, N * rope_io * act)
    if decode:  # every step reads the whole cache of its row
        batch = cell.workload["batch_size"]
        core_bytes = batch * ctx * kv_layer + N * (qo_width * act + kv_layer)
    else:  # each key and value read once, written to the cache once
        core_bytes = N * (2 * kv_layer + qo_width * act)
    add("attn.core", total - proj_flops, core_bytes)


def _ffn(cfg, layer: int, N: int, act: int, weight: int, add) -> None:
    C, f = cfg.d_model, cfg.ffn
    variant = registry.FFN[f.kind]
    if not variant.routed or layer < f.first_k_dense:
        add("ffn", 2 * 3 * C * f.d_ff, 3 * C * f.d_ff * weight + N * 3 * (C + f.d_ff) * act)
        return
    lay = layout(f)
    E, K, F = lay.n_routed, lay.top_k, lay.expert_d_ff
    add("router", 2 * E * C, E * C * 4 + N * (C + 2 * E) * 4)  # FP32 gate: x, logits, scores
    add("dispatch", 0.0, 4 * N * K * C * act)  # gather rows in and out; weight and add them back
    touched = min(E, N * K)  # experts that receive a token read their weights
    add("experts", 2 * K * 3 * C * F, touched * 3 * C * F * weight + N * K * 3 * (C + F) * act)
    if lay.shared_d_ff:
        add("shared_experts", 2 * 3 * C * lay.shared_d_ff, 3 * C * lay.shared_d_ff * weight + N * 3 * (C + lay.shared_d_ff) * act)
    add("balance", 0.0, N * E * 4)
    add("routing_stats", 0.0, N * (E + K) * 4)


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

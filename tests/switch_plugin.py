"""A routed FFN plug-in that owes nothing to variants/moe.py: Switch-style top-1 routing over
E SwiGLU experts (Fedus et al. 2101.03961 §2.1), no balancing, experts on one process. The
contract tests build it beside the built-ins; the spec tests check what it refuses.

Legend: N tokens, C model width, E experts, F expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsbench import metrics
from dsbench.variants import registry
from dsbench.variants.balance import expert_load, routing_metrics
from dsbench.variants.base import Activations, FeedForward, Layout, PartConfig, PartCost, PassShape, add_cost


@dataclass(frozen=True)
class SwitchConfig(PartConfig):
    kind: str = "switch"
    d_ff: int = 192
    balance: str = "none"
    n_experts: int = 4


class SwitchFFN(FeedForward):
    Config = SwitchConfig
    routed = True  # balances: the default ("none",)

    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        E, C, F_ = cfg.ffn.n_experts, cfg.d_model, cfg.ffn.d_ff
        self.gate = nn.Linear(C, E, bias=False)
        self.w1, self.w3 = nn.Parameter(torch.randn(E, C, F_) * 0.02), nn.Parameter(torch.randn(E, C, F_) * 0.02)
        self.w2 = nn.Parameter(torch.randn(E, F_, C) * 0.02)
        self.loads: list[torch.Tensor] = []

    @staticmethod
    def layout(cfg) -> Layout:
        return Layout(cfg.ffn.n_experts, 1, cfg.ffn.d_ff, 0)

    @staticmethod
    def param_count(cfg, layer_idx: int = 0) -> int:
        return cfg.ffn.n_experts * (cfg.d_model + 3 * cfg.d_model * cfg.ffn.d_ff)

    @staticmethod
    def active_param_count(cfg, layer_idx: int = 0) -> int:
        return cfg.ffn.n_experts * cfg.d_model + 3 * cfg.d_model * cfg.ffn.d_ff

    @staticmethod
    def flops_per_token(cfg, layer_idx: int = 0) -> float:
        return 2 * SwitchFFN.active_param_count(cfg, layer_idx)

    @staticmethod
    def part_costs(cfg, layer_idx: int, shape: PassShape) -> dict[str, PartCost]:
        costs: dict[str, PartCost] = {}
        weights = SwitchFFN.param_count(cfg, layer_idx) * shape.weight_bytes  # every expert read, at most
        add_cost(costs, "ffn", shape.tokens * SwitchFFN.flops_per_token(cfg, layer_idx), weights)
        return costs

    @staticmethod
    def train_activations(cfg, seq_len: int) -> Activations:
        return Activations(wide=3 * cfg.d_model, narrow=4 * cfg.ffn.d_ff, fp32=2 * cfg.ffn.n_experts)

    @staticmethod
    def inference_activations(cfg, seq_len: int) -> int:
        return 3 * cfg.ffn.d_ff

    @staticmethod
    def row_columns(cfg) -> dict:
        return {"switch_experts": cfg.ffn.n_experts}

    @staticmethod
    def metric_columns() -> tuple[metrics.Metric, ...]:
        return (metrics.variant_column("switch_experts", "ffn", "1", "switch plug-in: experts", "int"),)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        x_NC = x_BTC.reshape(B * T, C)
        probs_NE = self.gate(x_NC).float().softmax(dim=-1)
        weight_N, expert_N = probs_NE.max(dim=-1)
        w1, w3, w2 = self.w1[expert_N], self.w3[expert_N], self.w2[expert_N]  # (N, C, F), (N, F, C)
        h_NF = F.silu(torch.einsum("nc,ncf->nf", x_NC, w1)) * torch.einsum("nc,ncf->nf", x_NC, w3)
        out_NC = torch.einsum("nf,nfc->nc", h_NF, w2) * weight_N[:, None].to(x_NC.dtype)
        if self.training:
            self.loads.append(expert_load(expert_N, self.w1.shape[0]))
        return out_NC.view(B, T, C)

    def metrics(self, layer: int):
        return routing_metrics(layer, self.loads) if self.loads else None


registry.register("ffn", registry.Variant("switch", SwitchFFN, SwitchConfig, "Fedus et al. 2101.03961 §2.1"))

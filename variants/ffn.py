"""Feed-forward variants. Routed (MoE) variants register beside `dense` in registry.py.

Legend: B batch, T tokens, C model width, F hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .base import Activations, FeedForward, PartConfig, PartCost, PassShape, add_cost
from .precision import linear
from .profiling import part

if TYPE_CHECKING:  # annotations only: config.py builds its defaults from this file
    from .config import ModelConfig


@dataclass(frozen=True)
class DenseFFNConfig(PartConfig):
    kind: str = "dense"
    d_ff: int = 192  # SwiGLU hidden width; the dense base MoE variants are cut from
    balance: str = "n/a"  # the balance axis does not apply (kept so every FFN's identity names it)


def swiglu_train_activations(d_model: int, hidden: int) -> Activations:
    """What a SwiGLU of this activated hidden width keeps per token: gate, up, silu and product
    (4 × hidden) and its model-width input."""
    return Activations(wide=d_model, narrow=4 * hidden)


def swiglu_inference_activations(hidden: int) -> int:
    """A SwiGLU's live set per token without autograd: gate, up and their product."""
    return 3 * hidden


def swiglu_costs(costs: dict[str, PartCost], part_name: str, d_model: int, d_ff: int, shape: PassShape) -> None:
    """A SwiGLU's three C×F matmuls per step: 2 FLOPs per multiply-add, weights read once, each
    matmul's input read and output written."""
    C, N = d_model, shape.tokens
    add_cost(costs, part_name, N * 2 * 3 * C * d_ff, 3 * C * d_ff * shape.weight_bytes + N * 3 * (C + d_ff) * shape.act_bytes)


class DenseFFN(FeedForward):
    """SwiGLU FFN (Shazeer 2002.05202): w2(silu(w1 x) ⊙ w3 x), as in LLaMA and DeepSeek."""

    Config = DenseFFNConfig

    part_name = "ffn"  # its profiler range; "shared_experts" when it serves as DeepSeekMoE's shared experts

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        C, F_ = cfg.d_model, cfg.ffn.d_ff
        self.w1 = linear(cfg.precision, C, F_)  # gate
        self.w3 = linear(cfg.precision, C, F_)  # up
        self.w2 = linear(cfg.precision, F_, C)  # down

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int = 0) -> int:
        return 3 * cfg.d_model * cfg.ffn.d_ff

    @staticmethod
    def active_param_count(cfg: ModelConfig, layer_idx: int = 0) -> int:
        return DenseFFN.param_count(cfg, layer_idx)

    @staticmethod
    def flops_per_token(cfg: ModelConfig, layer_idx: int = 0) -> float:
        """Forward: three C×F matmuls at 2 FLOPs per multiply-add (the SiLU/product are ignored)."""
        return 2 * DenseFFN.active_param_count(cfg, layer_idx)

    @staticmethod
    def train_activations(cfg: ModelConfig, seq_len: int) -> Activations:
        return swiglu_train_activations(cfg.d_model, cfg.ffn.d_ff)

    @staticmethod
    def inference_activations(cfg: ModelConfig, seq_len: int) -> int:
        return swiglu_inference_activations(cfg.ffn.d_ff)

    @staticmethod
    def part_costs(cfg: ModelConfig, layer_idx: int, shape: PassShape) -> dict[str, PartCost]:
        costs: dict[str, PartCost] = {}
        swiglu_costs(costs, "ffn", cfg.d_model, cfg.ffn.d_ff, shape)
        return costs

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) → (B, T, C)
        with part(self.part_name, self):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

"""Feed-forward variants. Routed (MoE) variants register beside `dense` in registry.py.

Legend: B batch, T tokens, C model width, F hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .precision import linear
from .profiling import part


class DenseFFN(nn.Module):
    """SwiGLU FFN (Shazeer 2002.05202): w2(silu(w1 x) ⊙ w3 x), as in LLaMA and DeepSeek."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) → (B, T, C)
        with part(self.part_name, self):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

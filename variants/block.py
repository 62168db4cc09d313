"""The pre-norm residual block every decoder layer is, and each MTP module holds one of."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import registry
from .layers import RMSNorm
from .profiling import part

if TYPE_CHECKING:
    from .config import ModelConfig


class Block(nn.Module):
    """Pre-norm residual block: attention then FFN."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = registry.ATTENTION[cfg.attention.kind].build(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = registry.FFN[cfg.ffn.kind].build(cfg, layer_idx)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        h = self.attn_norm(x)
        with part("attn.other", self.attn):  # the module call itself; its parts open their own ranges
            h = self.attn(h, start_pos, cache)
        with part("residual", self):
            x = x + h
        h = self.ffn_norm(x)
        with part("ffn.other", self.ffn):
            h = self.ffn(h)
        with part("residual", self):
            return x + h

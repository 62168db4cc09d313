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
    """Pre-norm residual block: attention then FFN, each inside the residual connection that
    cfg.residual names (plain x + f(x), or mHC's streams: variants/residual.py)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        residual = registry.RESIDUAL[cfg.residual]
        self.attn_res, self.ffn_res = residual.connection(cfg), residual.connection(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        attention, layer_cfg = registry.attention_layer(cfg, layer_idx)  # a schedule's layer is its own kind
        self.attn = attention.build(layer_cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = registry.FFN[cfg.ffn.kind].build(cfg, layer_idx)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        x = self.attn_res(x, lambda h: self._attention(h, start_pos, cache))
        return self.ffn_res(x, self._ffn)

    def _attention(self, h: torch.Tensor, start_pos: int, cache) -> torch.Tensor:
        h = self.attn_norm(h)
        with part("attn.other", self.attn):  # the module call itself; its parts open their own ranges
            return self.attn(h, start_pos, cache)

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        h = self.ffn_norm(h)
        with part("ffn.other", self.ffn):
            return self.ffn(h)

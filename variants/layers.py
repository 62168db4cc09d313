"""Leaves shared by every variant: RMSNorm and rotary position embedding.

Shapes: B batch, T tokens in this call, H heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .profiling import part


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 1910.07467), computed in fp32 as DeepSeek-V3 §3.3.2 keeps norms."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @staticmethod
    def param_count(dim: int) -> int:
        return dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with part("norm", self):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * self.weight.float()).type_as(x)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2104.09864): rotate channel pairs (2i, 2i+1) by angle pos·θ^(−2i/D).

    Angles are computed for the positions of each call (T·D/2 values), so no table of
    max_seq_len rows is stored per layer; only inv_freq is kept, as a non-persistent buffer.

    interleaved=False pairs channel i with i + D/2 instead (DeepSeek-V3.2's indexer: "rope in
    indexer is not interleaved", inference/model.py), with the same frequencies.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, interleaved: bool = True, inv_freq: torch.Tensor | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.interleaved = interleaved
        if inv_freq is None:  # given: frequencies already scaled (YaRN, variants/mla.py)
            inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """x: (B, H, T, D) → same shape, rotated for positions start_pos … start_pos+T−1."""
        T = x.shape[-2]
        positions = torch.arange(start_pos, start_pos + T, device=x.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)  # (T, D/2)
        cos, sin = angles.cos(), angles.sin()
        if not self.interleaved:  # pairs (i, i + D/2)
            first, second = x.float().chunk(2, dim=-1)
            return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).type_as(x)
        x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, D/2) each
        rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
        return rotated.flatten(-2).type_as(x)

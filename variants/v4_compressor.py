"""DeepSeek-V4's KV compressor: the part HCA and CSA share (DeepSeek-V4 report §2.3.1-§2.3.2;
HF deepseek_v4 DeepseekV4HCACompressor / DeepseekV4CSACompressor / DeepseekV4Indexer's own).

Legend: B batch, T tokens, W closed windows (T // m), m tokens a window, D entry width
(head_dim, or the indexer's index_head_dim), R the RoPE'd trailing slice of an entry.

  C = H·W^KV, Z = H·W^Z                         per token (report eqs. 20-21)
  entry_w = RMSNorm(Σ_j softmax_j(Z_j + B_j) ⊙ C_j)   gated pooling over the window's slots
  entry_w = RoPE(entry_w, position w·m)          interleaved RoPE on the last R channels

HCA (`overlap = False`): the window is its own m tokens. CSA (`overlap = True`): each token
projects two series, Ca = [..., :D] and Cb = [..., D:]; entry w pools window w-1's Ca with
window w's Cb (2m slots, stride m). Window 0 has no previous window: its Ca slots get gate -inf
(weight 0), as in HF. Only closed windows emit an entry; the remainder waits for more tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import RMSNorm


def interleaved_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2·len(inv_freq) channels of x (..., T, D) in consecutive pairs at
    `positions` (T,), in fp32 (V4 lays a head out as [nope | rope], pairs (2i, 2i+1))."""
    R = 2 * inv_freq.numel()
    angles = positions.float()[:, None] * inv_freq.float()  # (T, R/2)
    cos, sin = angles.cos(), angles.sin()
    nope, rope = x[..., :-R], x[..., -R:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)


def rope_inv_freq(head_dim: int, rope_dim: int, theta: float) -> torch.Tensor:
    """θ_i = theta^(-2i/R), i < R/2 (HF DeepseekV4RotaryEmbedding: dim = head_dim·partial factor)."""
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float) / rope_dim))


class KVCompressor(nn.Module):
    """Folds every `ratio` tokens into one D-wide entry; `overlap` is CSA's two-series window."""

    def __init__(self, d_model: int, entry_dim: int, ratio: int, overlap: bool, rope_dim: int, rope_theta: float, eps: float = 1e-6):
        super().__init__()
        self.ratio, self.entry_dim, self.overlap = ratio, entry_dim, overlap
        width = (2 if overlap else 1) * entry_dim
        self.kv_proj = nn.Linear(d_model, width, bias=False)
        self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, width))  # B: one bias per window slot
        self.kv_norm = RMSNorm(entry_dim, eps)
        self.register_buffer("inv_freq", rope_inv_freq(entry_dim, rope_dim, rope_theta), persistent=False)

    @staticmethod
    def param_count(d_model: int, entry_dim: int, ratio: int, overlap: bool) -> int:
        width = (2 if overlap else 1) * entry_dim
        return 2 * d_model * width + ratio * width + entry_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) from position 0 → entries (B, T // ratio, D), each RoPE'd at w·ratio."""
        return self.extend(x, CompressorState.empty(x, self.width)).entries

    @property
    def width(self) -> int:
        """Channels a token projects: one series (HCA) or CSA's two, Ca and Cb."""
        return (2 if self.overlap else 1) * self.entry_dim

    def extend(self, x: torch.Tensor, state: CompressorState) -> CompressorState:
        """The next tokens x (B, T, C) after what `state` has seen: the entries of the windows
        they close, and the state after them (the open window's tokens, CSA's last Ca)."""
        B, m, D = x.shape[0], self.ratio, self.entry_dim
        kv = torch.cat([state.pending_kv, self.kv_proj(x)], dim=1)
        gate = torch.cat([state.pending_gate, self.gate_proj(x)], dim=1)
        W = kv.shape[1] // m
        pending_kv, pending_gate = kv[:, W * m:], gate[:, W * m:]
        if W == 0:
            return CompressorState(kv.new_zeros(B, 0, D), pending_kv, pending_gate, state.prev_kv, state.prev_gate, state.first_entry)
        kv = kv[:, : W * m].view(B, W, m, -1)
        gate = gate[:, : W * m].view(B, W, m, -1) + self.position_bias
        prev_kv, prev_gate = state.prev_kv, state.prev_gate
        if self.overlap:
            prev_kv, prev_gate = kv[:, -1, :, :D], gate[:, -1, :, :D]  # the next window's first half
            kv, gate = self._overlap_slots(kv, gate, state.prev_kv, state.prev_gate)  # (B, W, 2m, D)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)  # (B, W, D)
        positions = (torch.arange(W, device=x.device) + state.first_entry) * m
        entries = interleaved_rope(self.kv_norm(pooled), positions, self.inv_freq)
        return CompressorState(entries, pending_kv, pending_gate, prev_kv, prev_gate, state.first_entry + W)

    def _overlap_slots(self, kv: torch.Tensor, gate: torch.Tensor, prev_kv, prev_gate) -> tuple[torch.Tensor, torch.Tensor]:
        """CSA's 2m slots per window: window w-1's Ca, then window w's Cb. The first window takes
        the Ca of the window before this call (prev_*), or, at position 0, empty slots (kv 0,
        gate -inf: softmax weight 0)."""
        D = self.entry_dim
        if prev_kv is None:
            prev_kv, prev_gate = torch.zeros_like(kv[:, 0, :, :D]), torch.full_like(gate[:, 0, :, :D], float("-inf"))
        prev_kv = torch.cat([prev_kv.unsqueeze(1).to(kv.dtype), kv[:, :-1, :, :D]], dim=1)
        prev_gate = torch.cat([prev_gate.unsqueeze(1).to(gate.dtype), gate[:, :-1, :, :D]], dim=1)
        return torch.cat([prev_kv, kv[..., D:]], dim=2), torch.cat([prev_gate, gate[..., D:]], dim=2)


@dataclass
class CompressorState:
    """What a compressor carries from one call to the next (HF DeepseekV4HCACache /
    DeepseekV4CSACache's buffer, overlap and entry count), and the entries the last call emitted."""

    entries: torch.Tensor  # (B, W, D): emitted by the last extend
    pending_kv: torch.Tensor  # (B, n < ratio, width): the open window's projected tokens
    pending_gate: torch.Tensor
    prev_kv: torch.Tensor | None  # CSA: the last closed window's Ca (B, ratio, D), gate with its bias
    prev_gate: torch.Tensor | None
    first_entry: int  # entries emitted before: the next window starts at first_entry·ratio

    @staticmethod
    def empty(x: torch.Tensor, width: int) -> CompressorState:
        none = x.new_zeros(x.shape[0], 0, width)
        return CompressorState(x.new_zeros(x.shape[0], 0, 0), none, none, None, None, 0)

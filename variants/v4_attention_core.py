"""DeepSeek-V4's attention layer over a sliding window plus compressed entries (DeepSeek-V4
report §2.3; HF deepseek_v4 DeepseekV4Attention), full-sequence forward from position 0.

Legend: B batch, T tokens, H query heads, D head_dim (one shared K=V head), R rope dim,
E compressed entries, G o_groups, L o_lora_rank, C model width.

  q = RMSNorm_unweighted(W^QB · RMSNorm(W^QA h))   per head, RoPE'd on its last R channels
  kv = RoPE(RMSNorm(W^KV h))                       ONE head, read as key and as value
  o = softmax([q·k / √D ; sink_h]) minus the sink column, over the window's and the entries' keys
  o = RoPE(o, -position)                            undoes V's rotation on the rope slice
  u = W^OB · [W^OA_g o_g]_g                         grouped low-rank output projection
A token sees window keys j with i - window < j ≤ i, and entry w once its window has closed,
(w + 1)·m ≤ i + 1 (HF DeepseekV4HCACompressor's block bias).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import RMSNorm
from .v4_compressor import KVCompressor, interleaved_rope, rope_inv_freq


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def visible_keys(T: int, window: int, n_entries: int, ratio: int, device) -> torch.Tensor:
    """(T, T + E) bool: the window's keys, then the closed compressed entries."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    in_window = (j <= i) & (j > i - window)
    closed = torch.arange(n_entries, device=device)[None, :] < (i + 1) // ratio
    return torch.cat([in_window, closed], dim=1)


class V4Indexer(nn.Module):
    """CSA's lightning indexer (report §2.3.1 eqs. 13-17; HF DeepseekV4Indexer): its own
    compressor at index_head_dim, queries from the query latent, score
    Σ_h w_{t,h}·ReLU(q_{t,h}·K_s), the top index_topk closed entries per query."""

    def __init__(self, d_model: int, q_lora_rank: int, n_heads: int, head_dim: int, top_k: int, ratio: int,
                 rope_dim: int, rope_theta: float, eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.top_k, self.ratio = n_heads, head_dim, top_k, ratio
        self.compressor = KVCompressor(d_model, head_dim, ratio, True, rope_dim, rope_theta, eps)
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(d_model, n_heads, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope_dim, rope_theta), persistent=False)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor) -> torch.Tensor:
        """(B, T, E) bool: the entries each query selects (closed ones only)."""
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        keys = self.compressor(x)  # (B, E, Di)
        q = self.q_b_proj(q_latent).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = interleaved_rope(q, positions, self.inv_freq)  # (B, Hi, T, Di)
        scores = torch.relu(torch.matmul(q.float(), keys.float().unsqueeze(1).transpose(-1, -2))) * self.head_dim ** -0.5
        weights = self.weights_proj(x).float() * self.n_heads ** -0.5  # (B, T, Hi)
        index_scores = (scores * weights.transpose(1, 2).unsqueeze(-1)).sum(1)  # (B, T, E)
        closed = visible_keys(T, 0, keys.shape[1], self.ratio, x.device)[:, T:]  # (T, E)
        index_scores = index_scores.masked_fill(~closed, float("-inf"))
        chosen = index_scores.topk(min(self.top_k, keys.shape[1]), dim=-1).indices
        selected = torch.zeros_like(index_scores, dtype=torch.bool).scatter_(-1, chosen, True)
        return selected & closed


class V4AttentionCore(nn.Module):
    """One V4 attention layer; `compressor` None is a sliding-window-only layer."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, rope_dim: int, q_lora_rank: int, o_groups: int,
                 o_lora_rank: int, window: int, rope_theta: float, compressor: KVCompressor | None,
                 indexer: V4Indexer | None = None, eps: float = 1e-6):
        super().__init__()
        self.H, self.D, self.G, self.window, self.eps = n_heads, head_dim, o_groups, window, eps
        self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(q_lora_rank, eps)
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(d_model, head_dim, bias=False)
        self.kv_norm = RMSNorm(head_dim, eps)
        self.o_a_proj = nn.Linear(n_heads * head_dim // o_groups, o_groups * o_lora_rank, bias=False)  # G blocks
        self.o_b_proj = nn.Linear(o_groups * o_lora_rank, d_model, bias=False)
        self.sinks = nn.Parameter(torch.zeros(n_heads))  # one learned logit a head, joins every softmax
        self.compressor = compressor
        self.indexer = indexer  # CSA: a query sees only the entries it selects
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope_dim, rope_theta), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(B, T, self.H, self.D).transpose(1, 2)  # (B, H, T, D)
        q = interleaved_rope(unweighted_rms_norm(q, self.eps), positions, self.inv_freq)
        kv = interleaved_rope(self.kv_norm(self.kv_proj(x)), positions, self.inv_freq)  # (B, T, D)
        entries = self.compressor(x) if self.compressor is not None else kv[:, :0]  # (B, E, D)
        keys = torch.cat([kv, entries], dim=1)  # (B, T + E, D)
        ratio = self.compressor.ratio if self.compressor is not None else 1
        visible = visible_keys(T, self.window, entries.shape[1], ratio, x.device).expand(B, 1, T, -1)
        if self.indexer is not None:
            visible = torch.cat([visible[..., :T], self.indexer(x, q_latent).unsqueeze(1)], dim=-1)
        o = self._attend(q, keys, visible)
        o = interleaved_rope(o, -positions, self.inv_freq)  # (B, H, T, D)
        return self._out(o.transpose(1, 2).reshape(B, T, self.H * self.D))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D) over keys = values (B, S, D) with a per-head sink logit."""
        logits = torch.matmul(q, keys.unsqueeze(1).transpose(-1, -2)) * self.D ** -0.5  # (B, H, T, S)
        logits = logits.masked_fill(~visible, float("-inf"))
        sink = self.sinks.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1).to(logits.dtype)
        combined = torch.cat([logits, sink], dim=-1)
        probs = (combined - combined.amax(-1, keepdim=True)).softmax(-1)[..., :-1]
        return torch.matmul(probs, keys.unsqueeze(1))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        """(B, T, H·D) → G groups each to L, then mixed to C."""
        B, T, _ = o.shape
        w = self.o_a_proj.weight.view(self.G, -1, o.shape[-1] // self.G)  # (G, L, H·D/G)
        grouped = torch.einsum("btgi,gli->btgl", o.view(B, T, self.G, -1), w)
        return self.o_b_proj(grouped.reshape(B, T, -1))

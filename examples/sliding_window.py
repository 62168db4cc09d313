"""A variant defined outside dsbench: sliding-window attention, in one file.

Each token attends to itself and the `window - 1` tokens before it (Longformer's local
attention, Beltagy et al. 2004.05150 §3.1; Mistral 7B's SWA, Jiang et al. 2310.06825 §2). It is
MHA (or GQA) with a band mask, so it reuses MultiHeadAttention's projections, RoPE and cache and
adds only what differs: the mask (`attend`), its FLOPs and bytes, its config field and column.

Use it from a spec:

    plugins = ["sliding_window"]          # importable: PYTHONPATH=examples, or an installed module
    [axes]
    attention = ["mha", "swa"]
    [attention]
    window = 32                           # read by swa only; mha cells keep their ids

or install a distribution that lists it under the `dsbench.variants` entry-point group:

    [project.entry-points."dsbench.variants"]
    swa = "sliding_window"

This example keeps the whole KV cache (so its KV bytes per token are MHA's); a serving
implementation would keep a ring buffer of `window` slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsbench import metrics
from dsbench.variants import registry
from dsbench.variants.attention import MHAConfig, MultiHeadAttention, attention_costs
from dsbench.variants.base import PartCost, PassShape


@dataclass(frozen=True)
class SWAConfig(MHAConfig):
    kind: str = "swa"
    window: int = field(default=64, metadata={"min": 1})  # keys a token sees, itself included


def band_mask(start_pos: int, T: int, S: int, window: int, device) -> torch.Tensor:
    """(T, S) True where query start_pos+t may attend key s: start_pos+t - window < s ≤ start_pos+t."""
    q_pos = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    return (s <= q_pos) & (s > q_pos - window)


class SlidingWindowAttention(MultiHeadAttention):
    Config = SWAConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.window = cfg.attention.window

    @staticmethod
    def flops_per_token(cfg, context_len: float, decode: bool = False) -> float:
        """MHA's count with the keys capped at the window: 2·params + 4·H·D·min(context, window).
        At a mean context this is exact when every token sees at least `window` keys (or every
        token sees fewer), and an upper bound in between."""
        H, D = cfg.attention.n_heads, cfg.head_dim()
        return 2 * MultiHeadAttention.param_count(cfg) + 4 * H * D * min(context_len, cfg.attention.window)

    @staticmethod
    def part_costs(cfg, shape: PassShape) -> dict[str, PartCost]:
        C, H, G, D = cfg.d_model, cfg.attention.n_heads, cfg.n_kv_heads(), cfg.head_dim()
        total = SlidingWindowAttention.flops_per_token(cfg, shape.mean_context_len, shape.decode)
        proj_io = (C + H * D) + 2 * (C + G * D) + (H * D + C)
        kv_layer = MultiHeadAttention.kv_cache_bytes_per_token(cfg, shape.act_bytes)
        banded = PassShape(shape.tokens, min(shape.mean_context_len, cfg.attention.window), shape.decode, shape.batch,
                           shape.act_bytes, shape.weight_bytes)  # a decode step reads only the window of the cache
        return attention_costs(banded, total, MultiHeadAttention.param_count(cfg), proj_io, 2 * (H + G) * D, 2 * H * D, kv_layer)

    @staticmethod
    def row_columns(cfg) -> dict:
        return {"n_kv_heads": cfg.n_kv_heads(), "window": cfg.attention.window}

    @staticmethod
    def metric_columns() -> tuple[metrics.Metric, ...]:
        """Its extra column, so reports show it, pairing holds it fixed and `dsbench check` compares it."""
        window = metrics.variant_column("window", "attention", "tokens", "keys a sliding-window token attends to, itself included",
                                        "int", check="exact", short="window")
        return (*MultiHeadAttention.metric_columns(), window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
        """q (B, H, T, D) over k, v (B, G, S, D): SDPA with the band mask (an explicit mask, so
        it also holds over a cache, where SDPA's is_causal would align the wrong corner)."""
        mask = band_mask(start_pos, q.shape[2], k.shape[2], self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


registry.register("attention", registry.Variant(
    "swa", SlidingWindowAttention, SWAConfig, "Beltagy et al. 2004.05150 §3.1; Jiang et al. 2310.06825 §2"))

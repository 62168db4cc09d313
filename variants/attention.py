"""Attention variants and their KV caches.

Legend: B batch, T tokens in this call, S cached + new tokens, H query heads, G KV heads,
D head dim, C model width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsbench.metrics import Metric, variant_column

from .base import Activations, Attention, PartConfig, PartCost, PassShape, add_cost
from .layers import RotaryEmbedding
from .precision import linear
from .profiling import part

if TYPE_CHECKING:  # annotations only: config.py builds its defaults from this file
    from .config import ModelConfig


class KVCache(nn.Module):
    """Preallocated per-layer key/value cache: (B, G, S_max, D) each (values D_v wide if given)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device, v_head_dim: int | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        v_shape = (*shape[:-1], v_head_dim or head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(v_shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, G, T, D) at start_pos; return the filled prefix (B, G, S, D) of each."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end} needs a longer cache")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def live_bytes_per_token(self) -> int:
        """Bytes one cached token occupies in this layer, read off the live tensors."""
        per_slot = self.k.element_size() * self.k[:, :, 0].numel() + self.v.element_size() * self.v[:, :, 0].numel()
        return per_slot // self.k.shape[0]

    def rows(self, start: int, stop: int) -> KVCache:
        """The cache of batch rows start:stop, sharing this one's storage (to prefill in parts)."""
        return _row_view(self, start, stop)


def _row_view(cache: nn.Module, start: int, stop: int) -> nn.Module:
    """A cache object whose buffers (batch first) are views of rows start:stop of `cache`'s."""
    view = cache.__class__.__new__(cache.__class__)
    nn.Module.__init__(view)
    view.__dict__.update({k: v for k, v in cache.__dict__.items() if not k.startswith("_")})
    for name, buffer in cache.named_buffers(recurse=False):
        view.register_buffer(name, buffer[start:stop], persistent=False)
    return view


def causal_mask(start_pos: int, T: int, S: int, device) -> torch.Tensor:
    """(T, S) boolean mask, True where query start_pos+t may attend key s (s ≤ start_pos+t)."""
    q_pos = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


def causal_attention(q, k, v, start_pos: int, scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, D) over k (B, G, S, D), v (B, G, S, Dv), the last T of the S keys being q's
    own positions → (B, H, T, Dv). G < H shares each K/V head across H/G query heads.

    Without earlier keys (train, prefill) this is SDPA. Over a cache it is `cached_attention`.
    """
    if q.shape[2] != k.shape[2]:
        return cached_attention(q, k, v, start_pos, scale)
    # No earlier tokens in the keys: the `attention` op family (dsbench/kernels/attention.py: SDPA's
    # backends, auto's pick or the cell's kernels.attention). Fused kernels (CPU flash, CUDA flash)
    # need Dv == D, else they fall back to materialising T×T scores: zero-pad V and slice the
    # output (as vLLM does for MLA prefill); the padding's products are not counted as FLOPs.
    from dsbench.kernels import choice

    D, Dv = q.shape[-1], v.shape[-1]
    v_in = F.pad(v, (0, D - Dv)) if Dv < D else v
    out = choice.run("attention", q, k, v_in, D ** -0.5 if scale is None else scale)
    return out[..., :Dv] if Dv < D else out


def cached_attention(q, k, v, start_pos: int, scale: float | None = None) -> torch.Tensor:
    """New tokens over a cache, as plain matmuls; shapes as `causal_attention`.

    The H/G query heads that share a K/V head become rows of one matmul, so a shared cache is
    read once and never copied. The scale goes on q, never on the cache (SDPA's CPU fallback,
    taken when Dv != D or V is a strided view, scales every cached key on every call). Scores
    are softmaxed in fp32.
    """
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    rows = (q * scale).reshape(B, G, H // G * T, D)  # head h → group h // (H/G), as enable_gqa
    scores = rows @ k.transpose(-1, -2)  # (B, G, H/G·T, S)
    if T > 1:  # SDPA's is_causal aligns top-left, wrong when T < S: an explicit mask
        mask = causal_mask(start_pos, T, S, q.device).repeat(H // G, 1)  # (H/G·T, S)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).type_as(v)
    return (probs @ v).reshape(B, H, T, v.shape[-1])


@dataclass(frozen=True)
class MHAConfig(PartConfig):
    """mha, gqa and mqa: the same module, G KV heads."""

    kind: str = "mha"
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); gqa and mqa set fewer
    head_dim: int | None = None  # None = d_model // n_heads
    rope_theta: float = 10000.0

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def check_heads(cfg: ModelConfig) -> str | None:
    """Heads must split the model width unless head_dim is set (every attention variant)."""
    a = cfg.attention
    if a.head_dim is None and cfg.d_model % a.n_heads:
        return f"attention.n_heads: {a.n_heads} does not divide model.d_model {cfg.d_model}; choose a divisor or set attention.head_dim"
    return None


def projection_activations(q: int, k: int, v: int, o: int, latent: int = 0) -> tuple[Activations, int]:
    """(what training keeps, the inference live set) per token for attention of these per-token
    widths: q and k before and after RoPE, v, the output and its projection's input, and a
    latent with its norm's output (MLA); a forward without autograd holds each once."""
    return Activations(narrow=2 * q + 2 * k + v + 2 * o + 2 * latent), q + k + v + o + latent


def attention_costs(shape: PassShape, total_flops: float, matmul_params: int, proj_io: int, rope_io: int,
                    qo_width: int, kv_layer_bytes: int) -> dict[str, PartCost]:
    """One layer's attention parts per step, for the roofline. Projections: 2 FLOPs per matmul
    parameter, weights read once, each linear's input read and output written (`proj_io`
    elements a token); the core: the rest of the FLOPs, each key and value written to the cache
    once and read once, or (decode) the whole cache of every row read each step."""
    N, act = shape.tokens, shape.act_bytes
    costs: dict[str, PartCost] = {}
    proj_flops = 2 * matmul_params
    add_cost(costs, "attn.proj", N * proj_flops, matmul_params * shape.weight_bytes + N * proj_io * act)
    add_cost(costs, "attn.rope", 0.0, N * rope_io * act)
    if shape.decode:
        core_bytes = shape.batch * shape.mean_context_len * kv_layer_bytes + N * (qo_width * act + kv_layer_bytes)
    else:
        core_bytes = N * (2 * kv_layer_bytes + qo_width * act)
    add_cost(costs, "attn.core", N * (total_flops - proj_flops), core_bytes)
    return costs


class MultiHeadAttention(Attention):
    """Causal self-attention with RoPE (Vaswani et al. 1706.03762; Su et al. 2104.09864).

    G = n_kv_heads KV heads shared by groups of H/G query heads: G = H is MHA, 1 < G < H is
    GQA (Ainslie et al. 2305.13245), G = 1 is MQA (Shazeer 1911.02150).
    """

    Config = MHAConfig

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.attention.n_heads, cfg.n_kv_heads(), cfg.head_dim()
        C, H, G, D = cfg.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.wq = linear(cfg.precision, C, H * D)
        self.wk = linear(cfg.precision, C, G * D)
        self.wv = linear(cfg.precision, C, G * D)
        self.wo = linear(cfg.precision, H * D, C)
        self.rope = RotaryEmbedding(D, cfg.attention.rope_theta)

    # --- accounting: exact counts for this module, checked against the instance by the tests ---
    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        C, H, G, D = cfg.d_model, cfg.attention.n_heads, cfg.n_kv_heads(), cfg.head_dim()
        return C * H * D + 2 * C * G * D + H * D * C

    @staticmethod
    def flops_per_token(cfg: ModelConfig, context_len: float, decode: bool = False) -> float:
        """Forward FLOPs for one token attending to context_len keys: 2 per multiply-add.

        Projections 2·params; scores QKᵀ 2·H·D·ctx and weighted sum AV 2·H·D·ctx. The same
        whether the token is decoded from the cache or not (`decode` is for MLA's two paths).
        """
        H, D = cfg.attention.n_heads, cfg.head_dim()
        return 2 * MultiHeadAttention.param_count(cfg) + 4 * H * D * context_len

    @staticmethod
    def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
        """One layer's cache per token: K and V for G heads of D (DeepSeek-V2 Table 1: 2·n_g·d_h)."""
        return 2 * cfg.n_kv_heads() * cfg.head_dim() * dtype_bytes

    @staticmethod
    def part_costs(cfg: ModelConfig, shape: PassShape) -> dict[str, PartCost]:
        C, H, G, D = cfg.d_model, cfg.attention.n_heads, cfg.n_kv_heads(), cfg.head_dim()
        total = MultiHeadAttention.flops_per_token(cfg, shape.mean_context_len, shape.decode)
        proj_io = (C + H * D) + 2 * (C + G * D) + (H * D + C)
        kv_layer = MultiHeadAttention.kv_cache_bytes_per_token(cfg, shape.act_bytes)
        return attention_costs(shape, total, MultiHeadAttention.param_count(cfg), proj_io, 2 * (H + G) * D, 2 * H * D, kv_layer)

    @staticmethod
    def _activations(cfg: ModelConfig) -> tuple[Activations, int]:
        H, G, D = cfg.attention.n_heads, cfg.n_kv_heads(), cfg.head_dim()
        return projection_activations(q=H * D, k=G * D, v=G * D, o=H * D)

    @staticmethod
    def train_activations(cfg: ModelConfig, seq_len: int) -> Activations:
        """Fused SDPA keeps no T×T scores: the projections' tensors alone."""
        return MultiHeadAttention._activations(cfg)[0]

    @staticmethod
    def inference_activations(cfg: ModelConfig, seq_len: int) -> int:
        return MultiHeadAttention._activations(cfg)[1]

    @staticmethod
    def row_columns(cfg: ModelConfig) -> dict:
        return {"n_kv_heads": cfg.n_kv_heads()}

    @staticmethod
    def metric_columns() -> tuple[Metric, ...]:
        return (variant_column("n_kv_heads", "attention", "1", "KV heads (MHA = n_heads, GQA groups, MQA 1; MLA: none)", "int"),)

    @staticmethod
    def kernel_families(cfg: ModelConfig, decodes: bool) -> tuple[str, ...]:
        return ("attention",)  # train, prefill and a decode cell's prompt; decode steps are plain matmuls

    @staticmethod
    def check_config(cfg: ModelConfig) -> str | None:
        if problem := check_heads(cfg):
            return problem
        H, G = cfg.attention.n_heads, cfg.n_kv_heads()
        if H % G:
            return f"attention.n_kv_heads: {G} does not divide attention.n_heads {H}"
        if cfg.head_dim() % 2:
            return f"attention.head_dim: {cfg.head_dim()} is odd; RoPE needs an even head dim"
        return None

    def new_cache(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
        """q (B, H, T, D) over k, v (B, G, S, D) → (B, H, T, D); a masked variant overrides this."""
        return causal_attention(q, k, v, start_pos)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        with part("attn.proj", self):
            q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, D)
            v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        with part("attn.rope", self):
            q, k = self.rope(q, start_pos), self.rope(k, start_pos)
        with part("attn.core", self):
            if cache is not None:
                k, v = cache.update(start_pos, k, v)  # (B, G, S, D)
            out = self.attend(q, k, v, start_pos)  # (B, H, T, D)
        with part("attn.proj", self):
            return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

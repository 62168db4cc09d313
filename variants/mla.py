"""Multi-head Latent Attention (DeepSeek-V2 §2.1, arXiv 2405.04434) and its two decode caches.

Legend: B batch, T tokens in this call, S cached + new tokens, H heads, C model width,
Dc kv_lora_rank (the paper's d_c), Dq q_lora_rank (d_c'), Dn qk_nope_head_dim (d_h),
Dr qk_rope_head_dim (d_h^R), Dv v_head_dim.

The paper's equations as this module computes them (§2.1.2, §2.1.3):
  c^KV = W^DKV h            joint KV latent (Dc), RMSNorm'd (V2 §3.1.2: "additional RMS Norm
                            layers after the compressed latent vectors")
  k^C_i = W^UK_i c^KV,  v^C_i = W^UV_i c^KV          per head, Dn and Dv wide
  c^Q = W^DQ h (RMSNorm'd), q^C_i = W^UQ_i c^Q        optional; q_lora_rank = 0: q^C_i = W^Q_i h
  q^R_i = RoPE(W^QR_i c^Q),  k^R = RoPE(W^KR h)       decoupled RoPE, ONE key shared by all heads
  o_i = Σ_j softmax_j(q_i·k_{j,i} / √(Dn + Dr)) v^C_{j,i},  q_i = [q^C_i; q^R_i], k_i = [k^C_i; k^R]
  u = W^O [o_1; …; o_H]
Weights are stacked as DeepSeek-V3's inference/model.py stacks them: wkv_a = [W^DKV; W^KR],
wkv_b = per head [W^UK_i; W^UV_i], wq (or wq_b) = per head [W^UQ_i; W^QR_i].

Two decode paths (the config field `mla_impl`, one axis value each):
- naive: up-project the latent to per-head K and V and cache those, H·(Dn + Dr + Dv) values a
  token (what a plain implementation caches; V3's attn_impl = "naive").
- absorbed: cache only [c^KV | k^R], Dc + Dr values a token, and attend over it with W^UK folded
  into the query and W^UV into the output (§2.1.2: "W^UK can be absorbed into W^Q, and W^UV can
  be absorbed into W^O"; V3's attn_impl = "absorb"). Attention over the latent is then MQA with
  one (Dc + Dr)-wide key head whose first Dc channels are also the value (FlashMLA's layout).
Train and a fresh prefill (no earlier tokens) take the expanded form in both paths, as serving
systems do: it costs fewer FLOPs per key (Dn + Dr + Dv vs 2·Dc + Dr per head); the absorbed path
still writes only the latent to its cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from dsbench.metrics import Metric, variant_column

from .attention import KVCache, MultiHeadAttention, _row_view, attention_costs, cached_attention, causal_attention, check_heads, projection_activations
from .base import Activations, Attention, PartConfig, PartCost, PassShape, at_least, choices
from .layers import RMSNorm, RotaryEmbedding
from .precision import linear
from .profiling import part

if TYPE_CHECKING:
    from .config import ModelConfig

MLA_IMPLS = ("absorbed", "naive")


@dataclass(frozen=True)
class MLAConfig(PartConfig):
    """MLA's dims. None = derived from head_dim d_h with V2's ratios (§3.1.2: d_c = 4·d_h,
    d_h^R = d_h/2), so every named size has MLA dims."""

    kind: str = "mla"
    n_heads: int = 4
    head_dim: int | None = None  # d_h; None = d_model // n_heads
    rope_theta: float = 10000.0
    kv_lora_rank: int | None = None  # d_c, the joint KV latent; None = 4·d_h
    q_lora_rank: int = at_least(0, 0)  # d_c', query latent; 0 = no query compression (V2-Lite)
    qk_nope_head_dim: int | None = None  # per-head query/key dim without RoPE; None = d_h
    qk_rope_head_dim: int | None = None  # d_h^R, the decoupled RoPE dim (one key shared by all heads); None = d_h/2
    v_head_dim: int | None = None  # per-head value dim; None = d_h
    mla_impl: str = choices("absorbed", *MLA_IMPLS)  # decode path (set by the axis value)
    # YaRN (Peng et al. 2309.00071) as DeepSeek-V3's inference/model.py applies it, active where
    # rope_factor > 1 and model.max_seq_len > original_seq_len (V3: factor 40, original 4096,
    # beta_fast 32, beta_slow 1, mscale 1).
    rope_factor: float = field(default=1.0, metadata={"min": 1})
    original_seq_len: int = 4096
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = field(default=1.0, metadata={"min": 0})

    LATE_DEFAULTS: ClassVar[dict] = {"rope_factor": 1.0, "original_seq_len": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0}


@dataclass(frozen=True)
class MLADims:
    H: int
    Dq: int  # 0: no query compression
    Dc: int
    Dn: int
    Dr: int
    Dv: int


def mla_dims(cfg: ModelConfig) -> MLADims:
    """The MLA dims of a config, unset ones derived from d_h with V2's ratios (§3.1.2: d_h = 128,
    d_c = 512 = 4·d_h, d_h^R = 64 = d_h/2), d_h^R kept even for RoPE."""
    a, d_h = cfg.attention, cfg.head_dim()
    return MLADims(
        H=a.n_heads,
        Dq=a.q_lora_rank,
        Dc=a.kv_lora_rank or 4 * d_h,
        Dn=a.qk_nope_head_dim or d_h,
        Dr=a.qk_rope_head_dim or max(2, d_h // 4 * 2),
        Dv=a.v_head_dim or d_h,
    )


class LatentCache(nn.Module):
    """Per-layer latent cache: (B, S_max, Dc + Dr) holding [c^KV | k^R] for each position."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        super().__init__()
        self.kv_lora_rank = kv_lora_rank
        shape = (batch, max_len, kv_lora_rank + rope_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.kv.shape[1]

    def update(self, start_pos: int, latent: torch.Tensor) -> torch.Tensor:
        """Write latent (B, T, Dc + Dr) at start_pos; return the filled prefix (B, S, Dc + Dr)."""
        end = start_pos + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end} needs a longer cache")
        self.kv[:, start_pos:end] = latent
        return self.kv[:, :end]

    def live_bytes_per_token(self) -> int:
        """Bytes one cached token occupies in this layer, read off the live tensor."""
        return self.kv.element_size() * self.kv[:, 0].numel() // self.kv.shape[0]

    def rows(self, start: int, stop: int) -> LatentCache:
        """The cache of batch rows start:stop, sharing this one's storage (to prefill in parts)."""
        return _row_view(self, start, stop)


def yarn_active(cfg: ModelConfig) -> bool:
    a = cfg.attention
    return a.rope_factor > 1 and cfg.max_seq_len > a.original_seq_len


def yarn_softmax_factor(cfg: ModelConfig) -> float:
    """DeepSeek-V3 model.py: softmax_scale · mscale², mscale = 0.1·mscale·ln(factor) + 1."""
    if not yarn_active(cfg):
        return 1.0
    m = 0.1 * cfg.attention.mscale * math.log(cfg.attention.rope_factor) + 1.0
    return m * m


def yarn_inv_freq(cfg: ModelConfig, dim: int) -> torch.Tensor | None:
    """RoPE frequencies with YaRN's correction (DeepSeek-V3 model.py precompute_freqs_cis): the
    dims rotating fewer than beta_slow times over original_seq_len are divided by the factor, those
    rotating more than beta_fast times kept, a linear ramp between. None: YaRN off."""
    if not yarn_active(cfg):
        return None
    a = cfg.attention

    def correction_dim(rotations: float) -> float:
        return dim * math.log(a.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(a.rope_theta))

    low = max(math.floor(correction_dim(a.beta_fast)), 0)
    high = min(math.ceil(correction_dim(a.beta_slow)), dim - 1)
    freqs = 1.0 / (a.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / a.rope_factor * (1 - smooth) + freqs * smooth


class MultiHeadLatentAttention(Attention):
    """MLA (DeepSeek-V2 §2.1): low-rank joint KV compression with decoupled RoPE."""

    Config = MLAConfig

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = self.dims = mla_dims(cfg)
        if cfg.attention.mla_impl not in MLA_IMPLS:
            raise ValueError(f"attention.mla_impl: {cfg.attention.mla_impl!r} is not one of {', '.join(MLA_IMPLS)}")
        if d.Dr % 2:
            raise ValueError(f"attention.qk_rope_head_dim: {d.Dr} is odd; RoPE needs an even dim")
        self.impl = cfg.attention.mla_impl
        C, p = cfg.d_model, cfg.precision
        if d.Dq:  # query compression (§2.1.2): W^DQ, RMSNorm, then [W^UQ; W^QR] per head
            self.wq_a = linear(p, C, d.Dq)
            self.q_norm = RMSNorm(d.Dq, cfg.norm_eps)
            self.wq_b = linear(p, d.Dq, d.H * (d.Dn + d.Dr))
        else:
            self.wq = linear(p, C, d.H * (d.Dn + d.Dr))
        self.wkv_a = linear(p, C, d.Dc + d.Dr)  # [W^DKV; W^KR]
        self.kv_norm = RMSNorm(d.Dc, cfg.norm_eps)
        self.wkv_b = linear(p, d.Dc, d.H * (d.Dn + d.Dv))  # per head [W^UK_i; W^UV_i]
        self.wo = linear(p, d.H * d.Dv, C)
        self.rope = RotaryEmbedding(d.Dr, cfg.attention.rope_theta, inv_freq=yarn_inv_freq(cfg, d.Dr))
        self.scale = (d.Dn + d.Dr) ** -0.5 * yarn_softmax_factor(cfg)  # §2.1.3: 1/√(d_h + d_h^R); YaRN's mscale²

    # --- accounting: exact counts for this module, checked against the instance by the tests ---
    @staticmethod
    def _matmul_params(cfg: ModelConfig) -> int:
        d, C = mla_dims(cfg), cfg.d_model
        q = C * d.Dq + d.Dq * d.H * (d.Dn + d.Dr) if d.Dq else C * d.H * (d.Dn + d.Dr)
        return q + C * (d.Dc + d.Dr) + d.Dc * d.H * (d.Dn + d.Dv) + d.H * d.Dv * C

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        d = mla_dims(cfg)
        return MultiHeadLatentAttention._matmul_params(cfg) + d.Dc + d.Dq  # + the two RMSNorm weights

    @staticmethod
    def flops_per_token(cfg: ModelConfig, context_len: float, decode: bool = False) -> float:
        """Forward FLOPs for one token attending to context_len keys: 2 per multiply-add.

        Projections: 2·matmul params in both paths (norms and RoPE excluded). Decoding absorbed,
        the query's W^UK (H·Dn·Dc) and the output's W^UV (H·Dc·Dv) replace up-projecting the new
        token's latent (Dc·H·(Dn + Dv)): the same count. Per key and head, the expanded form
        (train, prefill, naive decode) does scores Dn + Dr and AV Dv; the absorbed decode does
        scores over the latent Dc + Dr and AV Dc.
        """
        d = mla_dims(cfg)
        latent = decode and cfg.attention.mla_impl == "absorbed"
        per_key = (2 * d.Dc + d.Dr) if latent else (d.Dn + d.Dr + d.Dv)
        return 2 * MultiHeadLatentAttention._matmul_params(cfg) + 2 * d.H * per_key * context_len

    @staticmethod
    def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
        """One layer's cache per token. absorbed: (d_c + d_h^R) values (V2 Table 1, MLA row);
        naive: the expanded per-head K (Dn + Dr) and V (Dv), H·(Dn + Dr + Dv) values."""
        d = mla_dims(cfg)
        if cfg.attention.mla_impl == "absorbed":
            return (d.Dc + d.Dr) * dtype_bytes
        return d.H * (d.Dn + d.Dr + d.Dv) * dtype_bytes

    @staticmethod
    def part_costs(cfg: ModelConfig, shape: PassShape) -> dict[str, PartCost]:
        d, C = mla_dims(cfg), cfg.d_model
        total = MultiHeadLatentAttention.flops_per_token(cfg, shape.mean_context_len, shape.decode)
        q_width = d.H * (d.Dn + d.Dr)
        queries = (C + d.Dq) + (d.Dq + q_width) if d.Dq else C + q_width
        proj_io = queries + (C + d.Dc + d.Dr) + (d.Dc + d.H * (d.Dn + d.Dv)) + (d.H * d.Dv + C)
        rope_io = 2 * (d.H + 1) * d.Dr  # q^R of every head and the one shared k^R, read and written
        absorbed = shape.decode and cfg.attention.mla_impl == "absorbed"
        qo_width = d.H * (2 * d.Dc + d.Dr) if absorbed else d.H * (d.Dn + d.Dr + d.Dv)  # q read, o written
        kv_layer = MultiHeadLatentAttention.kv_cache_bytes_per_token(cfg, shape.act_bytes)
        return attention_costs(shape, total, MultiHeadLatentAttention._matmul_params(cfg), proj_io, rope_io, qo_width, kv_layer)

    @staticmethod
    def _activations(cfg: ModelConfig) -> tuple[Activations, int]:
        """Heads of Dn + Dr for q and k, v counted at that width too (an approximation: Dv ≤ Dn + Dr
        here), a latent of Dc + Dr + Dq (V2 §2.1)."""
        d = mla_dims(cfg)
        qk = d.H * (d.Dn + d.Dr)
        return projection_activations(q=qk, k=qk, v=qk, o=d.H * d.Dv, latent=d.Dc + d.Dr + d.Dq)

    @staticmethod
    def train_activations(cfg: ModelConfig, seq_len: int) -> Activations:
        return MultiHeadLatentAttention._activations(cfg)[0]

    @staticmethod
    def inference_activations(cfg: ModelConfig, seq_len: int) -> int:
        return MultiHeadLatentAttention._activations(cfg)[1]

    @staticmethod
    def kernel_families(cfg: ModelConfig, decodes: bool) -> tuple[str, ...]:
        # causal attention of train, prefill and the prompt; absorbed decode over the latent cache
        return ("attention", "mla_decode") if decodes and cfg.attention.mla_impl == "absorbed" else ("attention",)

    @staticmethod
    def metric_columns() -> tuple[Metric, ...]:
        return (*MultiHeadAttention.metric_columns(), *(variant_column(n, "attention", u, d, f) for n, u, d, f in (
            ("kv_lora_rank", "1", "MLA d_c: the latent the cache holds", "int"),
            ("q_lora_rank", "1", "MLA d_c': query compression (0: none)", "int"),
            ("qk_nope_head_dim", "1", "MLA d_h: the non-RoPE query/key width", "int"),
            ("qk_rope_head_dim", "1", "MLA d_h^R: the decoupled RoPE key width", "int"),
            ("v_head_dim", "1", "MLA value width", "int"),
            ("mla_impl", "", "MLA decode path: absorb | naive", "text"),
            ("rope_factor", "1", "MLA/DSA: YaRN's factor where it is active (max_seq_len > original_seq_len; V3: 40)", "g"))))

    @staticmethod
    def row_columns(cfg: ModelConfig) -> dict:
        """The resolved dims and decode path (MLA has no KV heads: it caches a latent)."""
        d = mla_dims(cfg)
        return {"n_kv_heads": None, "kv_lora_rank": d.Dc, "q_lora_rank": d.Dq, "qk_nope_head_dim": d.Dn,
                "qk_rope_head_dim": d.Dr, "v_head_dim": d.Dv, "mla_impl": cfg.attention.mla_impl,
                "rope_factor": cfg.attention.rope_factor if yarn_active(cfg) else None}

    @staticmethod
    def check_config(cfg: ModelConfig) -> str | None:
        if problem := check_heads(cfg):
            return problem
        rope = mla_dims(cfg).Dr
        if rope % 2:
            return f"attention.qk_rope_head_dim: {rope} is odd; RoPE needs an even dim"
        return None

    def new_cache(self, batch: int, max_len: int, dtype, device) -> LatentCache | KVCache:
        d = self.dims
        if self.impl == "absorbed":
            return LatentCache(batch, max_len, d.Dc, d.Dr, dtype, device)
        return KVCache(batch, d.H, max_len, d.Dn + d.Dr, dtype, device, v_head_dim=d.Dv)

    # --- forward ---
    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LatentCache | KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        d = self.dims
        with part("attn.proj", self):
            q_nope, q_rope = self._queries(x)  # (B, H, T, Dn), (B, H, T, Dr)
            c_kv, k_rope = self.wkv_a(x).split([d.Dc, d.Dr], dim=-1)  # (B, T, Dc), (B, T, Dr)
        c_kv = self.kv_norm(c_kv)
        with part("attn.rope", self):
            q_rope = self.rope(q_rope, start_pos)
            k_rope = self.rope(k_rope.unsqueeze(1), start_pos)  # (B, 1, T, Dr): one key for all heads
        if self.impl == "absorbed" and cache is not None:
            with part("attn.core", self):
                kv = cache.update(start_pos, torch.cat([c_kv, k_rope.squeeze(1)], dim=-1))  # (B, S, Dc + Dr)
            if start_pos > 0:  # earlier tokens exist only as latents: attend over the latent cache
                return self._out(self._attend_latent(q_nope, q_rope, kv, start_pos))
            cache = None  # a fresh prefill: the expanded form below, the cache already holds the latent
        with part("attn.proj", self):
            k_nope, v = self._expand(c_kv)  # (B, H, T, Dn), (B, H, T, Dv)
        with part("attn.core", self):
            q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, Dn + Dr)
            k = torch.cat([k_nope, k_rope.expand(-1, d.H, -1, -1)], dim=-1)
            if cache is not None:  # naive: the cache holds the expanded per-head K and V
                k, v = cache.update(start_pos, k, v)  # (B, H, S, ·)
            o = causal_attention(q, k, v, start_pos, scale=self.scale)  # (B, H, T, Dv)
        return self._out(o)

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q^C, q^R before RoPE), (B, H, T, Dn) and (B, H, T, Dr)."""
        B, T, _ = x.shape
        d = self.dims
        q = self.wq_b(self.q_norm(self.wq_a(x))) if d.Dq else self.wq(x)  # (B, T, H·(Dn + Dr))
        q_nope, q_rope = q.view(B, T, d.H, d.Dn + d.Dr).transpose(1, 2).split([d.Dn, d.Dr], dim=-1)
        return q_nope, q_rope

    def _expand(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, T, Dc) → per-head k^C (B, H, T, Dn) and v^C (B, H, T, Dv)."""
        B, T, _ = c_kv.shape
        d = self.dims
        kv = self.wkv_b(c_kv).view(B, T, d.H, d.Dn + d.Dv).transpose(1, 2)
        return kv.split([d.Dn, d.Dv], dim=-1)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK (H, Dn, Dc) and W^UV (H, Dv, Dc), views of wkv_b's weight."""
        d = self.dims
        w = self.wkv_b.weight.view(d.H, d.Dn + d.Dv, d.Dc)
        return w[:, :d.Dn], w[:, d.Dn:]

    def _attend_latent(self, q_nope, q_rope, kv: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Absorbed attention over the latent cache kv (B, S, Dc + Dr) → (B, H, T, Dv)."""
        w_uk, w_uv = self._up_weights()
        with part("attn.proj", self):
            q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # W^UK folded into the query
        with part("attn.core", self):
            q = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, T, Dc + Dr)
            Dc, T = self.dims.Dc, q.shape[2]
            if T == 1:  # decode: the op family mla_decode (auto's pick, or the cell's kernels.mla_decode)
                from dsbench.kernels import choice  # on first use: importing triton slows every cell's start

                o = choice.run("mla_decode", q[:, :, 0], kv, Dc, self.scale).unsqueeze(2)  # (B, H, 1, Dc)
            else:  # one key head shared by all H query heads (MQA over the latent); V = its first Dc channels
                o = cached_attention(q, kv.unsqueeze(1), kv[:, None, :, :Dc], start_pos, scale=self.scale)  # (B, H, T, Dc)
        with part("attn.proj", self):
            return torch.einsum("bhtc,hvc->bhtv", o, w_uv)  # W^UV folded into the output


    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, Dv = o.shape
        with part("attn.proj", self):
            return self.wo(o.transpose(1, 2).reshape(B, T, H * Dv))

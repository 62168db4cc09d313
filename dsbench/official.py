"""Exact analytic accounting of the official architectures the papers' claims are about.

dsbench's own models (variants/) are cut-down decoders; these are the published ones, read from
their official config.json files shipped in dsbench/official_configs/ (each file names its
source). One counter covers all six: a LLaMA-style decoder (MHA or GQA attention, SwiGLU FFN)
whose attention may be MLA (DeepSeek-V2 §2.1) and whose FFNs may be DeepSeekMoE layers
(2401.06066 §3), plus DeepSeek-V3's multi-token-prediction module (2412.19437 §2.2).

    arch = load_official("deepseek-v3")
    count = param_counts(arch)          # total, activated (two conventions), embedding, head, MTP
    kv_cache_elements_per_token(arch)   # (d_c + d_h^R)·l for MLA, 2·n_kv·d_h·l otherwise

Counting conventions (stated once, used by every claim):
- total: every parameter of the main model: input embedding table, every layer with all its
  experts, norms, the final norm and the output head (a tied head counted once). V3's MTP
  module is not part of the main model and is counted apart (`mtp`).
- activated: the parameters one token's forward pass multiplies with: attention, the dense FFN
  or the router + top-k routed experts + shared experts, norms, final norm, output head. The
  input embedding is a lookup that reads one row, so its table is not counted — the
  convention DeepSeek-V2 and V3 use (21B, 37B).
- activated_with_embedding: the same plus the whole input embedding table — the convention
  DeepSeekMoE's 2.8B for its 16B model can only come from.

FLOPs follow dsbench's convention (variants/decoder.py FLOP_CONVENTION): 2 per multiply-add;
forward = 2 × activated matmul parameters (router and output head included; embedding lookup
and norms excluded) + attention scores and AV at the mean causal context (a token at position
p attends p + 1 keys; `causal=False` counts every token attending all T keys); train = 3 ×
forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from importlib import resources

from dsbench.variants import registry
from dsbench.variants.attention import MHAConfig
from dsbench.variants.config import ModelConfig
from dsbench.variants.mla import MLAConfig, MultiHeadLatentAttention

OFFICIAL_MODELS = ("deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "deepseek-moe-16b", "deepseek-llm-67b", "llama-2-7b")
FP8_BLOCK = 128  # V3's checkpoint stores one FP32 scale per 128×128 block of each FP8 weight


from dsbench.errors import OfficialConfigError  # noqa: E402,F401 (kept importable from here)


@dataclass(frozen=True)
class Arch:
    """The architecture fields of a config.json (Hugging Face names), defaults where a family
    does not have the field."""

    name: str
    source: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    tie_word_embeddings: bool = False
    # MLA (DeepSeek-V2/V3); kv_lora_rank None = plain MHA/GQA
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # DeepSeekMoE; n_routed_experts None = dense
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    moe_intermediate_size: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str | None = None  # "noaux_tc": V3's router keeps a per-expert score-correction bias
    num_nextn_predict_layers: int = 0  # V3's MTP depth D
    quantization_config: dict | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        """vLLM / Hugging Face's rule: routed from first_k_dense_replace on, every moe_layer_freq."""
        return self.n_routed_experts is not None and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


def load_official(name: str) -> Arch:
    """One shipped official config (see OFFICIAL_MODELS)."""
    if name not in OFFICIAL_MODELS:
        raise OfficialConfigError(f"official config: unknown model {name!r}; allowed: {', '.join(OFFICIAL_MODELS)}")
    raw = json.loads(resources.files("dsbench").joinpath("official_configs", f"{name}.json").read_text())
    known = {f.name for f in fields(Arch)}
    return Arch(name=name, **{k: v for k, v in raw.items() if k in known}, source=raw["_source"])


# --- parameters, per part ---


def attention_config(a: Arch) -> ModelConfig:
    """The arch's attention as dsbench's own variant builds it (MLA absorbed, or MHA/GQA), so its
    counts come from the variant's formulas (variants/attention.py, variants/mla.py). The FFN is
    not one of dsbench's cuts of a dense base (V2/V3 size their experts freely): counted below."""
    if a.is_mla:
        attention = MLAConfig(n_heads=a.num_attention_heads, q_lora_rank=a.q_lora_rank or 0, kv_lora_rank=a.kv_lora_rank,
                              qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim)
    else:
        attention = MHAConfig(n_heads=a.num_attention_heads, n_kv_heads=a.kv_heads)
    return ModelConfig(d_model=a.hidden_size, n_layers=a.num_hidden_layers, vocab_size=a.vocab_size, attention=attention)


def _attention(a: Arch):
    return registry.ATTENTION[attention_config(a).attention.kind].module


def attention_params(a: Arch) -> int:
    """One layer's attention, norms inside MLA included (matmuls + RMSNorm weights)."""
    return _attention(a).param_count(attention_config(a))


def attention_matmul_params(a: Arch) -> int:
    """q, k, v, o (GQA shares each K/V head across n_heads / n_kv heads); MLA's W^DQ, W^UQ|W^QR
    (or W^Q), W^DKV|W^KR, W^UK|W^UV and W^O."""
    cfg = attention_config(a)
    return MultiHeadLatentAttention._matmul_params(cfg) if a.is_mla else _attention(a).param_count(cfg)


def swiglu_params(C: int, width: int) -> int:
    return 3 * C * width  # gate, up, down


def router_params(a: Arch) -> int:
    """The gate's weight, plus V3's per-expert score-correction bias (aux-loss-free balancing)."""
    return a.n_routed_experts * a.hidden_size + (a.n_routed_experts if a.topk_method == "noaux_tc" else 0)


def ffn_params(a: Arch, i: int, active: bool) -> int:
    """Layer i's FFN: dense SwiGLU, or router + routed experts (top-k if active) + shared experts."""
    C = a.hidden_size
    if not a.is_moe_layer(i):
        return swiglu_params(C, a.intermediate_size)
    routed = a.num_experts_per_tok if active else a.n_routed_experts
    return router_params(a) + (routed + a.n_shared_experts) * swiglu_params(C, a.moe_intermediate_size)


def layer_params(a: Arch, i: int, active: bool) -> int:
    return attention_params(a) + ffn_params(a, i, active) + 2 * a.hidden_size  # + two RMSNorms


def mtp_params(a: Arch) -> int:
    """V3 §2.2: each MTP depth has its own Transformer block (layer index L + k, a MoE layer),
    RMSNorms for h and the embedding, and M_k (2d → d); embedding and head are shared."""
    C = a.hidden_size
    return sum(layer_params(a, a.num_hidden_layers + k, active=False) + 2 * C + 2 * C * C
               for k in range(a.num_nextn_predict_layers))


@dataclass(frozen=True)
class ParamCounts:
    total: int
    activated: int  # input embedding table not counted (V2/V3's convention)
    activated_with_embedding: int  # DeepSeekMoE's convention
    embedding: int
    head: int
    mtp: int  # V3's MTP module's own weights (0 elsewhere)
    mtp_stored: int  # the same plus the copies of the shared embedding and head its checkpoint stores


def param_counts(a: Arch) -> ParamCounts:
    C, L = a.hidden_size, a.num_hidden_layers
    embedding = a.vocab_size * C
    head = 0 if a.tie_word_embeddings else a.vocab_size * C
    blocks = sum(layer_params(a, i, active=False) for i in range(L))
    blocks_active = sum(layer_params(a, i, active=True) for i in range(L))
    mtp = mtp_params(a)
    copies = (embedding + head + C) * a.num_nextn_predict_layers  # embed_tokens, shared_head.{head, norm}
    return ParamCounts(
        total=embedding + blocks + C + head,
        activated=blocks_active + C + head,
        activated_with_embedding=embedding + blocks_active + C + head,
        embedding=embedding, head=head, mtp=mtp, mtp_stored=mtp + copies,
    )


def fp8_scale_count(a: Arch) -> int:
    """FP32 block scales (weight_scale_inv) of an FP8 checkpoint: one per 128×128 block of every
    FP8 linear — attention projections and every FFN/expert matrix; embedding, head, router and
    norms stay BF16. Hugging Face counts them in a checkpoint's parameter total."""
    if not a.quantization_config:
        return 0
    blocks = lambda rows, cols: -(-rows // FP8_BLOCK) * -(-cols // FP8_BLOCK)  # noqa: E731
    C, H = a.hidden_size, a.num_attention_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    attention = (blocks(a.q_lora_rank, C) + blocks(H * qk, a.q_lora_rank) + blocks(a.kv_lora_rank + a.qk_rope_head_dim, C)
                 + blocks(H * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank) + blocks(C, H * a.v_head_dim))
    swiglu = lambda width: 2 * blocks(width, C) + blocks(C, width)  # noqa: E731
    expert = swiglu(a.moe_intermediate_size) * (a.n_routed_experts + a.n_shared_experts)
    layers = range(a.num_hidden_layers + a.num_nextn_predict_layers)
    return sum(attention + (expert if a.is_moe_layer(i) else swiglu(a.intermediate_size)) for i in layers)


# --- KV cache (DeepSeek-V2 Table 1) ---


def kv_cache_elements_per_token(a: Arch) -> int:
    """Cached elements per token over all layers: MLA (d_c + d_h^R)·l, else 2·n_kv·d_h·l."""
    cfg = attention_config(a)
    return _attention(a).kv_cache_bytes_per_token(cfg, 1) * a.num_hidden_layers


def table1_kv_elements(n_h: int, d_h: int, n_layers: int, n_g: int, d_c: int, d_rope: int) -> dict[str, int]:
    """V2 Table 1: KV cache elements per token of each attention mechanism."""
    return {"MHA": 2 * n_h * d_h * n_layers, "GQA": 2 * n_g * d_h * n_layers, "MQA": 2 * d_h * n_layers,
            "MLA": (d_c + d_rope) * n_layers}


# --- FLOPs ---


def activated_matmul_params(a: Arch) -> int:
    """What the forward multiplies a token with: activated parameters less norms (router and
    head included, embedding lookup excluded)."""
    C, L = a.hidden_size, a.num_hidden_layers
    ffn = sum(ffn_params(a, i, active=True) - (a.n_routed_experts if a.is_moe_layer(i) and a.topk_method == "noaux_tc" else 0)
              for i in range(L))
    head = a.vocab_size * C
    return L * attention_matmul_params(a) + ffn + head


def attention_flops_per_token(a: Arch, seq_len: int, causal: bool = True) -> float:
    """Forward scores (QKᵀ) and AV over every layer, from the variant's own formula less its
    projections; MLA trains in the expanded form (§2.1.2)."""
    cfg = attention_config(a)
    keys = (seq_len + 1) / 2 if causal else seq_len
    per_layer = _attention(a).flops_per_token(cfg, keys) - 2 * attention_matmul_params(a)
    return per_layer * a.num_hidden_layers


def train_flops_per_token(a: Arch, seq_len: int, causal: bool = True) -> float:
    """3 × (2 · activated matmul params + attention) for a token of a seq_len-long sequence."""
    return 3 * (2 * activated_matmul_params(a) + attention_flops_per_token(a, seq_len, causal))

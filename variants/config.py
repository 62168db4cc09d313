"""Model configuration: small frozen dataclasses and the table of named sizes.

A config is the complete, hashable description of a model. The harness builds one per cell
from a named size plus the spec's overrides; `cell_id` hashes its `asdict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class AttentionConfig:
    kind: str = "mha"
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); grouped variants set fewer
    head_dim: int | None = None  # None = d_model // n_heads
    rope_theta: float = 10000.0
    # --- MLA (variants/mla.py, DeepSeek-V2 §2.1). None = derived from head_dim d_h with V2's
    # ratios (§3.1.2: d_c = 4·d_h, d_h^R = d_h/2), so every named size has MLA dims.
    kv_lora_rank: int | None = None  # d_c, the joint KV latent; None = 4·d_h
    q_lora_rank: int = field(default=0, metadata={"min": 0})  # d_c', query latent; 0 = no query compression (V2-Lite)
    qk_nope_head_dim: int | None = None  # per-head query/key dim without RoPE; None = d_h
    qk_rope_head_dim: int | None = None  # d_h^R, the decoupled RoPE dim (one key shared by all heads); None = d_h/2
    v_head_dim: int | None = None  # per-head value dim; None = d_h
    mla_impl: str = field(default="absorbed", metadata={"choices": ("absorbed", "naive")})  # decode path (set by the axis)


def _choices(default: str, *allowed: str):
    return field(default=default, metadata={"choices": allowed})


def _at_least(default, minimum):
    return field(default=default, metadata={"min": minimum})


@dataclass(frozen=True)
class FFNConfig:
    kind: str = "dense"
    d_ff: int = 192  # SwiGLU hidden width; the dense base MoE variants are cut from
    balance: str = "n/a"  # load balancing; only routed FFNs use it
    # --- routed FFNs (variants/moe.py). Classic MoE: n_experts experts of width d_ff/top_k, so
    # top_k of them activate exactly d_ff (the dense width). DeepSeekMoE (2401.06066 §3) splits
    # each into `granularity` m experts and isolates n_shared of the m·n_experts as shared.
    n_experts: int = 16  # N, as DeepSeekMoE 2B (§4.1): 16 experts, top-2
    top_k: int = 2  # K
    granularity: int = 4  # m (deepseekmoe only): 64 fine-grained experts, 8 activated
    n_shared: int = _at_least(1, 0)  # K_s (deepseekmoe only): 1 shared + 7 of 63 routed, as DeepSeekMoE 2B; 0 = none (ablation)
    first_k_dense: int = _at_least(0, 0)  # leading layers that keep the dense FFN
    router: str = _choices("softmax", "softmax", "sigmoid", "v3")  # v3: sigmoid, normalised, scaled
    norm_topk: bool = False  # renormalise the selected gate weights to sum to 1 (v3 forces it)
    routed_scale: float = 2.5  # routed scaling factor, used by router = "v3" (V3 config: 2.5)
    n_group: int = 1  # group-limited routing (V3 §2.1.2): experts split into n_group groups…
    topk_group: int = 1  # …of which topk_group are kept per token
    aux_alpha: float = _at_least(0.01, 0)  # α1, expert-level balance loss (DeepSeekMoE §3.3)
    aux_device_alpha: float = _at_least(0.0, 0)  # α2, device-level balance loss, over n_devices groups
    n_devices: int = 1
    seq_aux_alpha: float = _at_least(0.0, 0)  # α, V3's complementary sequence-wise loss (V3 §2.1.2)
    bias_update_rate: float = 0.001  # γ, auxiliary-loss-free bias step (V3 §2.1.2 uses 0.001)
    bias_zero_mean: bool = False  # re-centre the biases after each update (a variant; not in V3)
    capacity_factor: float = _at_least(0.0, 0)  # 0 = dropless; else drop tokens past capacity
    uniform_routing: bool = False  # force a perfectly balanced assignment (best-case throughput)


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    vocab_size: int = 256
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    precision: str = "fp32"  # a key of variants.precision.PRECISIONS
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)

    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    def n_kv_heads(self) -> int:
        return self.attention.n_kv_heads or self.attention.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


# Named sizes, one table (as gpt-fast's transformer_configs). SwiGLU width is ~8/3·d rounded to
# a multiple of 64 (LLaMA, Touvron et al. 2302.13971 §2.2) so fine-grained MoE splits divide it.
SIZES: dict[str, dict] = {
    "debug": dict(d_model=64, n_layers=2, max_seq_len=256, n_heads=4, d_ff=192),
    "small": dict(d_model=256, n_layers=4, max_seq_len=1024, n_heads=8, d_ff=704),
    "medium": dict(d_model=768, n_layers=12, max_seq_len=4096, n_heads=12, d_ff=2048),
    "large": dict(d_model=2048, n_layers=24, max_seq_len=8192, n_heads=16, d_ff=5504),
    "xl": dict(d_model=4096, n_layers=32, max_seq_len=32768, n_heads=32, d_ff=11008),
}

MODEL_FIELDS = (
    "d_model", "n_layers", "vocab_size", "max_seq_len", "norm_eps", "tie_embeddings", "init_std", "precision",
)


def config_from_size(size: str, **overrides) -> ModelConfig:
    """A ModelConfig for a named size; overrides may name model, attention or FFN fields."""
    merged = {**SIZES[size], **overrides}
    attention_fields = AttentionConfig.__dataclass_fields__
    ffn_fields = FFNConfig.__dataclass_fields__
    attention = AttentionConfig(**{k: v for k, v in merged.items() if k in attention_fields})
    ffn = FFNConfig(**{k: v for k, v in merged.items() if k in ffn_fields})
    model = {k: v for k, v in merged.items() if k in MODEL_FIELDS}
    return ModelConfig(attention=attention, ffn=ffn, **model)


def with_parts(cfg: ModelConfig, attention: dict | None = None, ffn: dict | None = None) -> ModelConfig:
    return replace(
        cfg,
        attention=replace(cfg.attention, **(attention or {})),
        ffn=replace(cfg.ffn, **(ffn or {})),
    )

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


@dataclass(frozen=True)
class FFNConfig:
    kind: str = "dense"
    d_ff: int = 192  # SwiGLU hidden width; the dense base MoE variants are cut from
    balance: str = "n/a"  # load balancing; only routed FFNs use it


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

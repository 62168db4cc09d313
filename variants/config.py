"""Model configuration: a small frozen dataclass, the part configs it holds, the named sizes.

The config tree mirrors the module tree (torchtitan's pattern): ModelConfig holds the model's
own fields and one config per part, `attention` and `ffn`, each the variant's own class
(attention.py MHAConfig, mla.py MLAConfig, ffn.py DenseFFNConfig, moe.py RoutedFFNConfig /
DeepSeekMoEConfig), holding exactly the fields that variant reads. A config is the complete,
hashable description of a model; `cell_id` hashes its `asdict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .attention import MHAConfig
from .base import PartConfig
from .ffn import DenseFFNConfig
from . import registry


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
    mtp: int = field(default=0, metadata={"min": 0})  # D multi-token-prediction modules (V3 §2.2); 0 = none
    # The residual stream (registry.RESIDUAL): plain, or mHC's hc_mult streams mixed by a
    # Sinkhorn-projected matrix of hc_sinkhorn_iters iterations (V4's 4 and 20; HF config defaults).
    residual: str = field(default="plain", metadata={"choices": tuple(registry.RESIDUAL)})
    hc_mult: int = field(default=4, metadata={"min": 1})
    hc_sinkhorn_iters: int = field(default=20, metadata={"min": 1})
    attention: PartConfig = field(default_factory=MHAConfig)
    ffn: PartConfig = field(default_factory=DenseFFNConfig)

    def __post_init__(self):
        if self.residual != "plain" and self.mtp:
            # MTP's modules take the one normed hidden state (V3 §2.2); V4's multi-stream MTP is not built
            raise ValueError(f"model.residual = {self.residual!r} with model.mtp = {self.mtp}: allowed with mtp > 0: residual = 'plain'")

    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    def n_kv_heads(self) -> int:
        """KV heads of an MHA-family attention (MLA has none: it caches a latent)."""
        return self.attention.kv_heads()

    def to_dict(self) -> dict:
        """The config's identity. A field added after cells were first recorded is left out at
        its default (mtp = 0, residual = plain), so every existing cell keeps its id; the mHC
        sizes are part of it only where mHC is built."""
        d = asdict(self)
        for name, default in LATE_DEFAULTS.items():
            if d[name] == default:
                d.pop(name)
        if self.residual == "plain":
            d.pop("hc_mult"), d.pop("hc_sinkhorn_iters")
        d["attention"], d["ffn"] = self.attention.identity(), self.ffn.identity()
        return d


LATE_DEFAULTS = {"mtp": 0, "residual": "plain"}

# Named sizes, one table (as gpt-fast's transformer_configs). SwiGLU width is ~8/3·d rounded to
# a multiple of 64 (LLaMA, Touvron et al. 2302.13971 §2.2) so fine-grained MoE splits divide it.
SIZES: dict[str, dict] = {
    "debug": dict(d_model=64, n_layers=2, max_seq_len=256, n_heads=4, d_ff=192),
    "mini": dict(d_model=128, n_layers=3, max_seq_len=512, n_heads=4, d_ff=384),
    "small": dict(d_model=256, n_layers=4, max_seq_len=1024, n_heads=8, d_ff=704),
    "medium": dict(d_model=768, n_layers=12, max_seq_len=4096, n_heads=12, d_ff=2048),
    "large": dict(d_model=2048, n_layers=24, max_seq_len=8192, n_heads=16, d_ff=5504),
    "xl": dict(d_model=4096, n_layers=32, max_seq_len=32768, n_heads=32, d_ff=11008),
}

MODEL_FIELDS = (
    "d_model", "n_layers", "vocab_size", "max_seq_len", "norm_eps", "tie_embeddings", "init_std", "precision", "mtp",
    "residual", "hc_mult", "hc_sinkhorn_iters",
)


def config_from_size(size: str, attention: str = "mha", ffn: str = "dense", **overrides) -> ModelConfig:
    """A ModelConfig for a named size with these attention and FFN variants, as a sweep cell
    builds it; overrides name model fields or fields of either part. As in a spec, a key only
    other variants read leaves this config alone; a key no variant reads is a TypeError."""
    merged = {**SIZES[size], **overrides}
    attention_cfg, _ = registry.part_config("attention", attention, merged)
    ffn_cfg, _ = registry.part_config("ffn", ffn, merged)
    model = {k: v for k, v in merged.items() if k in MODEL_FIELDS}
    unread = {k for k in overrides if k not in model and not registry.readers("attention", k) and not registry.readers("ffn", k)}
    if unread:
        raise TypeError(f"config_from_size: {', '.join(sorted(unread))} read by neither the model nor any variant")
    return ModelConfig(attention=attention_cfg, ffn=ffn_cfg, **model)


def with_parts(cfg: ModelConfig, attention: dict | None = None, ffn: dict | None = None) -> ModelConfig:
    """cfg with part fields changed; a new `kind` rebuilds that part as its axis value builds it,
    carrying over the fields the new variant shares with the old one (heads, d_ff, …)."""
    def changed(section: str, part: PartConfig, changes: dict | None) -> PartConfig:
        if not changes:
            return part
        values = {**asdict(part), **changes}
        kind = values.pop("kind")
        new, used = registry.part_config(section, kind, values)
        unread = set(changes) - used - {"kind"}
        if unread:
            raise TypeError(f"with_parts: {section} variant {kind} does not read {', '.join(sorted(unread))}")
        return new

    return replace(cfg, attention=changed("attention", cfg.attention, attention), ffn=changed("ffn", cfg.ffn, ffn))

"""Which module each axis value builds. The harness validates specs against these tables, so a
new variant (moe, deepseekmoe, mla, fp8, …) is added here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from .attention import MultiHeadAttention
from .ffn import DenseFFN
from .mla import MultiHeadLatentAttention
from .moe import MoEFeedForward
from .precision import PRECISIONS


@dataclass(frozen=True)
class Variant:
    name: str
    module: type
    paper: str
    routed: bool = False  # routed FFNs take the `balance` axis; others collapse it to "n/a"
    # Config fields this variant reads besides `kind`. The others are reset to their defaults
    # and left out of its cell identity, so they neither split cells nor change ids.
    fields: tuple[str, ...] = ()
    # Fields the axis value itself sets, from the part's other settings (gqa's KV heads, mla's
    # decode path): applied at expansion, so the cell's config shows what is built.
    overrides: Callable[[object], dict] | None = None

    def build(self, cfg, layer_idx: int):
        """The module for one layer (a routed FFN may keep leading layers dense)."""
        build = getattr(self.module, "build", None)
        return build(cfg, layer_idx) if build else self.module(cfg, layer_idx)


def gqa_kv_heads(n_heads: int) -> int:
    """gqa's default KV heads: the largest divisor of n_heads that is at most n_heads/4."""
    return max(g for g in range(1, max(1, n_heads // 4) + 1) if n_heads % g == 0)


_MHA_FIELDS = ("n_heads", "n_kv_heads", "head_dim", "rope_theta")
_MLA_FIELDS = ("n_heads", "head_dim", "rope_theta", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
               "v_head_dim", "mla_impl")
ATTENTION: dict[str, Variant] = {
    "mha": Variant("mha", MultiHeadAttention, "Vaswani et al. 1706.03762", fields=_MHA_FIELDS),
    "gqa": Variant("gqa", MultiHeadAttention, "Ainslie et al. 2305.13245", fields=_MHA_FIELDS,
                   overrides=lambda a: {"n_kv_heads": a.n_kv_heads or gqa_kv_heads(a.n_heads)}),
    "mqa": Variant("mqa", MultiHeadAttention, "Shazeer 1911.02150", fields=_MHA_FIELDS, overrides=lambda a: {"n_kv_heads": 1}),
    "mla": Variant("mla", MultiHeadLatentAttention, "DeepSeek-V2 2405.04434 §2.1 (absorbed decode)", fields=_MLA_FIELDS,
                   overrides=lambda a: {"mla_impl": "absorbed"}),
    "mla-naive": Variant("mla-naive", MultiHeadLatentAttention, "DeepSeek-V2 2405.04434 §2.1 (naive decode)", fields=_MLA_FIELDS,
                         overrides=lambda a: {"mla_impl": "naive"}),
}

ROUTED_FIELDS = (
    "d_ff", "balance", "n_experts", "top_k", "first_k_dense", "router", "norm_topk", "routed_scale", "n_group",
    "topk_group", "aux_alpha", "aux_device_alpha", "n_devices", "seq_aux_alpha", "bias_update_rate",
    "bias_zero_mean", "capacity_factor", "uniform_routing",
)

FFN: dict[str, Variant] = {
    "dense": Variant("dense", DenseFFN, "Shazeer 2002.05202 (SwiGLU)", fields=("d_ff", "balance")),
    "moe": Variant("moe", MoEFeedForward, "GShard, Lepikhin et al. 2006.16668", routed=True, fields=ROUTED_FIELDS),
    "deepseekmoe": Variant(
        "deepseekmoe", MoEFeedForward, "DeepSeekMoE, Dai et al. 2401.06066 §3", routed=True,
        fields=(*ROUTED_FIELDS, "granularity", "n_shared"),
    ),
}

# Load-balancing strategies for routed FFNs; `none` is always available.
BALANCE: dict[str, str] = {
    "none": "no balancing term",
    "aux": "auxiliary balance loss: expert-level (DeepSeekMoE §3.3), device-level and V3 sequence-wise as options",
    "bias": "auxiliary-loss-free: per-expert routing bias updated by γ·sign(mean load − load) (V3 §2.1.2, 2408.15664)",
}

WORKLOADS: dict[str, str] = {
    "train": "AdamW steps on batch×seq tokens: forward, backward, optimizer",
    "prefill": "one forward over batch×seq tokens, filling a KV cache",
    "decode": "prefill a context, then generate tokens one at a time from the KV cache",
}


def axis_values() -> dict[str, tuple[str, ...]]:
    """Every axis and the values that are built today."""
    return {
        "ffn": tuple(FFN),
        "attention": tuple(ATTENTION),
        "precision": tuple(PRECISIONS),
        "balance": tuple(BALANCE),
        "workload": tuple(WORKLOADS),
    }


def relevant_fields(part) -> dict:
    """The fields of an AttentionConfig or FFNConfig that its variant reads (kind included)."""
    table = ATTENTION if hasattr(part, "n_heads") else FFN
    keep = ("kind", *table[part.kind].fields)
    return {k: v for k, v in dataclasses.asdict(part).items() if k in keep}


def normalize(part):
    """The part as its axis value builds it: the value's own overrides applied, and every field
    its variant does not read reset to the default."""
    variant = (ATTENTION if hasattr(part, "n_heads") else FFN)[part.kind]
    if variant.overrides is not None:
        part = dataclasses.replace(part, **variant.overrides(part))
    return type(part)(**relevant_fields(part))

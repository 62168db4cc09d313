"""Which module each axis value builds. The harness validates specs against these tables, so a
new variant (moe, deepseekmoe, mla, fp8, …) is added here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .attention import MultiHeadAttention
from .ffn import DenseFFN
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


ATTENTION: dict[str, Variant] = {
    "mha": Variant("mha", MultiHeadAttention, "Vaswani et al. 1706.03762", fields=("n_heads", "n_kv_heads", "head_dim", "rope_theta")),
}

FFN: dict[str, Variant] = {
    "dense": Variant("dense", DenseFFN, "Shazeer 2002.05202 (SwiGLU)", fields=("d_ff", "balance")),
}

# Load-balancing strategies for routed FFNs; `none` is always available.
BALANCE: dict[str, str] = {
    "none": "no balancing term",
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
    """The same part with every field its variant does not read reset to the default."""
    return type(part)(**relevant_fields(part))

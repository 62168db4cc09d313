"""Which module each axis value builds. The harness validates specs against these tables, so a
new variant (moe, deepseekmoe, mla, fp8, …) is added here and nowhere else.
"""

from __future__ import annotations

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


ATTENTION: dict[str, Variant] = {
    "mha": Variant("mha", MultiHeadAttention, "Vaswani et al. 1706.03762"),
}

FFN: dict[str, Variant] = {
    "dense": Variant("dense", DenseFFN, "Shazeer 2002.05202 (SwiGLU)"),
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

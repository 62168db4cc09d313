"""Every built-in op family and the kernel file that registers it (importing the file registers)."""

from __future__ import annotations

import importlib

MODULES = {
    "attention": "attention",
    "fp8_gemm": "fp8_gemm",
    "mla_decode": "mla_decode",
    "moe_experts": "grouped_mm",
    "dsa_index_scores": "dsa_indexer",
    "dsa_topk": "dsa_indexer",
    "dsa_attention": "dsa_attention",
}


def load(name: str | None = None) -> None:
    """Import the file of family `name` (every family's where None; an unknown name: none)."""
    names = MODULES if name is None else [name] if name in MODULES else []
    for module in dict.fromkeys(MODULES[n] for n in names):
        importlib.import_module(f"{__package__}.{module}")

"""Analytic accounting of a cell: parameters, FLOPs per token for its workload, KV-cache bytes.

The formulas live beside each module in variants/ (nanoGPT keeps estimate_mfu beside the
model); this file applies them to a cell's workload. They are exact counts, not estimates.
"""

from __future__ import annotations

from dsbench import memory_estimate
from dsbench.cell import Cell
from dsbench.variants import decoder, registry
from dsbench.variants.precision import precision_of
from dsbench.variants.precision import dtype_bytes
from dsbench.workloads import workload_of


def mean_context_len(cell: Cell) -> float:
    """Keys a processed token attends to on average (a token at position p attends p+1)."""
    return workload_of(cell).mean_context_len(cell.workload)


def tokens_per_step(cell: Cell) -> int:
    return workload_of(cell).tokens_per_step(cell.workload)


def flops_per_token(cell: Cell) -> float:
    return workload_of(cell).flops_per_token(cell.model, cell.workload)


def accounting(cell: Cell) -> dict:
    cfg = cell.model
    kv_dtype = precision_of(cfg).inference_dtype
    return {
        **decoder.param_counts(cfg),
        "flops_per_token": flops_per_token(cell),
        "flops_per_token_mtp": workload_of(cell).mtp_flops_per_token(cfg, cell.workload),
        "flops_convention": decoder.FLOP_CONVENTION,
        "kv_cache_bytes_per_token": decoder.kv_cache_bytes_per_token(cfg, dtype_bytes(kv_dtype)),
        "kv_cache_bytes_at_context": kv_cache_bytes_at_context(cell, dtype_bytes(kv_dtype)),
        "tokens_per_step": tokens_per_step(cell),
    }


def kv_cache_bytes_at_context(cell: Cell, kv_bytes: int) -> int | None:
    """One sequence's whole cache at the cell's context (decode: context_len, prefill: seq_len),
    all layers: per token × context for most caches, with its constant part (V4's window, its
    open compression windows) where it has one. None where nothing is cached (train)."""
    workload = workload_of(cell)
    L = cell.workload.get("context_len") or cell.workload.get("seq_len")
    if workload.trains or not L:
        return None
    return int(decoder.kv_cache_bytes(cell.model, kv_bytes, L))


def static_row(cell: Cell) -> dict:
    """Every column known before the cell runs: identity, axes, resolved config, accounting."""
    cfg = cell.model
    row = {"cell_id": cell.cell_id, "label": cell.label(), **cell.axes, "device": cell.device}
    row.update(
        # n_kv_heads is the attention variant's own column (row_columns); None keeps its place
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.attention.n_heads, n_kv_heads=None,
        head_dim=cfg.head_dim(), d_ff=cfg.ffn.d_ff, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
    )
    row.update({k: cell.workload.get(k) for k in ("batch_size", "seq_len", "context_len", "new_tokens", "steps", "lr",
                                                  "mtp_lambda", "train_steps")})
    row["mtp"] = cfg.mtp
    row.update(ep=cell.ep, redundant_experts=cell.parallel.get("redundant_experts", 0))
    row.update(warmup_steps=cell.measure["warmup"], repeats=cell.measure["repeats"], replicate=cell.measure.get("replicate", 0))
    row.update(seed=cell.seed, data=cell.data, data_digest=cell.data_digest)
    row.update(accounting(cell))
    row.update(memory_estimate.estimate(cell).columns())
    row.update(registry.ATTENTION[cfg.attention.kind].module.row_columns(cfg))
    row.update(registry.FFN[cfg.ffn.kind].module.row_columns(cfg))
    row.update(workload_of(cell).row_columns(cfg, cell.workload, row["kv_cache_bytes_per_token"]))
    return row

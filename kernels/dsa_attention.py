"""DeepSeek Sparse Attention's main attention over the selected latent rows (DeepSeek-V3.2-Exp:
"we implement DSA based on the MQA mode of MLA"), an op family (kernels/choice.py).

Legend: B batch, H heads, t queries, S cached keys, K selected keys a query, C = Dc + Dr the
latent row [c^KV | k^R], Dc its value part (W^UK already folded into q, W^UV applied after).

dsa_attention: q (B, H, t, C), kv (B, S, C), idx (B, t, K) → o (B, H, t, Dc) and, where asked,
the probabilities summed over heads (B, t, K) (the indexer's KL target in training).
- reference: every query's K rows gathered at once (one index_select into (B·t·K, C)), then per
  query one (H × C)·(C × K) matmul, softmax in fp32, one (H × K)·(K × Dc) matmul.
- blocked: the same calls QUERY_BLOCK queries at a time, through one reused buffer of
  QUERY_BLOCK·K rows: a prefill chunk of 256 queries gathers 256·K rows (150 MiB at K = 2048,
  C = 72), which the two matmuls then read back from memory; in blocks they are read from the
  cache. Per query the same matmuls: bit-identical; ~2× faster on a CPU prefilling. Decoding
  (t = 1) it is the reference's own calls, so it does not run there.
The masked form (dense latent scores over every causal key, the unselected masked: DeepSeek's
reference prefill) is not an implementation of this family: it does S/K times the work, and its
FLOPs are counted as such (attention.dsa_prefill = "masked" picks it for a whole cell).
"""

from __future__ import annotations

import torch

from . import choice

QUERY_BLOCK = 8  # queries gathered at once in `attention_blocked`: 8·K·C·4 bytes = 4.7 MiB at K = 2048, C = 72


def gather_rows(kv: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """kv (B, S, W), idx (B, t, K) → the selected rows (B, t, K, W): one index_select of
    contiguous rows over the flattened batch (advanced indexing per row is several times slower).
    out: a reused buffer of at least B·t·K rows; a fresh allocation this large costs more in page
    faults than the gather itself (×4 on a CPU at 512K rows)."""
    B, S, W = kv.shape
    flat = idx.reshape(-1) if B == 1 else (idx + S * torch.arange(B, device=idx.device)[:, None, None]).reshape(-1)
    if out is None:
        return kv.reshape(B * S, W).index_select(0, flat).view(*idx.shape, W)
    rows = out.view(-1, W)[:flat.numel()]
    return torch.index_select(kv.reshape(B * S, W), 0, flat, out=rows).view(*idx.shape, W)


def attention_reference(q, kv, idx, valid, scale: float, v_dim: int, need_probs: bool = False, buffer=None):
    """(o (B, H, t, Dc), probs summed over heads (B, t, K) or None). valid None: every pick is a
    causal key (no mask to apply). buffer: reused storage for the gathered rows (inference)."""
    B, H, t, C = q.shape
    rows = gather_rows(kv, idx, buffer).view(B * t, -1, C)  # (B·t, K, Dc + Dr)
    scores = torch.bmm(q.transpose(1, 2).reshape(B * t, H, C), rows.transpose(1, 2)) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid.reshape(B * t, 1, -1), float("-inf"))
    probs = scores.float().softmax(dim=-1).type_as(rows)
    o = torch.bmm(probs, rows[..., :v_dim])  # V = the first Dc channels
    summed = probs.view(B, t, H, -1).sum(dim=2) if need_probs else None
    return o.view(B, t, H, -1).transpose(1, 2), summed


def attention_blocked(q, kv, idx, valid, scale: float, v_dim: int, need_probs: bool = False, buffer=None):
    """The reference QUERY_BLOCK queries at a time, through one buffer of QUERY_BLOCK·K rows (the
    front of `buffer` where given), reused only where no autograd graph keeps the rows."""
    B, t, K = idx.shape
    rows = B * min(t, QUERY_BLOCK) * K
    block = None
    if not choice.under_autograd(q, kv):
        block = buffer if buffer is not None and buffer.numel() >= rows * kv.shape[-1] else kv.new_empty(rows, kv.shape[-1])
    outs, probs = [], []
    for t0 in range(0, t, QUERY_BLOCK):
        sl = slice(t0, t0 + QUERY_BLOCK)
        o, p = attention_reference(q[:, :, sl], kv, idx[:, sl], None if valid is None else valid[:, sl], scale, v_dim, need_probs, block)
        outs.append(o)
        probs.append(p)
    return torch.cat(outs, dim=2), torch.cat(probs, dim=1) if need_probs else None


def _key(q, kv, idx, valid, scale, v_dim, need_probs=False, buffer=None) -> tuple:
    B, H, t, C = q.shape
    return (q.device.type, q.dtype, B, H, t, C, idx.shape[-1], valid is None, choice.under_autograd(q, kv))


def _blocked_runs(q, kv, *args, **kwargs) -> str | None:
    if choice.under_autograd(q, kv):
        return "under autograd kv's gradient would add up block by block, in another rounding than the reference's"
    return None


choice.register(choice.Family(
    name="dsa_attention",
    reference="reference",
    implementations={
        "reference": choice.Implementation("reference", attention_reference, note="gather every query's K latent rows, bmm, softmax, bmm"),
        "blocked": choice.Implementation("blocked", attention_blocked, _blocked_runs,
                                         note=f"the same, {QUERY_BLOCK} queries at a time through one cached buffer"),
    },
    key=_key,
    # Per query the same matmuls on the same rows: equal bits (forward only: blocked does not run under autograd).
    tolerance=0.0,
    compile_order=("reference",),
    output=lambda out: out[0],
    description="DSA main attention over each query's K gathered latent rows (MLA's MQA form)",
))

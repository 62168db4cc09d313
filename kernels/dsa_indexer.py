"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2-Exp): its scores and the top-k
selection, two op families (kernels/choice.py), each implementation beside the reference.

Legend: B batch, T queries, S keys, n index heads, D index head dim, K = index_topk.

dsa_index_scores: I(t, s) = Σ_j w_{t,j}·ReLU(q_{t,j}·k_s) (V3.2 eq. 1), q (B, n, T, D) and
k (B, S, D) fp32 (dequantised under fp8), w (B, T, n) → (B, T, S) fp32.
- reference: two batched matmuls over the whole context, (B, T·n, S) fp32 logits in between.
- blocked: the same two matmuls KEY_BLOCK keys at a time, so the logits of a block stay in
  the L2 cache between the matmul that writes them and the one that reads them. Each score is
  the same products summed over D and then n, never over S: with MKL on this CPU the
  reference's bits at n ≤ 8 for every S tested (the last block takes the ragged rest: a block of
  a few keys takes another kernel); at n = 64 MKL's M = 1 kernel peels columns by alignment and
  an n-sum may round one ulp apart, and auto (tolerance 0) then keeps the reference. A prefill
  chunk (T = 256) of 16K keys writes and reads 64 MiB of logits in the reference; blocked it is
  1.7× faster on a CPU. A decode step (T = 1) has 256 KiB of logits at 16K: the reference is
  faster there (one call instead of S/KEY_BLOCK).

dsa_topk: the top-K keys of each query under the causal mask, (indices (B, T, K) in ascending
position, valid (B, T, K)), ties at the K-th place to the lower positions (so a query selects
the same keys alone, decoding, as in a batch of queries, prefilling).
- reference: mask the future over the full (T, S) copy, topk for the K-th value, then the tie
  rule (a cumsum over the ties) and one nonzero: about ten passes over (T, S).
- threshold: the future is masked only where a query has one (no copy at all when decoding),
  the keys ≥ the K-th value are read off by one nonzero, and the tie rule runs only on the rows
  where ties straddle the K-th place (or where a score is NaN, all of them), on the same
  threshold: the reference's selection exactly, in 4 passes. ~2× faster than the reference
  decoding at 4K-16K keys, 1.1-1.9× on a prefill chunk of 256 queries over 16K keys (less where
  ReLU'd scores tie at 0 in many rows).
Neither fuses the two families: torch's topk needs the scores of a query's whole context first.
On a GPU DeepSeek's fp8_index kernel fuses the scores with the FP8 products; dsbench has no such
kernel yet (on a CPU torch._scaled_mm over the E4M3 keys is 4× dequantising them and an fp32 matmul).
"""

from __future__ import annotations

import torch

from . import choice

KEY_BLOCK = 512  # keys per block in `scores_blocked`: T·n·512·4 bytes = 2 MiB of logits at T = 256, n = 4


# ---------------------------------------------------------------------------------------------
# dsa_index_scores


def scores_reference(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Two batched matmuls in the (B, T, n, S) layout, so the (T·n·S) product is never transposed.
    buffer: reused storage of at least B·T·n·S fp32 for that product."""
    B, n, T, D = q.shape
    out = None if buffer is None else buffer[:B * T * n * k.shape[1]].view(B, T * n, k.shape[1])
    logits = torch.bmm(q.transpose(1, 2).reshape(B, T * n, D), k.transpose(1, 2), out=out).relu_()  # (B, T·n, S)
    return torch.bmm(w.reshape(B * T, 1, n), logits.view(B * T, n, -1)).view(B, T, -1)


def scores_blocked(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's two matmuls over KEY_BLOCK keys at a time (buffer: unused, for the same call)."""
    B, n, T, D = q.shape
    S = k.shape[1]
    q_rows = q.transpose(1, 2).reshape(B, T * n, D)  # (B, T·n, D)
    w_rows = w.reshape(B * T, 1, n)
    out = q.new_empty(B, T, S, dtype=torch.float32)
    starts = list(range(0, max(S - KEY_BLOCK, 0) + 1, KEY_BLOCK))  # the last block takes the ragged rest:
    for s0, s1 in zip(starts, [*starts[1:], S]):  # a block of a few keys takes another GEMM kernel, other bits
        logits = torch.bmm(q_rows, k[:, s0:s1].transpose(1, 2)).relu_()  # (B, T·n, s1 − s0)
        out[:, :, s0:s1] = torch.bmm(w_rows, logits.view(B * T, n, -1)).view(B, T, -1)
    return out


def _scores_key(q, w, k, buffer=None) -> tuple:
    B, n, T, D = q.shape
    return (q.device.type, q.dtype, B, n, T, D, _bucket(k.shape[1]), choice.under_autograd(q, w, k))


def _blocked_runs(q, w, k, buffer=None) -> str | None:
    if choice.under_autograd(q, w, k):
        return "under autograd q's gradient would add up block by block, in another rounding than the reference's"
    return None


choice.register(choice.Family(
    name="dsa_index_scores",
    reference="reference",
    implementations={
        "reference": choice.Implementation("reference", scores_reference, note="two bmm over every key, (B, T·n, S) fp32 logits"),
        "blocked": choice.Implementation("blocked", scores_blocked, _blocked_runs,
                                         note=f"the same two bmm {KEY_BLOCK} keys at a time (the logits stay in cache)"),
    },
    key=_scores_key,
    # The same products summed in the same order (blocks split S, the sums run over D and n): the
    # reference's bits where the GEMM library keeps its order per column (docstring), and auto
    # runs blocked nowhere else. Forward only: blocked does not run under autograd.
    tolerance=0.0,
    compile_order=("reference",),
    description="DSA lightning-indexer scores I(t,s) = Σ_j w_tj·ReLU(q_tj·k_s), fp32",
))


# ---------------------------------------------------------------------------------------------
# dsa_topk


def select_reference(scores: torch.Tensor, start_pos: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As DeepSeek's `index_score.topk(k)` after adding the mask: a query with fewer than K
    earlier keys gets masked picks, marked invalid. Equal scores at the K-th place go to the
    lower positions, which topk alone does not promise (FP8 scores tie often). One topk pass and
    a cumsum: O(S) per query, where a full sort is O(S log S)."""
    T, S = scores.shape[1], scores.shape[2]
    positions = torch.arange(S, device=scores.device)
    q_pos = torch.arange(start_pos, start_pos + T, device=scores.device)[:, None]
    masked = scores.masked_fill(positions[None, :] > q_pos, float("-inf"))
    threshold = masked.topk(K, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return _tie_rule(masked, threshold, q_pos, K)


def _tie_rule(masked: torch.Tensor, threshold: torch.Tensor, q_pos: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key above the K-th value, then the ties at it from the lowest position up to K."""
    B, T, S = masked.shape
    above, tie = masked > threshold, masked == threshold
    chosen = above | (tie & (tie.cumsum(dim=-1) <= K - above.sum(dim=-1, keepdim=True)))
    picks = chosen.nonzero()  # exactly K per query (fewer only where a score is NaN)
    if picks.shape[0] == B * T * K:
        idx = picks[:, -1].view(B, T, K)
    else:
        positions = torch.arange(S, device=masked.device)
        idx = torch.where(chosen, S - positions, 0).topk(K, dim=-1, sorted=False).indices
    return idx, idx <= q_pos


def select_threshold(scores: torch.Tensor, start_pos: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys at or above the K-th value, where that is exactly K of them in every row; the
    reference's tie rule on the same threshold otherwise."""
    B, T, S = scores.shape
    q_pos = torch.arange(start_pos, start_pos + T, device=scores.device)[:, None]
    masked = causal_masked(scores, start_pos, q_pos)
    threshold = masked.topk(K, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    chosen = masked >= threshold  # (B, T, S): more than K in a row only where ties straddle the K-th place
    if B * T > 1:  # (one row: its count is nonzero's, below)
        straddle = (chosen.sum(dim=-1) != K).nonzero(as_tuple=True)
        if straddle[0].numel():  # the tie rule on those rows alone (ReLU'd scores tie at 0 where every head is ≤ 0)
            rows, cut = masked[straddle], threshold[straddle]
            above, tie = rows > cut, rows == cut
            chosen[straddle] = above | (tie & (tie.cumsum(dim=-1) <= K - above.sum(dim=-1, keepdim=True)))
    picks = chosen.nonzero()
    if picks.shape[0] != B * T * K:
        return _tie_rule(masked, threshold, q_pos, K)
    idx = picks[:, -1].view(B, T, K)  # ascending position in each row
    return idx, idx <= q_pos


def causal_masked(scores: torch.Tensor, start_pos: int, q_pos: torch.Tensor) -> torch.Tensor:
    """scores with each query's future keys at -inf: only the keys after the first query's
    position can be in a query's future, so only those columns are masked (none decoding)."""
    S = scores.shape[-1]
    if start_pos >= S - 1:
        return scores
    masked = scores.clone()
    later = torch.arange(start_pos + 1, S, device=scores.device)
    masked[..., start_pos + 1:].masked_fill_(later[None, :] > q_pos, float("-inf"))
    return masked


def _topk_key(scores, start_pos, K) -> tuple:
    B, T, S = scores.shape
    return (scores.device.type, B, T, _bucket(S), K, start_pos >= S - 1)


choice.register(choice.Family(
    name="dsa_topk",
    reference="reference",
    implementations={
        "reference": choice.Implementation("reference", select_reference, note="full causal mask, topk, the tie rule by cumsum"),
        "threshold": choice.Implementation("threshold", select_threshold,
                                           note="mask only the future columns; the keys ≥ the K-th value by one nonzero; "
                                                "the tie rule only where ties straddle it"),
    },
    key=_topk_key,
    # A selection is right or wrong: the indices must be the reference's, all of them.
    tolerance=0.0,
    compile_order=("reference",),
    output=lambda out: out[0],
    description="DSA top-k: each query's K highest-scored causal keys, ties to the lower position, ascending",
))


def _bucket(n: int) -> int:
    """The power of two at or above n: a decode step's context grows by one key a step, and the
    pick need not be measured again for each."""
    return 1 << max(0, n - 1).bit_length()

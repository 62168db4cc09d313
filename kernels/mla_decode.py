"""MLA decode over the latent cache (FlashMLA-style): one new token per row, W^UK already folded
into the query (DeepSeek-V2 §2.1.2), attending over [c^KV | k^R] with c^KV also the value.

Legend: B batch, H heads, S cached tokens, Dc kv_lora_rank, Dr rope dim, P KV splits.

    out[b, h] = softmax_s(scale · q[b, h] · kv[b, s]) · kv[b, s, :Dc]        q (B, H, Dc + Dr)

Every head reads the same latent row, so one program serves a block of heads (the heads are the
rows of its matmuls) and the cache is read once per head block, not once per head. Long contexts
with few rows are split along S (flash-decoding, Dao et al. 2023): each of P programs per head
block keeps a running max and sum (online softmax) over its part; the P partial results are
merged with their log-sum-exp weights.

`mla_decode` is the entry point: Triton on CUDA, `reference` (plain PyTorch) elsewhere.
FLOPs: 2·B·H·S·(Dc + Dr) for the scores and 2·B·H·S·Dc for the weighted sum.
"""

from __future__ import annotations

import torch

from .triton_import import load as _load_triton

triton, tl = _load_triton()  # None off CUDA unless TRITON_INTERPRET=1


def reference(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """q (B, H, Dc + Dr), kv (B, S, Dc + Dr) → (B, H, Dc). Scores in q's dtype, softmax in fp32."""
    scores = (q * scale) @ kv.transpose(1, 2)  # (B, H, S)
    probs = scores.float().softmax(dim=-1).type_as(kv)
    return probs @ kv[:, :, :kv_lora_rank]  # (B, H, Dc)


def mla_decode(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    if q.is_cuda and triton is not None:
        return mla_decode_triton(q, kv, kv_lora_rank, scale)
    return reference(q, kv, kv_lora_rank, scale)


if triton is not None:

    @triton.jit
    def _mla_decode_kernel(
        Q, KV, O_part, LSE, S, H, split_len, scale,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_ob, stride_oh, stride_op, stride_lb, stride_lh,
        DC: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        b, head_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        c, r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
        h_ok, c_ok, r_ok = h < H, c < DC, r < DR
        q_row = Q + b * stride_qb + h[:, None] * stride_qh
        q_c = tl.load(q_row + c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)  # (BH, BC)
        q_r = tl.load(q_row + DC + r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # (BH, BR)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scores
        l = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp(score − m)
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, S)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            row = KV + b * stride_kb + n[:, None] * stride_ks
            k_c = tl.load(row + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)  # (BN, BC): key and value
            k_r = tl.load(row + DC + r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # (BN, BR)
            s = (tl.dot(q_c, tl.trans(k_c)) + tl.dot(q_r, tl.trans(k_r))) * scale  # (BH, BN) fp32
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(k_c.dtype), k_c)
            m = m_new
        out = O_part + b * stride_ob + h[:, None] * stride_oh + split * stride_op + c[None, :]
        tl.store(out, acc / l[:, None], mask=h_ok[:, None] & c_ok[None, :])
        tl.store(LSE + b * stride_lb + h * stride_lh + split, m + tl.log(l), mask=h_ok)


def _splits(S: int, programs: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(P, keys per split): enough programs to fill the device, every split non-empty."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, -(-2 * sms // programs))
    split_len = max(block_n, -(-S // want))
    split_len = -(-split_len // block_n) * block_n
    return -(-S // split_len), split_len


def mla_decode_triton(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int, scale: float, splits: int | None = None) -> torch.Tensor:
    """Launcher: checks shapes, allocates the partial results, launches, merges the splits."""
    B, H, D = q.shape
    S, Dc = kv.shape[1], kv_lora_rank
    if kv.shape != (B, S, D) or not 0 < Dc < D:
        raise ValueError(f"mla_decode: q {tuple(q.shape)} and kv {tuple(kv.shape)} need kv (B, S, Dc + Dr) with 0 < Dc={Dc} < {D}")
    if q.stride(-1) != 1 or kv.stride(-1) != 1 or q.dtype != kv.dtype:
        raise ValueError("mla_decode: q and kv need a contiguous last dim and one dtype")
    pow2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731 — tl.dot needs sides ≥ 16
    block_c, block_r = pow2(Dc), pow2(D - Dc)
    block_h = min(pow2(H), 16 if block_c >= 256 else 64)  # the fp32 accumulator is BH × BC
    block_n = 16 if block_c >= 256 else 32
    head_blocks = triton.cdiv(H, block_h)
    if splits is None:
        P, split_len = _splits(S, B * head_blocks, block_n, q.device)
    else:  # as asked, less any split that would be empty
        split_len = -(-S // splits)
        P = -(-S // split_len)
    o_part = torch.empty(B, H, P, Dc, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, P, dtype=torch.float32, device=q.device)
    _mla_decode_kernel[(B, head_blocks, P)](
        q, kv, o_part, lse, S, H, split_len, scale,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        DC=Dc, DR=D - Dc, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=block_r,
    )
    weights = torch.softmax(lse, dim=-1)  # (B, H, P): each split's share of the softmax mass
    return (o_part * weights[..., None]).sum(dim=2).to(q.dtype)  # (B, H, Dc)

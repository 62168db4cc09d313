"""MLA decode over the latent cache (FlashMLA-style): one new token per row, W^UK already folded
into the query (DeepSeek-V2 §2.1.2), attending over [c^KV | k^R] with c^KV also the value.

Legend: B batch, H heads, S cached tokens, Dc kv_lora_rank, Dr rope dim, D = Dc + Dr,
P KV splits, HB head blocks (programs that share one KV tile).

    out[b, h] = softmax_s(scale · q[b, h] · kv[b, s]) · kv[b, s, :Dc]        q (B, H, D)

Every head reads the same latent row: MQA with one D-wide key head whose first Dc channels are
also the value. So the heads are the rows of the kernel's matmuls (FlashMLA: 64 heads a CTA),
and the cache is read once per head block, not once per head; the sequence is split across
programs (flash-decoding, Dao et al. 2023): each keeps a running max and sum (online softmax)
over its part, and the P partial results are merged with their log-sum-exp weights.

Bytes read: B·S·D·element size (the cache) + B·H·D (the queries); FLOPs 2·B·H·S·(2·Dc + Dr).

The op family `mla_decode` (kernels/choice.py) has three implementations of the same math:
`reference` (two matmuls, softmax in fp32), `sdpa` (torch's scaled_dot_product_attention) and
`triton` (the kernel below). `mla_decode` is the older entry point: Triton on CUDA, the
reference elsewhere.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import choice

from .triton_import import load as _load_triton

triton, tl = _load_triton()  # None off CUDA unless TRITON_INTERPRET=1

# triton.jit builds an interpreted kernel only if TRITON_INTERPRET=1 when this file is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _check(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int) -> None:
    B, H, D = q.shape
    if kv.dim() != 3 or kv.shape[0] != B or kv.shape[2] != D or kv.shape[1] < 1 or not 0 < kv_lora_rank < D:
        raise ValueError(f"mla_decode: q {tuple(q.shape)} and kv {tuple(kv.shape)} need kv (B, S ≥ 1, Dc + Dr) "
                         f"with 0 < Dc={kv_lora_rank} < {D}")


# ---------------------------------------------------------------------------------------------
# References


def reference(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """q (B, H, Dc + Dr), kv (B, S, Dc + Dr) → (B, H, Dc). Scores in q's dtype, softmax in fp32."""
    scores = (q * scale) @ kv.transpose(1, 2)  # (B, H, S)
    probs = scores.float().softmax(dim=-1).type_as(kv)
    return probs @ kv[:, :, :kv_lora_rank]  # (B, H, Dc)


def sdpa(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """The same attention through F.scaled_dot_product_attention: MQA over the latent, one key
    head (the cache) and its first Dc channels the value. The H query heads become H query rows
    of that one head (no mask: each row sees every key), so torch's kernels read the cache once
    per row block instead of once per head, as `enable_gqa` would."""
    _check(q, kv, kv_lora_rank)
    rows = q.unsqueeze(1)  # (B, 1, H, D): H query rows, one head
    out = F.scaled_dot_product_attention(rows, kv.unsqueeze(1), kv[:, None, :, :kv_lora_rank], scale=scale)
    return out.squeeze(1)  # (B, H, Dc)


def mla_decode(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    if q.is_cuda and triton is not None:
        return mla_decode_triton(q, kv, kv_lora_rank, scale)
    return reference(q, kv, kv_lora_rank, scale)


# ---------------------------------------------------------------------------------------------
# Triton kernel and launcher

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e)

    @triton.jit
    def _operand(x, UPCAST: tl.constexpr):
        """A dot operand, in fp32 where UPCAST (the interpreter's tl.dot multiplies bf16's raw bits:
        numpy has no bf16). Products of bf16 or fp16 values are exact in fp32, and the GPU's MMA
        sums them in fp32 too: the same numbers up to summation order."""
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _mla_decode_kernel(
        Q, KV, O, LSE, S, H, split_len, scale,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_ob, stride_oh, stride_op, stride_lb, stride_lh,
        DC: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One program: BLOCK_H heads of batch row b over split `split` of its keys.

        The head block is the fastest grid axis: the HB programs that read the same KV tiles run
        side by side, so all but the first read of a tile come from L2. Scores contract all of
        Dc + Dr in two dots (tl.dot walks K in MMA steps itself); the fp32 value accumulator is
        BLOCK_H × Dc, which the MMA layout spreads over the warps (with 64 heads and 8 warps the
        two warpgroups each hold half of Dc's columns, FlashMLA's split).
        """
        head_block, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        c, r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
        h_ok, c_ok, r_ok = h < H, c < DC, r < DR
        q_row = Q + b * stride_qb + h[:, None] * stride_qh
        q_c = _operand(tl.load(q_row + c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0), UPCAST)  # (BH, BC)
        q_r = _operand(tl.load(q_row + DC + r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0), UPCAST)  # (BH, BR)
        qk_scale = scale * LOG2E
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scores (log2 units)
        l = tl.zeros([BLOCK_H], tl.float32)  # running sum of 2^(score − m)
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, S)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            row = KV + b * stride_kb + n[:, None] * stride_ks
            k_c = tl.load(row + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)  # (BN, BC): key and value
            k_r = tl.load(row + DC + r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # (BN, BR)
            k_c, k_r = _operand(k_c, UPCAST), _operand(k_r, UPCAST)
            s = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
            s = (s + tl.dot(q_r, tl.trans(k_r), input_precision=PRECISION)) * qk_scale  # (BH, BN) fp32
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(_operand(p.to(KV.dtype.element_ty), UPCAST), k_c, input_precision=PRECISION)
            m = m_new
        out = O + b * stride_ob + h[:, None] * stride_oh + split * stride_op + c[None, :]
        tl.store(out, (acc / l[:, None]).to(O.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])
        tl.store(LSE + b * stride_lb + h * stride_lh + split, (m + tl.log2(l)) / LOG2E, mask=h_ok)


# The config table: (BLOCK_N, num_warps, num_stages) candidates that Triton's autotuner times on a
# GPU, once per (H, Dc, Dr, dtype) and process; the row is picked by the accumulator's size.
# Shared memory of a wide candidate: q (64 × 576 bf16, 72 KiB) + num_stages KV tiles of
# BLOCK_N × 576 (36 KiB at 32 keys): (64, 8, 2) fits H100/H200's 227 KiB, not A100's 163 KiB
# (the autotuner then times it as infinite). Under TRITON_INTERPRET: one config, no timing.
GPU_CONFIGS = {
    "wide": ((32, 8, 2), (64, 8, 2), (32, 8, 3), (16, 8, 4), (64, 16, 2)),  # BLOCK_H·BLOCK_C ≥ 16K (V3: 64 × 512)
    "narrow": ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2)),
}
INTERPRET_CONFIG = (32, 4, 1)
ACC_ELEMENTS = 32 * 1024  # the fp32 accumulator's cap: 64 heads × 512 = 128 registers a thread at 8 warps
MAX_BLOCK_H = 128
SPLIT_ALIGN = 64  # splits start at multiples of the largest BLOCK_N: no tile straddles two
INTERPRETER_SMS = 4  # pretend SMs under the interpreter, so that the tests split S


@functools.cache
def _tuned(row: str):
    """The autotuned kernel of one row of the config table (the interpreter's single config)."""
    rows = (INTERPRET_CONFIG,) if INTERPRETED else GPU_CONFIGS[row]
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in rows]
    return triton.autotune(configs=configs, key=["H", "DC", "DR"])(_mla_decode_kernel)  # + every tensor's dtype


def _blocks(H: int, Dc: int, Dr: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_C, BLOCK_R): all heads in one program up to the accumulator's cap.

    tl.arange needs powers of two and tl.dot sides ≥ 16. V3 (H 128, Dc 512): BLOCK_H = 64, two
    head blocks, so each KV tile is read by 2 programs (the re-read factor is ⌈H / BLOCK_H⌉);
    they are neighbours in launch order, so the second read mostly hits L2.
    """
    pow2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731
    block_c = pow2(Dc)
    return min(pow2(H), MAX_BLOCK_H, max(16, ACC_ELEMENTS // block_c)), block_c, pow2(Dr)


def _split_overhead_tokens(block_h: int, Dc: int, row_bytes: int) -> int:
    """A split's extra traffic in cache rows: its partial (BLOCK_H × Dc fp32) written, then read
    by the merge (V3 bf16: 2·64·512·4 / 1152 ≈ 228 rows; FlashMLA's scheduler charges 5·64)."""
    return _cdiv(2 * block_h * Dc * 4, row_bytes)


def _splits(B: int, head_blocks: int, S: int, sms: int, overhead: int) -> tuple[int, int]:
    """(P, keys per split): the split count minimising waves × rows each program reads.

    Programs = B·HB·P, at most ~2× the SMs; with one wide program per SM (its shared memory),
    time ≈ waves × (split length + the split's overhead), a model for a GPU to check. V3 on 132
    SMs: B 1 at 16K → P 64 (128 programs, one wave), B 32 at 4K → P 2, B ≥ 64 → P 1 (a full
    wave already: splitting would only add traffic).
    """
    def split(p: int) -> tuple[int, int]:
        length = _cdiv(_cdiv(S, p), SPLIT_ALIGN) * SPLIT_ALIGN
        return _cdiv(S, length), length

    def cost(p: int) -> int:
        p, length = split(p)
        return _cdiv(B * head_blocks * p, sms) * (length + (overhead if p > 1 else 0))

    most = max(1, min(_cdiv(S, SPLIT_ALIGN), _cdiv(2 * sms, B * head_blocks)))
    return split(min(range(1, most + 1), key=lambda p: (cost(p), p)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots as exact as torch's fp32 matmul here (TF32 only where torch allows it too)."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


@dataclass(frozen=True)
class Plan:
    """How the launcher covers one call: blocks, the config table's row, the splits."""

    block_h: int
    block_c: int
    block_r: int
    head_blocks: int
    splits: int  # P
    split_len: int
    row: str  # of GPU_CONFIGS


def plan(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int, splits: int | None = None) -> Plan:
    """splits: P as asked (less any split that would be empty); None: `_splits`' choice."""
    (B, H, D), S, Dc = q.shape, kv.shape[1], kv_lora_rank
    block_h, block_c, block_r = _blocks(H, Dc, D - Dc)
    head_blocks = _cdiv(H, block_h)
    if splits is None:
        overhead = _split_overhead_tokens(block_h, Dc, D * kv.element_size())
        P, split_len = _splits(B, head_blocks, S, _sm_count(q.device), overhead)
    else:
        split_len = _cdiv(S, splits)
        P = _cdiv(S, split_len)
    row = "wide" if block_h * block_c >= 16 * 1024 else "narrow"
    return Plan(block_h, block_c, block_r, head_blocks, P, split_len, row)


def mla_decode_triton(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int, scale: float, splits: int | None = None) -> torch.Tensor:
    """Launcher: checks shapes, allocates the partial results, launches, merges the splits."""
    _check(q, kv, kv_lora_rank)
    if q.stride(-1) != 1 or kv.stride(-1) != 1 or q.dtype != kv.dtype:
        raise ValueError("mla_decode: q and kv need a contiguous last dim and one dtype")
    (B, H, D), S, Dc = q.shape, kv.shape[1], kv_lora_rank
    p = plan(q, kv, Dc, splits)
    # One split writes the output itself; several write fp32 partials for the merge.
    o = torch.empty(B, H, p.splits, Dc, dtype=q.dtype if p.splits == 1 else torch.float32, device=q.device)
    lse = torch.empty(B, H, p.splits, dtype=torch.float32, device=q.device)
    _tuned(p.row)[(p.head_blocks, p.splits, B)](
        q, kv, o, lse, S, H, p.split_len, scale,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        DC=Dc, DR=D - Dc, BLOCK_H=p.block_h, BLOCK_C=p.block_c, BLOCK_R=p.block_r, PRECISION=_precision(q.dtype),
        UPCAST=INTERPRETED and q.dtype != torch.float32,
    )
    if p.splits == 1:
        return o[:, :, 0]
    weights = torch.softmax(lse, dim=-1)  # (B, H, P): each split's share of the softmax mass
    return torch.einsum("bhp,bhpc->bhc", weights, o).to(q.dtype)  # (B, H, Dc)


# ---------------------------------------------------------------------------------------------
# The op family (kernels/choice.py): the same attention three ways.

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_runs(q, kv, kv_lora_rank, scale) -> str | None:
    if triton is None:  # not imported where no kernel can run (kernels/triton_import.py)
        return choice.triton_device_ok(q.device.type) or "triton is not installed"
    if q.device.type != "cuda" and not INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 was set after kernels/mla_decode.py was imported: its kernel is compiled for GPUs"
    if reason := choice.triton_device_ok(q.device.type):
        return reason
    if q.dtype != kv.dtype or q.dtype not in DTYPES:
        return f"q {q.dtype} and kv {kv.dtype}: the kernel needs one of fp32, bf16, fp16 for both"
    if q.stride(-1) != 1 or kv.stride(-1) != 1:
        return "q and kv need a contiguous last dim"
    return None


def _key(q, kv, kv_lora_rank, scale) -> tuple:
    """Decode grows S by one a step: S counts by its power-of-two bucket (one measurement each)."""
    B, H, D = q.shape
    return (q.device.type, B, H, 1 << (kv.shape[1] - 1).bit_length(), D, kv_lora_rank, q.dtype)


def _tolerance(q, kv, kv_lora_rank, scale) -> float:
    """RMS-relative error allowed against the reference, by dtype.

    fp32: only the summation order differs (blocks of keys, an online softmax, a log-sum-exp
    merge): observed < 1e-6, bound 1e-5 — unless torch's fp32 matmuls may use TF32 (precision
    not "highest"), where both sides round their inputs to 10 bits (2⁻¹¹): 5e-3.
    bf16/fp16: the reference rounds its scores, probabilities and output to the dtype (unit
    roundoff bf16 2⁻⁹ ≈ 2e-3, fp16 2⁻¹² ≈ 2.4e-4); sdpa and the kernel keep the scores in fp32.
    A score's rounding error is |score|·u and moves its probability by as much, so with scores
    of a few units the reference itself is off the fp64 result by a few u (observed on the test
    shapes: bf16 ≤ 7.5e-3, fp16 ≤ 1.0e-3) and the others, closer to fp64, differ from it by
    about as much (observed: bf16 ≤ 9e-3, fp16 ≤ 1.0e-3). Bounds: bf16 2e-2, fp16 3e-3. Far
    sharper scores make the reference's own rounding larger: auto then keeps the reference.
    """
    if q.dtype == torch.float32:
        return 1e-5 if torch.get_float32_matmul_precision() == "highest" else 5e-3
    return 3e-3 if q.dtype == torch.float16 else 2e-2


choice.register(choice.Family(
    name="mla_decode",
    reference="reference",
    implementations={
        "reference": choice.Implementation("reference", reference, note="two matmuls over the latent, softmax in fp32"),
        "sdpa": choice.Implementation("sdpa", sdpa, note="F.scaled_dot_product_attention, the H heads as rows of one key head"),
        "triton": choice.Implementation("triton", mla_decode_triton, _triton_runs, choice.triton_device_ok,
                                        note="dsbench's Triton kernel: 64 heads a program, split S, log-sum-exp merge"),
    },
    key=_key,
    tolerance=_tolerance,
    compile_order=("reference",),
    description="MLA absorbed decode: one query token per row over the latent cache [c^KV | k^R], value c^KV",
))

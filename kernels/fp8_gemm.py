"""Block-scaled FP8 GEMM with FP32 accumulation, C = A·Bᵀ (DeepSeek-V3 §3.3.2).

Legend: A (M, K), B (N, K), C (M, N); K is the contraction axis of both operands; G = 128.

Operands are E4M3 (from kernels/fp8_quant.py) with FP32 scales in groups of 128 along K:
- a_s (M, ⌈K/128⌉): A in 1×128 tiles (`act_quant`).
- b_s, by `b_group`:
    128 → (⌈N/128⌉, ⌈K/128⌉), B in 128×128 blocks (`weight_quant`): forward and dgrad;
    1   → (N, ⌈K/128⌉), B in 1×128 tiles (`act_quant`): wgrad, where both operands are
          activations or gradients tiled along the token axis.
Accumulation: each 128-wide slice of K is one MMA whose partial sum is multiplied by its two
scales and added to an FP32 accumulator. That is V3's "promotion to CUDA cores" every N_C = 128
elements (§3.3.2, Figure 7b): the scales are applied there anyway, and it bounds the error of
GPUs whose FP8 MMA accumulates in ~14 bits (Hopper).

Entry points: `fp8_gemm` (block-scaled; Triton on GPUs with FP8 tensor cores, the reference
elsewhere) and `tensorwise_gemm` (per-tensor scales; torch._scaled_mm on every device, which
in torch 2.13 runs on CPU too). `fp8_gemm_reference` dequantises both operands and multiplies
in FP32: products of E4M3 values are exact in FP32 and only the summation order differs from
the kernel. `blockwise_scaled_mm` computes the same sum as the kernel, literally: a loop of
torch._scaled_mm over K slices with row-wise scales (torch 2.13's CPU _scaled_mm has
tensor-wise and row-wise scaling but not 1×128/128×128 block scaling).
"""

from __future__ import annotations

import torch

from . import choice
from .fp8_quant import GROUP, dequant

from .triton_import import load as _load_triton

triton, tl = _load_triton()  # None off CUDA unless TRITON_INTERPRET=1


# ---------------------------------------------------------------------------------------------
# References


def _check(a, a_s, b, b_s, b_group: int) -> None:
    (M, K), (N, Kb) = a.shape, b.shape
    kg = -(-K // GROUP)
    b_rows = N if b_group == 1 else -(-N // GROUP)
    if Kb != K:
        raise ValueError(f"fp8 GEMM: A is {tuple(a.shape)} and B is {tuple(b.shape)}; both need K columns (C = A·Bᵀ)")
    if b_group not in (1, GROUP):
        raise ValueError(f"fp8 GEMM: b_group must be 1 (1×128 tiles) or {GROUP} (128×128 blocks), got {b_group}")
    if tuple(a_s.shape) != (M, kg) or tuple(b_s.shape) != (b_rows, kg):
        raise ValueError(f"fp8 GEMM: scales {tuple(a_s.shape)} / {tuple(b_s.shape)} do not fit A {tuple(a.shape)}, "
                         f"B {tuple(b.shape)} with b_group={b_group}; expected {(M, kg)} / {(b_rows, kg)}")


def fp8_gemm_reference(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32) -> torch.Tensor:
    """FP32 matmul of the dequantised operands."""
    _check(a, a_s, b, b_s, b_group)
    return (dequant(a, a_s, (1, GROUP)) @ dequant(b, b_s, (b_group, GROUP)).T).to(out_dtype)


def blockwise_scaled_mm(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32) -> torch.Tensor:
    """Σ over 128-wide K slices of torch._scaled_mm(A_k, B_kᵀ, row scales), accumulated in FP32."""
    _check(a, a_s, b, b_s, b_group)
    N = b.shape[0]
    b_s_rows = b_s.repeat_interleave(b_group, dim=0)[:N]  # (N, K/G): one scale per row of B
    acc = torch.zeros(a.shape[0], N, dtype=torch.float32, device=a.device)
    for kb in range(a_s.shape[1]):
        k = slice(kb * GROUP, (kb + 1) * GROUP)
        acc += torch._scaled_mm(a[:, k].contiguous(), b[:, k].contiguous().T, scale_a=a_s[:, kb : kb + 1].contiguous(),
                                scale_b=b_s_rows[:, kb][None, :].contiguous(), out_dtype=torch.float32)
    return acc.to(out_dtype)


def tensorwise_gemm(a, a_s, b, b_s, out_dtype=torch.float32) -> torch.Tensor:
    """C = (a·a_s)(b·b_s)ᵀ with one FP32 scale per operand, via torch._scaled_mm (FP32 accumulation).

    On CUDA, _scaled_mm needs FP8 tensor cores and dimensions divisible by 16; elsewhere the
    dequantised FP32 product is taken instead (the same numbers up to summation order).
    """
    if a.device.type == "cuda" and not (_has_fp8_tensor_cores(a.device) and all(d % 16 == 0 for d in (*a.shape, b.shape[0]))):
        return ((a.float() * a_s) @ (b.float() * b_s).T).to(out_dtype)
    b_col_major = b.contiguous().T  # (K, N), column-major as cuBLASLt wants
    return torch._scaled_mm(a.contiguous(), b_col_major, scale_a=a_s.float(), scale_b=b_s.float(), out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel and launcher

if triton is not None:

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                         stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                         stride_asm, stride_ask, stride_bsn, stride_bsk,
                         B_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program: a BLOCK_M×BLOCK_N tile of C; K walked in 128-wide slices (BLOCK_K = 128)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        in_m, in_n = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k = kb * BLOCK_K + offs_k
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                        mask=in_m[:, None] & (k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K) e4m3
            b = tl.load(b_ptr + offs_n[None, :] * stride_bn + k[:, None] * stride_bk,
                        mask=in_n[None, :] & (k[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_N) e4m3
            a_s = tl.load(as_ptr + offs_m * stride_asm + kb * stride_ask, mask=in_m, other=0.0)
            b_s = tl.load(bs_ptr + (offs_n // B_GROUP) * stride_bsn + kb * stride_bsk, mask=in_n, other=0.0)
            # One 128-deep MMA, then promotion: scale its partial sum and add it in FP32 (V3 Fig. 7b).
            acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def fp8_gemm_triton(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Launcher for `_fp8_gemm_kernel`; any strides (a transposed view is read in place)."""
    _check(a, a_s, b, b_s, b_group)
    M, N, K = a.shape[0], b.shape[0], a.shape[1]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_gemm_kernel[grid](a, b, c, a_s, b_s, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                           c.stride(0), c.stride(1), a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1),
                           B_GROUP=b_group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GROUP)
    return c


# ---------------------------------------------------------------------------------------------
# Entry point


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    """FP8 MMA exists from compute capability 8.9 (Ada) and 9.0 (Hopper) on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32) -> torch.Tensor:
    """Block-scaled C = A·Bᵀ: Triton where FP8 tensor cores exist, the FP32 reference elsewhere."""
    if triton is not None and _has_fp8_tensor_cores(a.device):
        return fp8_gemm_triton(a, a_s, b, b_s, b_group, out_dtype)
    return fp8_gemm_reference(a, a_s, b, b_s, b_group, out_dtype)


# ---------------------------------------------------------------------------------------------
# The op family (kernels/choice.py): every implementation computes the same block-scaled sum.


def _triton_runs(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32) -> str | None:
    if triton is None:  # not imported where no kernel can run (kernels/triton_import.py)
        return choice.triton_device_ok(a.device.type) or "triton is not installed"
    if a.device.type == "cuda" and not _has_fp8_tensor_cores(a.device):
        return "no FP8 tensor cores (compute capability < 8.9)"
    return choice.triton_device_ok(a.device.type)


def _scaled_mm_loop_runs(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32) -> str | None:
    if a.device.type == "cuda" and not (_has_fp8_tensor_cores(a.device) and a.shape[0] % 16 == 0 and b.shape[0] % 16 == 0):
        return "torch._scaled_mm on CUDA needs FP8 tensor cores and M, N divisible by 16"
    return None


def _key(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32) -> tuple:
    """M and K to the power of two at or above them, at least one 128 tile: a routed expert's
    rows (M forward and dgrad, K in wgrad) change every step, and within a factor of 2 (or one
    tile) the winner does not: one pick, not one measurement a step."""
    def bucket(n: int) -> int:
        return max(GROUP, 1 << max(n - 1, 0).bit_length())

    return (a.device.type, bucket(a.shape[0]), b.shape[0], bucket(a.shape[1]), b_group, out_dtype,
            a.stride(1) == 1, b.stride(1) == 1)


choice.register(choice.Family(
    name="fp8_gemm",
    reference="reference",
    implementations={
        "reference": choice.Implementation("reference", fp8_gemm_reference, note="dequantise both operands, FP32 matmul"),
        "scaled_mm_loop": choice.Implementation("scaled_mm_loop", blockwise_scaled_mm, _scaled_mm_loop_runs,
                                                note="torch._scaled_mm per 128-wide K slice, row-wise scales, FP32 sum"),
        "triton": choice.Implementation("triton", fp8_gemm_triton, _triton_runs, choice.triton_device_ok,
                                        note="dsbench's Triton kernel, DeepSeek kernel.py's recipe"),
    },
    key=_key,
    # Products of E4M3 values are exact in FP32; only the summation order differs, except that
    # Hopper's FP8 MMA accumulates in ~14 bits within each 128-wide slice (V3 §3.3.2): 2⁻¹⁰ covers it.
    tolerance=2.0 ** -10,
    compile_order=("reference",),
    description="block-scaled FP8 GEMM C = A·Bᵀ (1×128 activation tiles, 128×128 weight blocks), FP32 accumulation",
))

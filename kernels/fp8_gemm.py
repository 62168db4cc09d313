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

The block-scaled GEMM is the op family `fp8_gemm` (kernels/choice.py, registered at the bottom):
- `reference`: dequantises both operands and multiplies in FP32; products of E4M3 values are
  exact in FP32, so only the summation order differs from the others.
- `scaled_mm_loop`: the kernel's sum, literally: torch._scaled_mm per 128-wide K slice with
  row-wise scales (torch 2.13's CPU _scaled_mm has tensor-wise and row-wise scaling only).
- `triton`: our kernel (DeepSeek kernel.py's recipe, autotuned tiles, grouped tile order).
- `cublas`: cuBLASLt's own block-scaled GEMM through torch.nn.functional.scaled_mm (SM 9.0,
  CUDA ≥ 12.9); `cublas_scales` converts our scales to the layouts it reads.
`fp8_gemm` is a direct entry point (Triton on GPUs with FP8 tensor cores, the reference
elsewhere); `tensorwise_gemm` the per-tensor one (torch._scaled_mm on every device).
"""

from __future__ import annotations

import os

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
#
# One program computes a BLOCK_M×BLOCK_N tile of C, walking K in 128-wide slices (BLOCK_K = 128 =
# the scale group, so each slice's MMA has one scale per row of A and per column of B). Programs
# are numbered in groups of GROUP_M rows of tiles (Triton's matmul tutorial), so the tiles running
# at once share A's and B's slices in L2. Loads never need masks: out-of-range rows and columns
# of A and B are wrapped into range (offs % M) and only the store is masked, and only when M or N
# is not a multiple of the tile (EVEN_MN); K is zero-padded to a multiple of 128 by the launcher
# where it is not one (zeros add nothing to a sum, exactly as masked loads of zeros would), so the
# K loop has no mask at all. Scales are read M-major (the launcher transposes a_s), so a slice's
# BLOCK_M scales are one contiguous load.

def _gemm_configs() -> list:
    """GPU: tiles 64–256, 4 or 8 warps, 3–5 pipeline stages, picked per (M, N, K, b_group, dtypes)
    by triton.autotune. The interpreter (tests on a CPU): one small config, so no tuning runs."""
    if triton is None:
        return []
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [(128, 128, 8, 3), (128, 128, 4, 4), (128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3),
              (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 5), (128, 64, 4, 5), (64, 256, 8, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _prune_configs(configs, named_args, **kwargs) -> list:
    """Tiles no larger than the problem needs (decode: M of a few tokens), at least one config."""
    M, N = named_args["M"], named_args["N"]
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(M))
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(N))]
    return fits or configs[:1]


if triton is not None:

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                         stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                         stride_asm, stride_ask, stride_bsn, stride_bsk,
                         B_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, EVEN_MN: tl.constexpr):
        pid = tl.program_id(0)
        num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_pid_n  # programs per group of GROUP_M tile rows
        first_m = (pid // group_size) * GROUP_M
        rows_here = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_here
        pid_n = (pid % group_size) // rows_here

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_a = offs_m % M  # wrapped into range: loads need no mask, the store drops the extra rows
        cols_b = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
        b_ptrs = b_ptr + cols_b[None, :] * stride_bn + offs_k[:, None] * stride_bk  # (BLOCK_K, BLOCK_N)
        as_ptrs = as_ptr + rows_a * stride_asm  # (BLOCK_M,)
        bs_ptrs = bs_ptr + (cols_b // B_GROUP) * stride_bsn  # (BLOCK_N,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, K // BLOCK_K):  # K is a multiple of BLOCK_K (the launcher pads it)
            a = tl.load(a_ptrs)  # e4m3
            b = tl.load(b_ptrs)
            a_s = tl.load(as_ptrs + kb * stride_ask)
            b_s = tl.load(bs_ptrs + kb * stride_bsk)
            # One 128-deep MMA, then promotion: scale its partial sum and add it in FP32 (V3 Fig. 7b).
            acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        if EVEN_MN:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    _even_tiles = triton.heuristics({"EVEN_MN": lambda args: args["M"] % args["BLOCK_M"] == 0 and args["N"] % args["BLOCK_N"] == 0})
    _fp8_gemm_fixed = _even_tiles(_fp8_gemm_kernel)  # tile sizes given by the caller (tests)
    _fp8_gemm_tuned = triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "B_GROUP"],
                                      prune_configs_by={"early_config_prune": _prune_configs})(_even_tiles(_fp8_gemm_kernel))


def _pad_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (R, K) zero-padded to k columns (a copy), or x itself when K == k."""
    return x if x.shape[1] == k else torch.nn.functional.pad(x.view(torch.uint8), (0, k - x.shape[1])).view(x.dtype)


def fp8_gemm_triton(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32, block_m: int | None = None,
                    block_n: int | None = None) -> torch.Tensor:
    """Launcher for `_fp8_gemm_kernel`: any strides (a transposed view is read in place, unless K
    needs padding); autotuned tiles, or block_m × block_n where both are given."""
    _check(a, a_s, b, b_s, b_group)
    M, N, K = a.shape[0], b.shape[0], a.shape[1]
    k_full = a_s.shape[1] * GROUP
    a, b = _pad_k(a, k_full), _pad_k(b, k_full)
    a_s_km, b_s_km = a_s.t().contiguous(), b_s.t().contiguous()  # (K/G, M), (K/G, rows of b_s): M-major
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    args = (a, b, c, a_s_km, b_s_km, M, N, k_full, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), a_s_km.stride(1), a_s_km.stride(0), b_s_km.stride(1), b_s_km.stride(0))
    if block_m is not None and block_n is not None:
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        _fp8_gemm_fixed[grid](*args, B_GROUP=b_group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GROUP, GROUP_M=4)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _fp8_gemm_tuned[grid](*args, B_GROUP=b_group, BLOCK_K=GROUP)
    return c


# ---------------------------------------------------------------------------------------------
# cuBLASLt block scaling (torch.nn.functional.scaled_mm)
#
# cuBLASLt computes C = A·B with A (M, K) row-major and B (K, N) column-major (H100 takes only that
# "TN" layout), so our B (N, K) row-major is passed as its transpose. Its scale layouts (cuBLAS docs,
# "1D and 128x128 2D block scaling for FP8"; torch's ScaledBlas.cpp checks them; both modes need
# SM 9.0 and cuBLASLt >= 12.9):
# - A in 1×128 tiles (VEC128_32F): a (M, ⌈K/128⌉) tensor, outer-dim-major: the scale of tile
#   (m, j) at offset m + j·M (strides (1, M)).
# - B in 1×128 tiles (Wgrad): the same for B's rows: (N, ⌈K/128⌉), tile (n, j) at n + j·N.
# - B in 128×128 blocks (BLK128x128_32F): a (L4, ⌈N/128⌉) tensor, L4 = ⌈K/128⌉ rounded up to a
#   multiple of 4 (16-byte rows), K-block-major: block (j, nb) at offset j + nb·L4 (strides (1, L4));
#   its rows ⌈K/128⌉..L4 are padding (zeros: they scale no element).
# Both pairs used here are in torch's list of cuBLASLt block-scaled GEMMs: 1×128·128×128 (Fprop,
# Dgrad) and 1×128·1×128 (Wgrad: both operands tiled along tokens); the third, 128×128·1×128, is
# never needed (A is always an activation or a gradient).


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def cublas_scales(a_s: torch.Tensor, b_s: torch.Tensor, b_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our scales → cuBLASLt's layouts (above): a_s (M, ⌈K/128⌉) any strides → (M, ⌈K/128⌉) strides
    (1, M); b_s (⌈N/128⌉, ⌈K/128⌉) → (L4, ⌈N/128⌉) strides (1, L4) zero-padded, or with b_group 1
    b_s (N, ⌈K/128⌉) → (N, ⌈K/128⌉) strides (1, N). Plain torch, any device."""
    sa = a_s.float().t().contiguous().t()
    if b_group == 1:
        return sa, b_s.float().t().contiguous().t()
    kg = b_s.shape[1]
    sb = torch.nn.functional.pad(b_s.float(), (0, round_up(kg, 4) - kg)).contiguous().t()  # storage (N/G, L4)
    return sa, sb


def fp8_gemm_cublas(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32) -> torch.Tensor:
    """C = A·Bᵀ by cuBLASLt's block-scaled FP8 GEMM (torch.nn.functional.scaled_mm): A in 1×128 tiles,
    B in 128×128 blocks (b_group 128) or 1×128 tiles (1)."""
    _check(a, a_s, b, b_s, b_group)
    F = torch.nn.functional
    sa, sb = cublas_scales(a_s, b_s, b_group)
    recipe_b = F.ScalingType.BlockWise128x128 if b_group == GROUP else F.ScalingType.BlockWise1x128
    return F.scaled_mm(a.contiguous(), b.contiguous().T, sa, F.ScalingType.BlockWise1x128, sb, recipe_b,
                       output_dtype=out_dtype)


def _cuda_version() -> tuple[int, ...]:
    return tuple(int(p) for p in (torch.version.cuda or "0").split(".")[:2])


def _cublas_runs(a, a_s, b, b_s, b_group: int, out_dtype=torch.float32) -> str | None:
    """Where torch's block-scaled cuBLASLt GEMM runs (ScaledBlas.cpp's checks and torch 2.13's own)."""
    M, N, K = a.shape[0], b.shape[0], a.shape[1]
    if a.device.type != "cuda":
        return "cuBLASLt runs on CUDA devices only"
    if not hasattr(torch.nn.functional, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (block scaling needs torch ≥ 2.10)"
    if torch.version.hip:
        return "ROCm: torch's 1×128 / 128×128 block scaling is CUDA-only"
    if torch.cuda.get_device_capability(a.device)[0] != 9:
        return "torch's DeepSeek-style block scaling is implemented for SM 9.x (Hopper) only"
    if _cuda_version() < (12, 9):
        return f"cuBLASLt block scaling needs CUDA ≥ 12.9, torch has {torch.version.cuda}"
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        return f"operands must be float8_e4m3fn, got {a.dtype} and {b.dtype}"
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"output dtype {out_dtype}: cuBLASLt writes bf16, fp16 or fp32 here"
    if K % GROUP:
        return f"K = {K} is not a multiple of 128 (torch 2.13 sizes the scales K // 128; ragged K-groups unsupported)"
    if b_group == GROUP and N % GROUP:
        return f"N = {N} is not a multiple of 128 (torch 2.13 sizes 128×128 scales N // 128)"
    if N % 16:
        return f"N = {N} is not a multiple of 16 (cuBLASLt FP8: B's leading dimensions)"
    if M % 16:
        return f"M = {M} is not a multiple of 16 (unverified whether cuBLASLt needs it for M-major scales; refused to be safe)"
    return None


def _cublas_device_ok(device: str) -> str | None:
    return None if device == "cuda" else "cuBLASLt runs on CUDA devices only"


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
                                        note="dsbench's Triton kernel, DeepSeek kernel.py's recipe, autotuned tiles"),
        "cublas": choice.Implementation("cublas", fp8_gemm_cublas, _cublas_runs, _cublas_device_ok,
                                        note="cuBLASLt block scaling via torch.nn.functional.scaled_mm (SM 9.0, CUDA ≥ 12.9)"),
    },
    key=_key,
    # Products of E4M3 values are exact in FP32; only the summation order differs, except that
    # Hopper's FP8 MMA accumulates in ~14 bits within each 128-wide slice (V3 §3.3.2): 2⁻¹⁰ covers it
    # (cuBLASLt's block-scaled kernels promote per 128-wide slice as well: they apply the scales there).
    tolerance=2.0 ** -10,
    compile_order=("reference",),
    description="block-scaled FP8 GEMM C = A·Bᵀ (1×128 activation tiles, 128×128 weight blocks), FP32 accumulation",
))

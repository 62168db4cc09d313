"""FP8 (E4M3) quantisation with fine-grained scales, as DeepSeek-V3 §3.3.2 trains with.

Legend: R rows, C columns of the 2-D tensor being quantised; G = 128, the group size.

Three recipes, one scale rule. A group's scale is s = max(amax, AMAX_FLOOR) / 448 (FP32), its
elements become round_e4m3(clamp(x / s, ±448)), and x ≈ q·s:
- `act_quant`     1×128 tiles: one scale per row per 128 columns, scales (R, ⌈C/128⌉).
                  V3 §3.3.2 "per token per 128 channels" for activations (and, here, for
                  activation gradients and the transposed operands of the weight gradient).
- `weight_quant`  128×128 blocks: scales (⌈R/128⌉, ⌈C/128⌉) (V3 §3.3.2, weights).
- `tensor_quant`  one scale for the whole tensor (per-tensor dynamic scaling, the common
                  default elsewhere), a 0-dim scale.
Shapes that are not multiples of 128: the last tile along an axis is ragged and its amax
is taken over the elements that exist — the same as zero padding, since zeros never raise an
amax. Nothing is rejected.
An all-zero group: the amax floor (1e-12) keeps its scale positive, so its elements quantise
to zeros instead of 0/0.
Non-finite input (inf or NaN) anywhere in a group makes that group's scale NaN and its
elements NaN, so everything computed from it is NaN too — never finite garbage;
`check_finite=True` (the default) raises `NonFiniteError` naming the first bad group.

Each quantiser has a Triton kernel with its launcher, a plain-PyTorch `*_reference`, and an
entry point that runs Triton on CUDA and the reference elsewhere. The Triton kernels write the
E4M3 bit pattern themselves (`_e4m3_code`, integer arithmetic on FP32 bits) instead of
casting to tl.float8e4nv: Triton 3.9's interpreter casts FP32→FP8 without carrying a rounded-up
mantissa into the exponent (127.9 becomes 64, not 128), rounds ties away from zero and turns
NaN into 384, so a cast would not match the reference; the integer encoding is round to nearest
even on every backend and matches torch's cast bit for bit.
"""

from __future__ import annotations

import torch

from .triton_import import load as _load_triton

triton, tl = _load_triton()  # None off CUDA unless TRITON_INTERPRET=1

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
GROUP = 128  # V3's tile width and block side
AMAX_FLOOR = 1e-12  # keeps an all-zero group's scale positive


class NonFiniteError(ValueError):
    """An FP8 quantiser was given inf or NaN."""


# ---------------------------------------------------------------------------------------------
# References (plain PyTorch)


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """FP32 scale per group; NaN where the group's amax is not finite (inf or NaN input)."""
    amax = amax.float()
    scale = torch.clamp(amax, min=AMAX_FLOOR) / FP8_MAX
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def _to_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    """FP32 values already divided by their scale (a fresh tensor, clamped in place) → E4M3,
    round to nearest even (torch's cast)."""
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if (rows, cols) == tuple(x.shape):
        return x
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def act_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) → q (R, C) E4M3, s (R, ⌈C/128⌉) FP32: one scale per row per 128 columns."""
    R, C = x.shape
    n_groups = -(-C // GROUP)
    tiles = _pad_to(x.float(), R, n_groups * GROUP).reshape(R, n_groups, GROUP)  # (R, C/G, G)
    scale = _scale_from_amax(tiles.abs().amax(dim=-1))  # (R, C/G); amax propagates NaN
    q = _to_e4m3(torch.div(tiles, scale[..., None]))
    return q.view(R, n_groups * GROUP)[:, :C].contiguous(), scale


def weight_quant_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) → q (R, C) E4M3, s (⌈R/128⌉, ⌈C/128⌉) FP32: one scale per 128×128 block."""
    R, C = w.shape
    nr, nc = -(-R // GROUP), -(-C // GROUP)
    blocks = _pad_to(w.float(), nr * GROUP, nc * GROUP).view(nr, GROUP, nc, GROUP)
    scale = _scale_from_amax(blocks.abs().amax(dim=(1, 3)))  # (R/G, C/G)
    q = _to_e4m3(torch.div(blocks, scale[:, None, :, None]))
    return q.view(nr * GROUP, nc * GROUP)[:R, :C].contiguous(), scale


def tensor_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) → q (same shape) E4M3, s () FP32: one dynamic scale for the whole tensor."""
    scale = _scale_from_amax(x.abs().amax() if x.numel() else x.new_zeros(()))
    return _to_e4m3(torch.div(x.float(), scale)), scale


# Every E4M3 bit pattern's value: torch 2.13 converts FP8 to FP32 on CPUs one element at a time
# (~4 ns each); looking the 256 values up is about 8× faster there.
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()


def to_float(q: torch.Tensor) -> torch.Tensor:
    """E4M3 (or any float) → FP32 (exact)."""
    if q.device.type != "cpu" or q.dtype != FP8_DTYPE:
        return q.float()
    codes = q.view(torch.uint8).reshape(-1).int()
    return _E4M3_VALUES.index_select(0, codes).view(q.shape)


def dequant(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """FP32 q·s. block: (1, 128) for act_quant's scales, (128, 128) for weight_quant's, None for a
    per-tensor scale."""
    x = to_float(q)
    if block is None:
        return x.mul_(scale)
    R, C = q.shape
    rows = scale if block[0] == 1 else scale.repeat_interleave(block[0], dim=0)[:R]  # (R, ⌈C/G⌉)
    full = (C // block[1]) * block[1]  # whole groups, then the ragged tail
    x[:, :full].view(R, C // block[1], block[1]).mul_(rows[:, : C // block[1], None])
    if full < C:
        x[:, full:].mul_(rows[:, -1:])
    return x


# ---------------------------------------------------------------------------------------------
# Triton kernels and launchers

if triton is not None:

    @triton.jit
    def _e4m3_code(v):
        """FP32 v → the E4M3 bit pattern (int32 in 0..255) of round-to-nearest-even(v).

        |v| is clamped to 448. With e = max(⌊log2|v|⌋, −6) (E4M3 subnormals share the step of the
        2^-6 binade), n = RNE(|v|·2^(3−e)) is an integer in [0, 16] and the code is (e+6)·8 + n:
        n < 8 only when e = −6 (a subnormal, exponent field 0); n = 16 carries into the next
        binade. All multiplications are by powers of two, so exact.
        """
        a = tl.minimum(tl.abs(v), 448.0)
        bits = a.to(tl.int32, bitcast=True)
        e = tl.maximum((bits >> 23) - 127, -6)
        up_scale = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3−e)
        q = a * up_scale  # in [0, 16)
        n = q.to(tl.int32)  # floor (q ≥ 0)
        frac = q - n.to(tl.float32)
        n += ((frac > 0.5) | ((frac == 0.5) & ((n & 1) == 1))).to(tl.int32)  # ties to even
        code = (e + 6) * 8 + n
        negative = v.to(tl.int32, bitcast=True) < 0  # sign bit, so −0 stays −0 as in torch
        code = tl.where(negative, code + 128, code)
        return tl.where(v != v, 127, code)  # NaN → 0x7F

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_xr, stride_xc, n_groups,
                          BLOCK_R: tl.constexpr, G: tl.constexpr):
        """One program: BLOCK_R rows × one group of G columns; one scale per row."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * G + tl.arange(0, G)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
        x = x.to(tl.float32)
        nonfinite = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) > 0  # (BLOCK_R,)
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
        s = tl.where(nonfinite, float("nan"), s)
        code = _e4m3_code(tl.math.div_rn(x, s[:, None]))
        code = tl.where(nonfinite[:, None], 127, code)
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], code.to(tl.uint8), mask=mask)
        tl.store(s_ptr + rows * n_groups + tl.program_id(1), s, mask=rows < R)

    @triton.jit
    def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, R, C, stride_wr, stride_wc, n_col_blocks, G: tl.constexpr):
        """One program: one G×G block, one scale."""
        rows = tl.program_id(0) * G + tl.arange(0, G)
        cols = tl.program_id(1) * G + tl.arange(0, G)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        w = tl.load(w_ptr + rows[:, None] * stride_wr + cols[None, :] * stride_wc, mask=mask, other=0.0)
        w = w.to(tl.float32)
        nonfinite = tl.sum(((w != w) | (tl.abs(w) == float("inf"))).to(tl.int32)) > 0
        amax = tl.max(tl.abs(w))
        s = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
        s = tl.where(nonfinite, float("nan"), s)
        code = _e4m3_code(tl.math.div_rn(w, s))
        code = tl.where(nonfinite, 127, code)
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], code.to(tl.uint8), mask=mask)
        tl.store(s_ptr + tl.program_id(0) * n_col_blocks + tl.program_id(1), s)


def act_quant_triton(x: torch.Tensor, block_rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher for `_act_quant_kernel`: x (R, C), any strides (a transposed view is read in place)."""
    _check_2d(x)
    R, C = x.shape
    n_groups = triton.cdiv(C, GROUP)
    q = torch.empty((R, C), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((R, n_groups), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(R, block_rows), n_groups)
    _act_quant_kernel[grid](x, q.view(torch.uint8), s, R, C, x.stride(0), x.stride(1), n_groups, BLOCK_R=block_rows, G=GROUP)
    return q, s


def weight_quant_triton(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher for `_weight_quant_kernel`: w (R, C), any strides."""
    _check_2d(w)
    R, C = w.shape
    n_rb, n_cb = triton.cdiv(R, GROUP), triton.cdiv(C, GROUP)
    q = torch.empty((R, C), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((n_rb, n_cb), dtype=torch.float32, device=w.device)
    _weight_quant_kernel[(n_rb, n_cb)](w, q.view(torch.uint8), s, R, C, w.stride(0), w.stride(1), n_cb, G=GROUP)
    return q, s


def _check_2d(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"fp8 quantisation expects a 2-D tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"fp8 quantisation expects a floating-point tensor, got {x.dtype}")


# ---------------------------------------------------------------------------------------------
# Entry points: Triton on CUDA, the reference elsewhere


def use_triton(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def act_quant(x: torch.Tensor, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """1×128 tiles along the last axis of a 2-D x → (q E4M3 (R, C), s FP32 (R, ⌈C/128⌉))."""
    _check_2d(x)
    C = x.shape[1]
    q, s = act_quant_triton(x) if use_triton(x.device) else act_quant_reference(x)
    if check_finite:
        _raise_if_nonfinite(s, lambda r, g: f"the 1×128 tile at row {r}, columns {g * GROUP}–{min(C, (g + 1) * GROUP) - 1}")
    return q, s


def weight_quant(w: torch.Tensor, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128 blocks of a 2-D w → (q E4M3 (R, C), s FP32 (⌈R/128⌉, ⌈C/128⌉))."""
    _check_2d(w)
    R, C = w.shape
    q, s = weight_quant_triton(w) if use_triton(w.device) else weight_quant_reference(w)
    if check_finite:
        _raise_if_nonfinite(s, lambda i, j: (f"the 128×128 block at rows {i * GROUP}–{min(R, (i + 1) * GROUP) - 1}, "
                                            f"columns {j * GROUP}–{min(C, (j + 1) * GROUP) - 1}"))
    return q, s


def tensor_quant(x: torch.Tensor, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One dynamic scale for all of x → (q E4M3, s FP32 0-dim). Plain torch on every device."""
    q, s = tensor_quant_reference(x)
    if check_finite:
        _raise_if_nonfinite(s.view(1, 1), lambda i, j: f"a tensor of shape {tuple(x.shape)}")
    return q, s


def _raise_if_nonfinite(scale: torch.Tensor, where) -> None:
    """Reads the scales (small: one per 128 or 128² elements); on a GPU this synchronises.
    where(i, j) names the group at scale index (i, j)."""
    bad = torch.isnan(scale)
    if bad.any():
        i, j = torch.nonzero(bad)[0].tolist()
        raise NonFiniteError(f"fp8 quantisation: input contains inf or NaN (first in {where(i, j)})")

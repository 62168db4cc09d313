"""FP8 linear layers: DeepSeek-V3's fine-grained recipe (V3 §3.3) and per-tensor scaling.

Legend: M tokens (batch × sequence, flattened), K input features, N output features.

`Fp8Linear` is an nn.Linear — same FP32 master weight, init and state dict — whose three
GEMMs run on E4M3 operands with FP32 accumulation (V3 §3.3.1, Figure 6). Which operand is
scaled along which axis (every scale group lies along the GEMM's contraction axis):

  GEMM    computes              A, scaled along the contraction axis     B
  Fprop   Y  = X·Wᵀ    (M, N)   X:   1×128 tiles (a token × 128 channels)  W:  128×128 blocks
  Dgrad   dX = dY·W    (M, K)   dY:  1×128 tiles (a token × 128 outputs)   Wᵀ: the same blocks, transposed
  Wgrad   dW = dYᵀ·X   (N, K)   dYᵀ: 1×128 tiles along tokens              Xᵀ: 1×128 tiles along tokens
                                (128×1 tiles of dY)                          (128×1 tiles of X)

Wgrad contracts over tokens, so both its operands are tiled along the token axis. As in V3,
the forward keeps only X's FP8 tiles and scales for the backward (§3.3.3, activations cached in
FP8), and the backward dequantises them and re-quantises along tokens (§3.5.2, "Support for
Transposed GEMM Operations": read out, dequantise, transpose, re-quantise into 128×1 tiles). dY
is quantised twice from its high-precision values, once per tiling.

Recipe `tensorwise`: one dynamic scale per tensor for X, W and dY (the common default
elsewhere), same E4M3 format, so the only difference from `blockwise` is the scale granularity;
one scale does not depend on the axis, so X's and dY's FP8 copies serve every GEMM unchanged.

What stays in higher precision (V3 §3.3.1): the FP32 master weights and optimizer states (V3
keeps AdamW's moments in BF16, §3.3.3; here they stay FP32), and everything that is not an FP8
GEMM — embedding, output head, norms, attention core (SDPA), MoE gate — which runs under BF16
autocast. Not reproduced: V3's E5M6 / power-of-two-scale special cases for a few activations
(§3.3.3). `fp8_grouped_mm` is the same recipe for MoE experts' grouped GEMM. GEMM outputs are BF16 under autocast (V3: "outputs
in BF16 or FP32"), else the input's dtype. Weight gradients are FP32, for the master weights.
Non-finite input is not checked here (that would synchronise a GPU every layer): a NaN scale
makes the outputs NaN, the loss turns NaN and the cell ends `diverged`.

Under torch.compile the linear and the grouped GEMM are opaque custom ops (`dsbench::fp8_linear`,
`dsbench::fp8_grouped_mm`, each with a backward op): dynamo traces them without a graph break
and inductor never compiles their insides. Eager runs the same functions through
autograd.Functions. While a QuantisationProbe is attached they run eager under compile too (a
graph break: the probe reads values on the host).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .eager import eager_under_compile
from .profiling import part

RECIPES = ("blockwise", "tensorwise")
_BF16_BYTES = 2  # what a BF16 autocast linear keeps of its input for the weight gradient


def _kernels():
    """The kernel modules, imported on first use: importing triton costs every cell's startup."""
    from dsbench.kernels import fp8_gemm, fp8_quant

    return fp8_quant, fp8_gemm


class Quantised(NamedTuple):
    """E4M3 values and their FP32 scales; block is the scale group ((1, 128), (128, 128)) or None
    for one scale per tensor."""

    q: torch.Tensor
    s: torch.Tensor
    block: tuple[int, int] | None

    def dequant(self) -> torch.Tensor:
        return _kernels()[0].dequant(self.q, self.s, self.block)

    @property
    def t(self) -> Quantised:
        """The transpose, for a scheme whose groups do not care about the axis (128×128, tensor)."""
        if self.block is not None and self.block[0] != self.block[1]:
            raise ValueError(f"{self.block[0]}×{self.block[1]} tiles cannot be transposed; re-quantise instead")
        block = None if self.block is None else self.block[::-1]
        return Quantised(self.q.T, self.s if self.block is None else self.s.T, block)

    def rows(self, start: int, end: int) -> Quantised:
        """Rows start:end of a row-tiled (1×128) or per-tensor quantised matrix."""
        if self.block is not None and self.block[0] != 1:
            raise ValueError(f"rows of {self.block[0]}×{self.block[1]} blocks cannot be cut at any row")
        return Quantised(self.q[start:end], self.s if self.block is None else self.s[start:end], self.block)

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.s.numel() * self.s.element_size()


# --- the two recipes: how each operand is quantised, and each GEMM ---


def quantise(x: torch.Tensor, recipe: str, role: str) -> Quantised:
    """x (R, C) quantised for `role` "act" (1×128 tiles along C) or "weight" (128×128 blocks)."""
    fq = _kernels()[0]
    with part("fp8_quant"):
        if recipe == "tensorwise":
            return Quantised(*fq.tensor_quant(x, check_finite=False), None)
        if role == "act":
            return Quantised(*fq.act_quant(x, check_finite=False), (1, fq.GROUP))
        return Quantised(*fq.weight_quant(x, check_finite=False), (fq.GROUP, fq.GROUP))


def gemm(a: Quantised, b: Quantised, out_dtype: torch.dtype) -> torch.Tensor:
    """C = A·Bᵀ in FP32 accumulation: block-scaled, or per-tensor via torch._scaled_mm."""
    fg = _kernels()[1]
    if a.block is None:
        return fg.tensorwise_gemm(a.q, a.s, b.q, b.s, out_dtype)
    from dsbench.kernels import choice  # the implementation: auto's pick, or the cell's kernels.fp8_gemm

    return choice.run("fp8_gemm", a.q, a.s, b.q, b.s, b.block[0], out_dtype)


def sqnr_db(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio 10·log10(Σx² / Σ(x − x̂)²) in dB; inf when exact."""
    exact, approx = exact.double(), approx.double()
    noise = (exact - approx).pow(2).sum().item()
    signal = exact.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


# --- the three GEMMs of a linear: plain functions that eager's autograd.Function and compile's
# custom ops (below) share, so both compute the same numbers ---


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM outputs' dtype: autocast's (BF16) where it is on, else the input's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _linear_forward(x_MK, w8: Quantised, recipe: str, out_dtype) -> tuple[torch.Tensor, Quantised]:
    """Fprop: Y (M, N) = X·Wᵀ, and X's FP8 tiles, the only copy of X kept for the backward (V3 §3.3.3)."""
    with torch.autocast(x_MK.device.type, enabled=False):
        x8 = quantise(x_MK, recipe, "act")
        return gemm(x8, w8, out_dtype), x8


def _linear_backward(dy_MN, x8: Quantised, w8: Quantised, recipe: str, x_dtype, w_dtype, need_dx: bool, need_dw: bool):
    """Dgrad dX (M, K) = dY·W and Wgrad dW (N, K) = dYᵀ·X (None where not needed); and dY's tiles."""
    with torch.autocast(dy_MN.device.type, enabled=False):
        dy8 = quantise(dy_MN, recipe, "act")
        dx = gemm(dy8, w8.t, x_dtype) if need_dx else None
        dw = None
        if need_dw:
            dyT8, xT8 = _wgrad_operands(dy_MN, dy8, x8, recipe)
            dw = gemm(dyT8, xT8, torch.float32).to(w_dtype)  # FP32 for FP32 master weights
    return dx, dw, dy8


def _wgrad_operands(dy_MN, dy8: Quantised, x8: Quantised, recipe: str) -> tuple[Quantised, Quantised]:
    """dYᵀ (N, M) and Xᵀ (K, M), both scaled along M, the token axis that Wgrad contracts."""
    if recipe == "tensorwise":
        return dy8.t, x8.t  # one scale per tensor: the forward's FP8 copies serve as they are
    dyT8 = quantise(dy_MN.T, recipe, "act")  # 1×128 along tokens, from the high-precision dY
    xT8 = quantise(x8.dequant().T, recipe, "act")  # X's cached FP8 tiles, re-tiled along tokens
    return dyT8, xT8


def _cached_on(w: torch.Tensor, recipe: str, kind: str, make):
    """make(w) cached on the tensor itself, made again only when w changed: keyed on its version
    (each optimizer step bumps it), storage, layout and the recipe. On the tensor, not the module:
    the compiled path's custom ops see only tensors (serving quantises once, as V3's FP8
    checkpoints are; training once a step)."""
    key = (w._version, w.data_ptr(), w.dtype, tuple(w.shape), w.stride(), recipe)
    cached = w.__dict__.get(kind)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, make(w.detach()))
        setattr(w, kind, cached)
    return cached[1]


def weight_blocks(w_NK: torch.Tensor, recipe: str) -> Quantised:
    """A linear's weight (N, K) in FP8: 128×128 blocks, or one scale (tensorwise)."""
    return _cached_on(w_NK, recipe, "_dsbench_fp8", lambda w: quantise(w, recipe, "weight"))


def expert_blocks(w_EKN: torch.Tensor, recipe: str) -> list[Quantised]:
    """Each expert's weight, as a linear's (N, K), in FP8."""
    return _cached_on(w_EKN, recipe, "_dsbench_fp8_experts",
                      lambda w: [quantise(w[e].T, recipe, "weight") for e in range(w.shape[0])])


class _Fp8LinearFn(torch.autograd.Function):
    """Y = X·Wᵀ with Fprop, Dgrad and Wgrad in FP8 (table in the module docstring); eager."""

    @staticmethod
    def forward(ctx, x, weight, w8: Quantised, recipe: str, probe):
        x_MK = x.reshape(-1, x.shape[-1])
        y_MN, x8 = _linear_forward(x_MK, w8, recipe, _out_dtype(x))
        ctx.save_for_backward(x8.q, x8.s, w8.q, w8.s)
        ctx.meta = (x8.block, w8.block, recipe, probe, x.shape, x.dtype, weight.dtype)
        if probe is not None:
            probe.record_forward(x_MK, x8, weight, w8.dequant())
        return y_MN.view(*x.shape[:-1], y_MN.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        x_block, w_block, recipe, probe, x_shape, x_dtype, w_dtype = ctx.meta
        dy_MN = dy.reshape(-1, dy.shape[-1])
        dx, dw, dy8 = _linear_backward(dy_MN, Quantised(xq, xs, x_block), Quantised(wq, ws, w_block), recipe,
                                       x_dtype, w_dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if probe is not None:
            probe.record("grad", dy_MN, dy8.dequant())
        return (None if dx is None else dx.view(x_shape)), dw, None, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear whose matmuls run in FP8 E4M3 with `recipe` "blockwise" (V3) or "tensorwise"."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 recipe: str = "blockwise"):
        if bias:
            raise ValueError("Fp8Linear is bias-free, as every linear in these models")
        if recipe not in RECIPES:
            raise ValueError(f"Fp8Linear recipe: {recipe!r} is not one of {', '.join(RECIPES)}")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.recipe = recipe
        self.fp8_probe: QuantisationProbe | None = None  # set only inside a QuantisationProbe

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.fp8_probe is None:  # opaque custom ops (below): no graph break
            x_MK = x.reshape(-1, x.shape[-1])
            y_MN = torch.ops.dsbench.fp8_linear(x_MK, self.weight, self.recipe, _out_dtype(x))[0]
            return y_MN.view(*x.shape[:-1], y_MN.shape[-1])
        return self._eager_forward(x)

    @eager_under_compile  # under compile only with a probe attached: the probe reads values on the host
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight, self._quantised_weight(), self.recipe, self.fp8_probe)

    def _quantised_weight(self) -> Quantised:
        """The weight's FP8 blocks, re-quantised only when the weight changed (`weight_blocks`)."""
        return weight_blocks(self.weight, self.recipe)


# --- MoE: the routed experts' grouped GEMM in FP8 ---


def _grouped_forward(x_MK, w8s: list[Quantised], bounds: list[int], recipe: str, out_dtype) -> tuple[torch.Tensor, Quantised]:
    """out[rows of e] = x[rows of e] · w[e]; x quantised once for all experts (its tiles are per row)."""
    with torch.autocast(x_MK.device.type, enabled=False):
        x8 = quantise(x_MK, recipe, "act")
        out = x_MK.new_zeros(x_MK.shape[0], w8s[0].q.shape[0] if w8s else 0, dtype=out_dtype)
        for e, w8 in enumerate(w8s):
            if bounds[e + 1] > bounds[e]:
                out[bounds[e]:bounds[e + 1]] = gemm(x8.rows(bounds[e], bounds[e + 1]), w8, out_dtype)
    return out, x8


def _grouped_backward(dy_MN, x8: Quantised, w8s: list[Quantised], bounds: list[int], recipe: str, x_dtype, w_dtype):
    """dX (M, K) and dW (E, K, N) expert by expert, x and dY re-tiled along each expert's own tokens; and dY's tiles."""
    dx = torch.zeros(x8.q.shape, dtype=x_dtype, device=x8.q.device)
    dw = torch.zeros(len(w8s), x8.q.shape[1], dy_MN.shape[1], dtype=torch.float32, device=x8.q.device)  # (E, K, N)
    with torch.autocast(dy_MN.device.type, enabled=False):
        dy8 = quantise(dy_MN, recipe, "act")
        for e, w8 in enumerate(w8s):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            dx[lo:hi] = gemm(dy8.rows(lo, hi), w8.t, x_dtype)  # dX_e = dY_e · W_eᵀ
            dyT8, xT8 = _wgrad_operands(dy_MN[lo:hi], dy8.rows(lo, hi), x8.rows(lo, hi), recipe)
            dw[e] = gemm(xT8, dyT8, torch.float32)  # dW_e (K, N) = X_eᵀ · dY_e
    return dx, dw.to(w_dtype), dy8


class _Fp8GroupedMmFn(torch.autograd.Function):
    """out[rows of e] = x[rows of e] · w[e] for every expert e (rows sorted by expert, ends_E the
    cumulative row counts), each expert's three GEMMs in FP8 as in the table above: x in 1×128
    tiles (per row, so quantised once for all experts), w[e] in 128×128 blocks, and for Wgrad
    x and dY re-tiled along the expert's own tokens; eager."""

    @staticmethod
    def forward(ctx, x_MK, w_EKN, ends_E, recipe: str, probe):
        bounds = [0, *ends_E.tolist()]  # host values: the per-expert loop needs them
        w8s = expert_blocks(w_EKN, recipe)
        out, x8 = _grouped_forward(x_MK, w8s, bounds, recipe, _out_dtype(x_MK))
        ctx.save_for_backward(x8.q, x8.s)
        ctx.meta = (x8.block, w8s, bounds, recipe, probe, x_MK.dtype, w_EKN.dtype)
        if probe is not None:
            weight_NK = w_EKN.detach().transpose(1, 2).reshape(-1, w_EKN.shape[1])  # every expert's (N, K), stacked
            probe.record_forward(x_MK, x8, weight_NK, torch.cat([w8.dequant() for w8 in w8s]))
        return out

    @staticmethod
    def backward(ctx, dy_MN):
        xq, xs = ctx.saved_tensors
        x_block, w8s, bounds, recipe, probe, x_dtype, w_dtype = ctx.meta
        dx, dw, dy8 = _grouped_backward(dy_MN, Quantised(xq, xs, x_block), w8s, bounds, recipe, x_dtype, w_dtype)
        if probe is not None:
            probe.record("grad", dy_MN, dy8.dequant())
        return dx, dw, None, None, None


def fp8_grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor, recipe: str = "blockwise",
                   probe: QuantisationProbe | None = None) -> torch.Tensor:
    """The FP8 counterpart of grouped_mm (kernels/grouped_mm.py): rows ends[e−1]:ends[e] of x times w[e]."""
    if torch.compiler.is_compiling() and probe is None:  # one opaque custom op: no graph break
        return torch.ops.dsbench.fp8_grouped_mm(x_MK, w_EKN, ends_E, recipe, _out_dtype(x_MK))[0]
    return _eager_grouped_mm(x_MK, w_EKN, ends_E, recipe, probe)


@eager_under_compile  # as Fp8Linear._eager_forward
def _eager_grouped_mm(x_MK, w_EKN, ends_E, recipe, probe) -> torch.Tensor:
    return _Fp8GroupedMmFn.apply(x_MK, w_EKN, ends_E, recipe, probe)


# --- under torch.compile: the FP8 linear and grouped GEMM as opaque custom ops ---
#
# dynamo traces a call to each as one node and inductor never sees inside (inductor compiling the
# quantisation and block-scaled GEMMs failed an internal assertion on the block-wise backward and
# gave NaN in the forward on CPU, torch 2.13). The forward op returns X's FP8 tiles beside Y so
# that autograd saves them (V3's FP8 activation cache); the backward is a second op. Inside the
# ops everything runs eager on real tensors: the fp8_gemm family's pick (auto measures there too),
# the weights' FP8 cache, the host loop over experts.

_GROUP = 128  # kernels/fp8_quant.GROUP, restated: importing it imports triton (a test holds them equal)
_FP8 = torch.float8_e4m3fn
# The grouped ops read the experts' row bounds on the host (.tolist(), a sync), which a CUDA graph
# cannot capture: tagged, inductor records no CUDA graph around them. The linear's ops are
# capturable once warm (its kernel pick and weight blocks are made on the first, eager, call).
_HOST_SYNC = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _act_block(recipe: str) -> tuple[int, int] | None:
    return None if recipe == "tensorwise" else (1, _GROUP)


def _act_scales_like(x_MK: torch.Tensor, recipe: str) -> torch.Tensor:
    shape = () if recipe == "tensorwise" else (x_MK.shape[0], -(-x_MK.shape[1] // _GROUP))
    return x_MK.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("dsbench::fp8_linear", mutates_args=())
def _fp8_linear_op(x_MK: torch.Tensor, weight: torch.Tensor, recipe: str, out_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fprop: (Y (M, N), X's E4M3 tiles (M, K), their scales)."""
    y_MN, x8 = _linear_forward(x_MK, weight_blocks(weight, recipe), recipe, out_dtype)
    return y_MN, x8.q, x8.s


@_fp8_linear_op.register_fake
def _(x_MK, weight, recipe, out_dtype):
    M, K = x_MK.shape
    return x_MK.new_empty(M, weight.shape[0], dtype=out_dtype), x_MK.new_empty(M, K, dtype=_FP8), _act_scales_like(x_MK, recipe)


@torch.library.custom_op("dsbench::fp8_linear_backward", mutates_args=())
def _fp8_linear_backward_op(dy_MN: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, recipe: str,
                            x_dtype: torch.dtype, need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dgrad and Wgrad: (dX (M, K) or an empty tensor, dW (N, K) or an empty tensor)."""
    dx, dw, _ = _linear_backward(dy_MN, Quantised(xq, xs, _act_block(recipe)), weight_blocks(weight, recipe), recipe,
                                 x_dtype, weight.dtype, need_dx, need_dw)
    return (dy_MN.new_empty(0, dtype=x_dtype) if dx is None else dx), (weight.new_empty(0) if dw is None else dw)


@_fp8_linear_backward_op.register_fake
def _(dy_MN, xq, xs, weight, recipe, x_dtype, need_dx, need_dw):
    dx = xq.new_empty(xq.shape if need_dx else (0,), dtype=x_dtype)
    return dx, weight.new_empty(weight.shape if need_dw else (0,))


def _fp8_linear_setup(ctx, inputs, output):
    x_MK, weight, recipe, _ = inputs
    ctx.save_for_backward(output[1], output[2], weight)
    ctx.recipe, ctx.x_dtype = recipe, x_MK.dtype


def _fp8_linear_grad(ctx, dy_MN, _dxq, _dxs):
    xq, xs, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = torch.ops.dsbench.fp8_linear_backward(dy_MN, xq, xs, weight, ctx.recipe, ctx.x_dtype, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None


_fp8_linear_op.register_autograd(_fp8_linear_grad, setup_context=_fp8_linear_setup)


@torch.library.custom_op("dsbench::fp8_grouped_mm", mutates_args=(), tags=_HOST_SYNC)
def _fp8_grouped_mm_op(x_MK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor, recipe: str, out_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (M, N), x's E4M3 tiles (M, K), their scales)."""
    out, x8 = _grouped_forward(x_MK, expert_blocks(w_EKN, recipe), [0, *ends_E.tolist()], recipe, out_dtype)
    return out, x8.q, x8.s


@_fp8_grouped_mm_op.register_fake
def _(x_MK, w_EKN, ends_E, recipe, out_dtype):
    M, K = x_MK.shape
    return x_MK.new_empty(M, w_EKN.shape[2], dtype=out_dtype), x_MK.new_empty(M, K, dtype=_FP8), _act_scales_like(x_MK, recipe)


@torch.library.custom_op("dsbench::fp8_grouped_mm_backward", mutates_args=(), tags=_HOST_SYNC)
def _fp8_grouped_mm_backward_op(dy_MN: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, w_EKN: torch.Tensor,
                                ends_E: torch.Tensor, recipe: str, x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX (M, K), dW (E, K, N))."""
    dx, dw, _ = _grouped_backward(dy_MN, Quantised(xq, xs, _act_block(recipe)), expert_blocks(w_EKN, recipe),
                                  [0, *ends_E.tolist()], recipe, x_dtype, w_EKN.dtype)
    return dx, dw


@_fp8_grouped_mm_backward_op.register_fake
def _(dy_MN, xq, xs, w_EKN, ends_E, recipe, x_dtype):
    return xq.new_empty(xq.shape, dtype=x_dtype), torch.empty_like(w_EKN)


def _fp8_grouped_mm_setup(ctx, inputs, output):
    x_MK, w_EKN, ends_E, recipe, _ = inputs
    ctx.save_for_backward(output[1], output[2], w_EKN, ends_E)
    ctx.recipe, ctx.x_dtype = recipe, x_MK.dtype


def _fp8_grouped_mm_grad(ctx, dy_MN, _dxq, _dxs):
    xq, xs, w_EKN, ends_E = ctx.saved_tensors
    dx, dw = torch.ops.dsbench.fp8_grouped_mm_backward(dy_MN, xq, xs, w_EKN, ends_E, ctx.recipe, ctx.x_dtype)
    return dx, dw, None, None, None


_fp8_grouped_mm_op.register_autograd(_fp8_grouped_mm_grad, setup_context=_fp8_grouped_mm_setup)


# --- measurement: quantisation error and the memory the FP8 activation cache saves ---


class QuantisationProbe:
    """`with QuantisationProbe(model) as probe:` — every FP8 module inside (an Fp8Linear, or any
    module with an `fp8_probe` attribute that it passes to fp8_grouped_mm) records, per call, the
    SQNR of what it quantised (activations X, weights W, output gradients dY as quantised for
    Dgrad), each against the unquantised tensor, and the bytes its FP8 cache of X saves against a
    BF16 copy (what a BF16 autocast linear keeps for Wgrad)."""

    KINDS = ("act", "weight", "grad")

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if hasattr(m, "fp8_probe")]
        self.sqnr: dict[str, list[float]] = {k: [] for k in self.KINDS}
        self.activation_bytes_fp8 = 0
        self.activation_bytes_bf16 = 0

    def __enter__(self) -> QuantisationProbe:
        for layer in self.layers:
            layer.fp8_probe = self
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.fp8_probe = None

    def record(self, kind: str, exact: torch.Tensor, approx: torch.Tensor) -> None:
        self.sqnr[kind].append(sqnr_db(exact, approx))

    def record_forward(self, x_MK, x8: Quantised, weight: torch.Tensor, weight_dequantised: torch.Tensor) -> None:
        self.record("act", x_MK, x8.dequant())
        self.record("weight", weight, weight_dequantised)
        self.activation_bytes_fp8 += x8.nbytes
        self.activation_bytes_bf16 += _BF16_BYTES * x_MK.numel()

    def summary(self) -> dict:
        """Row columns: mean and worst (min) SQNR over the recorded calls, in dB; bytes per step."""
        row = {}
        for kind, values in self.sqnr.items():
            values = [v for v in values if not math.isnan(v)]  # NaN: non-finite input, the loss says so
            row[f"sqnr_{kind}_db"] = sum(values) / len(values) if values else None
            row[f"sqnr_{kind}_db_min"] = min(values) if values else None
        row["fp8_activation_bytes"] = self.activation_bytes_fp8
        row["fp8_activation_bytes_saved"] = self.activation_bytes_bf16 - self.activation_bytes_fp8
        return row

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


class _Fp8LinearFn(torch.autograd.Function):
    """Y = X·Wᵀ with Fprop, Dgrad and Wgrad in FP8 (table in the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, w8: Quantised, recipe: str, probe):
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_MK = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            x8 = quantise(x_MK, recipe, "act")
            y_MN = gemm(x8, w8, out_dtype)
        ctx.save_for_backward(x8.q, x8.s, w8.q, w8.s)
        ctx.meta = (x8.block, w8.block, recipe, probe, x.shape, x.dtype, weight.dtype)
        if probe is not None:
            probe.record_forward(x_MK, x8, weight, w8.dequant())
        return y_MN.view(*x.shape[:-1], y_MN.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        x_block, w_block, recipe, probe, x_shape, x_dtype, w_dtype = ctx.meta
        x8, w8 = Quantised(xq, xs, x_block), Quantised(wq, ws, w_block)
        dy_MN = dy.reshape(-1, dy.shape[-1])
        with torch.autocast(dy.device.type, enabled=False):
            dy8 = quantise(dy_MN, recipe, "act")
            dx = gemm(dy8, w8.t, x_dtype) if ctx.needs_input_grad[0] else None
            dw = None
            if ctx.needs_input_grad[1]:
                dyT8, xT8 = _wgrad_operands(dy_MN, dy8, x8, recipe)
                dw = gemm(dyT8, xT8, torch.float32).to(w_dtype)  # FP32 for FP32 master weights
        if probe is not None:
            probe.record("grad", dy_MN, dy8.dequant())
        return (None if dx is None else dx.view(x_shape)), dw, None, None, None


def _wgrad_operands(dy_MN, dy8: Quantised, x8: Quantised, recipe: str) -> tuple[Quantised, Quantised]:
    """dYᵀ (N, M) and Xᵀ (K, M), both scaled along M, the token axis that Wgrad contracts."""
    if recipe == "tensorwise":
        return dy8.t, x8.t  # one scale per tensor: the forward's FP8 copies serve as they are
    dyT8 = quantise(dy_MN.T, recipe, "act")  # 1×128 along tokens, from the high-precision dY
    xT8 = quantise(x8.dequant().T, recipe, "act")  # X's cached FP8 tiles, re-tiled along tokens
    return dyT8, xT8


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
        self._w8_cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"

    # Eager under torch.compile (a graph break, counted in a compiled cell's row): inductor's CPU
    # code generator fails an assertion on the block-wise backward, and the compiled forward gave
    # NaN (torch 2.13, 2026-12-04); the weight cache keys on the tensor's version, which dynamo
    # would guard on at every optimizer step.
    @eager_under_compile
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight, self._quantised_weight(), self.recipe, self.fp8_probe)

    def _quantised_weight(self) -> Quantised:
        """The weight's FP8 blocks, re-quantised only when the weight changed (each optimizer
        step bumps its version; serving quantises once, as V3's FP8 checkpoints are)."""
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, self.recipe)
        if self._w8_cache is None or self._w8_cache[0] != key:
            with torch.no_grad():
                self._w8_cache = (key, quantise(w.detach(), self.recipe, "weight"))
        return self._w8_cache[1]


# --- measurement: quantisation error and the memory the FP8 activation cache saves ---


# --- MoE: the routed experts' grouped GEMM in FP8 ---


class _Fp8GroupedMmFn(torch.autograd.Function):
    """out[rows of e] = x[rows of e] · w[e] for every expert e (rows sorted by expert, ends_E the
    cumulative row counts), each expert's three GEMMs in FP8 as in the table above: x in 1×128
    tiles (per row, so quantised once for all experts), w[e] in 128×128 blocks, and for Wgrad
    x and dY re-tiled along the expert's own tokens."""

    @staticmethod
    def forward(ctx, x_MK, w_EKN, ends_E, recipe: str, probe):
        out_dtype = torch.get_autocast_dtype(x_MK.device.type) if torch.is_autocast_enabled(x_MK.device.type) else x_MK.dtype
        bounds = [0, *ends_E.tolist()]  # host values: the per-expert loop needs them
        with torch.autocast(x_MK.device.type, enabled=False):
            x8 = quantise(x_MK, recipe, "act")
            w8s = [quantise(w_EKN[e].detach().T, recipe, "weight") for e in range(w_EKN.shape[0])]  # (N, K) each
            out = x_MK.new_zeros(x_MK.shape[0], w_EKN.shape[2], dtype=out_dtype)
            for e, w8 in enumerate(w8s):
                if bounds[e + 1] > bounds[e]:
                    out[bounds[e]:bounds[e + 1]] = gemm(x8.rows(bounds[e], bounds[e + 1]), w8, out_dtype)
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
        x8 = Quantised(xq, xs, x_block)
        dx = torch.zeros(xq.shape, dtype=x_dtype, device=xq.device)
        dw = torch.zeros(len(w8s), xq.shape[1], dy_MN.shape[1], dtype=torch.float32, device=xq.device)  # (E, K, N)
        with torch.autocast(dy_MN.device.type, enabled=False):
            dy8 = quantise(dy_MN, recipe, "act")
            for e, w8 in enumerate(w8s):
                lo, hi = bounds[e], bounds[e + 1]
                if hi == lo:
                    continue
                dx[lo:hi] = gemm(dy8.rows(lo, hi), w8.t, x_dtype)  # dX_e = dY_e · W_eᵀ
                dyT8, xT8 = _wgrad_operands(dy_MN[lo:hi], dy8.rows(lo, hi), x8.rows(lo, hi), recipe)
                dw[e] = gemm(xT8, dyT8, torch.float32)  # dW_e (K, N) = X_eᵀ · dY_e
        if probe is not None:
            probe.record("grad", dy_MN, dy8.dequant())
        return dx, dw.to(w_dtype), None, None, None


@eager_under_compile  # as Fp8Linear.forward
def fp8_grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor, recipe: str = "blockwise",
                   probe: QuantisationProbe | None = None) -> torch.Tensor:
    """The FP8 counterpart of moe.grouped_mm: rows ends[e−1]:ends[e] of x times w[e]."""
    return _Fp8GroupedMmFn.apply(x_MK, w_EKN, ends_E, recipe, probe)


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

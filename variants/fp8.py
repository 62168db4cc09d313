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

What stays in higher precision (V3 §3.3.1): the FP32 master weights and optimizer states, and
everything that is not an Fp8Linear — embedding, output head, norms, attention core (SDPA),
MoE gate — which runs under BF16 autocast. GEMM outputs are BF16 under autocast (V3: "outputs
in BF16 or FP32"), else the input's dtype. Weight gradients are FP32, for the master weights.
Non-finite input is not checked here (that would synchronise a GPU every layer): a NaN scale
makes the outputs NaN, the loss turns NaN and the cell ends `diverged`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

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
        block = None if self.block is None else self.block[::-1]
        return Quantised(self.q.T, self.s if self.block is None else self.s.T, block)

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.s.numel() * self.s.element_size()


# --- the two recipes: how each operand is quantised, and each GEMM ---


def quantise(x: torch.Tensor, recipe: str, role: str) -> Quantised:
    """x (R, C) quantised for `role` "act" (1×128 tiles along C) or "weight" (128×128 blocks)."""
    fq = _kernels()[0]
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
    return fg.fp8_gemm(a.q, a.s, b.q, b.s, b_group=b.block[0], out_dtype=out_dtype)


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
        ctx.meta = (x8.block, w8.block, recipe, probe, x.shape, x.dtype)
        if probe is not None:
            probe.record_forward(x_MK, x8, weight, w8)
        return y_MN.view(*x.shape[:-1], y_MN.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        x_block, w_block, recipe, probe, x_shape, x_dtype = ctx.meta
        x8, w8 = Quantised(xq, xs, x_block), Quantised(wq, ws, w_block)
        dy_MN = dy.reshape(-1, dy.shape[-1])
        with torch.autocast(dy.device.type, enabled=False):
            dy8 = quantise(dy_MN, recipe, "act")
            dx = gemm(dy8, w8.t, x_dtype) if ctx.needs_input_grad[0] else None
            dw = None
            if ctx.needs_input_grad[1]:
                dyT8, xT8 = _wgrad_operands(dy_MN, dy8, x8, recipe)
                dw = gemm(dyT8, xT8, torch.float32)
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
        self.probe: QuantisationProbe | None = None  # set only inside a QuantisationProbe
        self._w8_cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight, self._quantised_weight(), self.recipe, self.probe)

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


class QuantisationProbe:
    """`with QuantisationProbe(model) as probe:` — every Fp8Linear inside records, per call, the
    SQNR of what it quantised (activations X, weights W, output gradients dY as quantised for
    Dgrad), each against the unquantised tensor, and the bytes its FP8 cache of X saves against a
    BF16 copy (what a BF16 autocast linear keeps for Wgrad)."""

    KINDS = ("act", "weight", "grad")

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
        self.sqnr: dict[str, list[float]] = {k: [] for k in self.KINDS}
        self.activation_bytes_fp8 = 0
        self.activation_bytes_bf16 = 0

    def __enter__(self) -> QuantisationProbe:
        for layer in self.layers:
            layer.probe = self
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.probe = None

    def record(self, kind: str, exact: torch.Tensor, approx: torch.Tensor) -> None:
        self.sqnr[kind].append(sqnr_db(exact, approx))

    def record_forward(self, x_MK, x8: Quantised, weight, w8: Quantised) -> None:
        self.record("act", x_MK, x8.dequant())
        self.record("weight", weight, w8.dequant())
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

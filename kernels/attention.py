"""Causal attention without a cache (train and prefill): the `attention` op family.

Legend: B batch, H query heads, G key/value heads (G divides H; G < H shares each K/V head
across H/G query heads, as GQA/MQA and MLA's latent do), T tokens, D head width.

    out[b, h, t] = softmax_{s ≤ t}(scale · q[b, h, t] · k[b, g(h), s]) · v[b, g(h), s]

q (B, H, T, D), k and v (B, G, T, D) → (B, H, T, D). V has q's width here: a caller whose value
is narrower (MLA's Dv < D) zero-pads it and slices the output, so every fused kernel applies.

Implementations: `reference` (plain matmuls, scores softmaxed in fp32: the truth for tests),
`sdpa` (torch's own dispatch), and each SDPA backend pinned: `sdpa_math`, `sdpa_flash` (CPU
and CUDA), `sdpa_efficient` and `sdpa_cudnn` (CUDA). A backend that refuses the inputs at run
time ("No available kernel") is left out by `auto`'s first call (kernels/choice.py).
FlexAttention is not here: its eager form is a reference loop, fast only compiled; it belongs
to the masks SDPA cannot express (DSA's selection, a sliding window).
FLOPs: 2·B·H·T²·D for the scores and as many for the weighted sum (halved by causality).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import choice


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, T, D = q.shape
    G = k.shape[1]
    rows = (q * scale).reshape(B, G, H // G * T, D)  # head h → group h // (H/G), as SDPA's enable_gqa
    scores = rows @ k.transpose(-1, -2)  # (B, G, H/G·T, T)
    keep = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().repeat(H // G, 1)
    probs = scores.masked_fill(~keep, float("-inf")).float().softmax(dim=-1).type_as(v)
    return (probs @ v).reshape(B, H, T, v.shape[-1])


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _pinned(backend_name: str):
    def run(q, k, v, scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return sdpa(q, k, v, scale)

    return run


# An enclosing `sdpa_kernel(...)` (or torch.backends.cuda.enable_*_sdp(False)) turns backends
# off for CPU and CUDA alike: a backend it turned off is no candidate, so the caller's choice holds.
_ENABLED = {"MATH": torch.backends.cuda.math_sdp_enabled, "FLASH_ATTENTION": torch.backends.cuda.flash_sdp_enabled,
            "EFFICIENT_ATTENTION": torch.backends.cuda.mem_efficient_sdp_enabled, "CUDNN_ATTENTION": torch.backends.cuda.cudnn_sdp_enabled}


def _enabled(backend_name: str, also=lambda q, k, v, scale: None):
    def runs_on(q, k, v, scale) -> str | None:
        if not _ENABLED[backend_name]():
            return "turned off by an enclosing sdpa_kernel"
        return also(q, k, v, scale)

    return runs_on


def _cuda_only(device: str) -> str | None:
    return None if device == "cuda" else "a CUDA backend of SDPA"


def _on_cuda(q, k, v, scale) -> str | None:
    return _cuda_only(q.device.type)


def _half_on_cuda(q, k, v, scale) -> str | None:
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        return "CUDA flash attention takes fp16 and bf16 only"
    return None


def _cudnn(q, k, v, scale) -> str | None:
    return _cuda_only(q.device.type) or _half_on_cuda(q, k, v, scale)


def _key(q, k, v, scale) -> tuple:
    enabled = tuple(flag() for flag in _ENABLED.values())
    return (q.device.type, q.dtype, *q.shape, k.shape[1], q.requires_grad and torch.is_grad_enabled(), enabled)


@functools.cache
def _tolerance_for(dtype: torch.dtype) -> float:
    # fp32: kernels differ in summation order only (~1e-7 relative); bf16/fp16: the output is
    # rounded once to 8 (11) mantissa bits and P once more before P·V: 2⁻⁷ holds both.
    return 1e-5 if dtype == torch.float32 else 2.0 ** -7


choice.register(choice.Family(
    name="attention",
    reference="reference",
    implementations={
        "reference": choice.Implementation("reference", reference, note="plain matmuls, fp32 softmax"),
        "sdpa": choice.Implementation("sdpa", sdpa, note="F.scaled_dot_product_attention, torch's own backend choice"),
        "sdpa_math": choice.Implementation("sdpa_math", _pinned("MATH"), _enabled("MATH"), note="SDPA's math backend"),
        "sdpa_flash": choice.Implementation("sdpa_flash", _pinned("FLASH_ATTENTION"), _enabled("FLASH_ATTENTION", _half_on_cuda),
                                            note="SDPA's flash backend (CPU flash kernel; FlashAttention-2 on CUDA)"),
        "sdpa_efficient": choice.Implementation("sdpa_efficient", _pinned("EFFICIENT_ATTENTION"), _enabled("EFFICIENT_ATTENTION", _on_cuda), _cuda_only,
                                                note="SDPA's memory-efficient backend (xFormers' kernel)"),
        "sdpa_cudnn": choice.Implementation("sdpa_cudnn", _pinned("CUDNN_ATTENTION"), _enabled("CUDNN_ATTENTION", _cudnn), _cuda_only,
                                            note="SDPA's cuDNN backend (Hopper's fastest in torch 2.5+)"),
    },
    key=_key,
    tolerance=lambda q, k, v, scale: _tolerance_for(q.dtype),
    compile_order=("sdpa",),  # inductor matches SDPA and picks its backend itself
    trial=choice.forward_backward,
    description="causal attention over the step's own tokens (train, prefill), GQA-shared K/V heads",
))

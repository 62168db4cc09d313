"""kernels/mla_decode.py: the FlashMLA-style Triton kernel against its plain-PyTorch reference.

The kernel runs under Triton's CPU interpreter here (TRITON_INTERPRET=1, set before anything
imports triton; setdefault, so a GPU run can export TRITON_INTERPRET=0 to test the compiled
kernel, which the `gpu` test below also does in bf16). Shapes are odd on every axis.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dsbench.variants.attention import cached_attention  # noqa: E402

triton = pytest.importorskip("triton")
from dsbench.kernels import mla_decode as md  # noqa: E402

# (B, H, S, Dc, Dr, splits): odd sizes, a single key, splits that do not divide S, V3's 128
# heads with d_c = 512 (several head blocks), and the automatic split count.
SHAPES = [(3, 7, 77, 63, 7, None), (2, 5, 33, 24, 6, 3), (1, 3, 1, 40, 8, 4), (1, 128, 45, 512, 64, 2), (2, 16, 300, 128, 16, None)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _inputs(B, H, S, Dc, Dr, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, Dc + Dr, generator=g, device=device).to(dtype)
    kv = torch.randn(B, S + 5, Dc + Dr, generator=g, device=device).to(dtype)[:, :S]  # a strided view, as the cache's prefix
    return q, kv


@pytest.mark.parametrize("B, H, S, Dc, Dr, splits", SHAPES)
def test_triton_kernel_matches_the_reference(B, H, S, Dc, Dr, splits):
    # fp32 throughout (the interpreter's tl.dot is numpy fp32): the kernel sums in another order
    # (blocks of keys, an online softmax, a log-sum-exp merge of the splits): observed < 1e-6,
    # bound 1e-5 RMS-relative.
    q, kv = _inputs(B, H, S, Dc, Dr)
    scale = (Dc // 4 + Dr) ** -0.5
    out = md.mla_decode_triton(q, kv, Dc, scale, splits=splits)
    assert out.shape == (B, H, Dc)
    assert rel_err(out, md.reference(q, kv, Dc, scale)) < 1e-5


def test_reference_is_the_models_cpu_path():
    # The MLA module on a CPU runs cached_attention over the latent (one shared key head): the
    # same computation as the reference, so the two are the same numbers.
    q, kv = _inputs(2, 6, 19, 24, 8)
    ref = md.reference(q, kv, 24, 0.3)
    model_path = cached_attention(q.unsqueeze(2), kv.unsqueeze(1), kv[:, None, :, :24], 18, scale=0.3)[:, :, 0]
    assert torch.allclose(model_path, ref, rtol=0, atol=1e-6)


def test_entry_point_uses_the_reference_off_cuda():
    q, kv = _inputs(1, 4, 9, 16, 4)
    assert torch.equal(md.mla_decode(q, kv, 16, 0.5), md.reference(q, kv, 16, 0.5))


def test_launcher_rejects_bad_shapes():
    q, kv = _inputs(1, 4, 9, 16, 4)
    with pytest.raises(ValueError, match="kv"):
        md.mla_decode_triton(q, kv[:, :, :18], 16, 0.5)
    with pytest.raises(ValueError, match="0 < Dc"):
        md.mla_decode_triton(q, kv, 20, 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, S, Dc, Dr, splits", SHAPES)
def test_compiled_kernel_in_bf16(B, H, S, Dc, Dr, splits):
    # bf16 inputs: the kernel keeps probabilities in fp32 until the AV dot casts them to bf16, as
    # the reference does after its fp32 softmax; bf16's 2^-8 rounding bounds the gap: 2e-2.
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("export TRITON_INTERPRET=0 to test the compiled kernel")
    q, kv = _inputs(B, H, S, Dc, Dr, torch.bfloat16, "cuda")
    out = md.mla_decode(q, kv, Dc, 0.1)
    assert rel_err(out, md.reference(q, kv, Dc, 0.1)) < 2e-2

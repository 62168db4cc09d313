"""The `fp8_gemm` op family (kernels/fp8_gemm.py): every implementation that runs here against the
reference on odd shapes, the scale layouts the `cublas` implementation hands cuBLASLt, where each
implementation refuses to run, and the Triton kernel's tuning configurations.

Under Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py) `triton` runs on the CPU;
`cublas` needs an SM 9.0 GPU, so here its scale conversion is checked in plain torch: the
converted scales, read the way cuBLASLt defines its layouts (offsets into their storage), give
exactly the operands the reference dequantises, and torch 2.13's own shape and stride checks
(its meta function for F.scaled_mm, run on fake CUDA tensors) accept them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from dsbench.kernels import choice  # noqa: E402
from dsbench.kernels import fp8_gemm as fg  # noqa: E402
from dsbench.kernels import fp8_quant as fq  # noqa: E402

pytest.importorskip("triton")

FAMILY = choice.family("fp8_gemm")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # Triton on this CPU (a GPU run exports 0)
# (M, N, K): odd M, ragged N, K unaligned by one element, 128 and a multiple of 128
ODD_SHAPES = [(7, 128, 2049), (63, 130, 384), (896, 128, 128)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS-relative error ‖a − b‖ / ‖b‖."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _operands(M, N, K, b_group, seed=0):
    g = torch.Generator().manual_seed(seed)
    aq, a_s = fq.act_quant_reference(torch.randn(M, K, generator=g))
    b = torch.randn(N, K, generator=g) * 0.02
    bq, b_s = fq.weight_quant_reference(b) if b_group == 128 else fq.act_quant_reference(b)
    return aq, a_s, bq, b_s


# --- every implementation that runs on this CPU against the reference ---


@pytest.mark.parametrize("b_group", [128, 1])
@pytest.mark.parametrize("M,N,K", ODD_SHAPES)
def test_every_implementation_that_runs_here_matches_the_reference(M, N, K, b_group):
    """Tight (1e-6 RMS-relative): the same exact E4M3 products in FP32, only the summation order
    differs (the family's 2^-10 allows for Hopper's FP8 MMA, which a CPU does not have)."""
    aq, a_s, bq, b_s = _operands(M, N, K, b_group)
    ref = FAMILY.implementations["reference"].fn(aq, a_s, bq, b_s, b_group)
    runs, why_not = FAMILY.candidates(aq, a_s, bq, b_s, b_group)
    assert set(runs) == {"reference", "scaled_mm_loop"} | ({"triton"} if INTERPRETER else set()) and "cublas" in why_not
    for name in runs:
        out = FAMILY.implementations[name].fn(aq, a_s, bq, b_s, b_group)
        assert out.shape == (M, N) and out.dtype == torch.float32
        assert _rel(out, ref) < 1e-6, name


def test_implementations_read_transposed_operands_as_dgrad_passes_them():
    """Dgrad passes the weight's blocks transposed (a view), C = dY·W."""
    M, N, K = 63, 130, 384
    wq, w_s = fq.weight_quant_reference(torch.randn(K, N) * 0.02)  # W (out = K, in = N)
    dq, d_s = fq.act_quant_reference(torch.randn(M, K))
    ref = fg.fp8_gemm_reference(dq, d_s, wq.T, w_s.T, 128)
    for name in ("scaled_mm_loop", "triton") if INTERPRETER else ("scaled_mm_loop",):
        assert _rel(FAMILY.implementations[name].fn(dq, d_s, wq.T, w_s.T, 128), ref) < 1e-6, name


@pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs TRITON_INTERPRET=1")
def test_triton_writes_the_requested_output_dtype():
    aq, a_s, bq, b_s = _operands(63, 130, 384, 128)
    out = fg.fp8_gemm_triton(aq, a_s, bq, b_s, 128, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert _rel(out, fg.fp8_gemm_reference(aq, a_s, bq, b_s, 128)) < 2**-10  # one fp16 rounding


# --- the cublas implementation's scale layouts ---


def _as_cublaslt_reads(scale: torch.Tensor, rows: int, cols: int, row_stride: int, col_stride: int) -> torch.Tensor:
    """The (rows, cols) scale matrix cuBLASLt reads from `scale`'s storage: element (i, j) at offset
    i·row_stride + j·col_stride, whatever strides the tensor itself claims."""
    flat = torch.as_strided(scale, (scale.untyped_storage().nbytes() // 4,), (1,), 0)
    i, j = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    return flat[scale.storage_offset() + i * row_stride + j * col_stride]


def _dequant_as_cublaslt(aq, sa, bq, sb, b_group) -> tuple[torch.Tensor, torch.Tensor]:
    """A (M, K) and B (N, K) in FP32, scaled as cuBLASLt's layouts define (kernels/fp8_gemm.py)."""
    (M, K), N = aq.shape, bq.shape[0]
    kg = -(-K // 128)
    m, n, k = torch.arange(M)[:, None], torch.arange(N)[:, None], torch.arange(K)[None, :]
    a_scale = _as_cublaslt_reads(sa, M, kg, 1, M)  # VEC128: (m, j) at m + j·M
    if b_group == 1:
        b_scale = _as_cublaslt_reads(sb, N, kg, 1, N)[n, k // 128]  # VEC128 on B's rows
    else:
        L4 = fg.round_up(kg, 4)
        blocks = _as_cublaslt_reads(sb, L4, -(-N // 128), 1, L4)  # BLK128x128: (j, nb) at j + nb·L4
        b_scale = blocks.T[n // 128, k // 128]
    return fq.to_float(aq) * a_scale[m, k // 128], fq.to_float(bq) * b_scale


@pytest.mark.parametrize("b_group", [128, 1])
@pytest.mark.parametrize("N", [128, 7168])
@pytest.mark.parametrize("K", [128, 384, 2049])
@pytest.mark.parametrize("M", [7, 63, 896])
def test_cublas_scales_dequantise_to_exactly_the_reference_operands(M, N, K, b_group):
    g = torch.Generator().manual_seed(M * N + K)
    aq = torch.randint(0, 126, (M, K), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)  # finite codes
    bq = torch.randint(0, 126, (N, K), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    kg = -(-K // 128)
    a_s = torch.rand(M, kg, generator=g) + 0.5
    b_s = torch.rand(N if b_group == 1 else -(-N // 128), kg, generator=g) + 0.5
    sa, sb = fg.cublas_scales(a_s, b_s, b_group)
    # what torch checks (ScaledBlas.cpp): shapes and strides
    assert sa.shape == (M, kg) and (sa.stride() == (1, M) or kg == 1)
    if b_group == 1:
        assert sb.shape == (N, kg) and (sb.stride() == (1, N) or kg == 1)
    else:
        L4 = fg.round_up(kg, 4)
        assert sb.shape == (L4, -(-N // 128)) and sb.stride()[0] == 1 and (sb.stride()[1] == L4 or sb.shape[1] == 1)
        assert torch.all(sb[kg:] == 0)  # the padding rows
    a_ref, b_ref = fq.dequant(aq, a_s, (1, 128)), fq.dequant(bq, b_s, (b_group, 128))
    a_lt, b_lt = _dequant_as_cublaslt(aq, sa, bq, sb, b_group)
    assert torch.equal(a_lt, a_ref) and torch.equal(b_lt, b_ref)


def _fake_cuda(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


@pytest.mark.parametrize("b_group", [128, 1])
@pytest.mark.parametrize("M,N,K", [(16, 128, 128), (896, 7168, 384), (64, 2048, 7168)])
def test_torch_accepts_the_cublas_layouts(M, N, K, b_group):
    """torch 2.13's meta function for F.scaled_mm (the checks of its CUDA kernel, on fake CUDA
    tensors: no GPU needed) takes the converted scales and the operands as fp8_gemm_cublas passes them."""
    aq, a_s, bq, b_s = _operands(M, N, K, b_group)
    sa, sb = fg.cublas_scales(a_s, b_s, b_group)
    recipe_b = F.ScalingType.BlockWise128x128 if b_group == 128 else F.ScalingType.BlockWise1x128
    with FakeTensorMode(allow_non_fake_inputs=True):
        a, b = _fake_cuda(aq), _fake_cuda(bq)
        out = F.scaled_mm(a, b.T, _fake_cuda(sa), F.ScalingType.BlockWise1x128, _fake_cuda(sb), recipe_b,
                          output_dtype=torch.bfloat16)
        assert out.shape == (M, N) and out.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="blockwise scaling"):  # our own layout is not cuBLASLt's
            F.scaled_mm(a, b.T, _fake_cuda(a_s), F.ScalingType.BlockWise1x128, _fake_cuda(b_s.T), recipe_b)


# --- where each implementation runs ---


@pytest.fixture
def hopper(monkeypatch):
    """Fake CUDA operands on a pretend SM 9.0 with CUDA 12.9: only the shape rules are left."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.9")

    def operands(M, N, K, b_group=128, dtype=torch.float8_e4m3fn):
        with FakeTensorMode():
            a = torch.empty(M, K, dtype=dtype, device="cuda")
            b = torch.empty(N, K, dtype=dtype, device="cuda")
            a_s = torch.empty(M, -(-K // 128), device="cuda")
            b_s = torch.empty(N if b_group == 1 else -(-N // 128), -(-K // 128), device="cuda")
        return a, a_s, b, b_s, b_group

    return operands


@pytest.mark.parametrize("shape,needle", [
    ((4096, 7168, 16384, 128), None),
    ((4096, 7168, 16384, 1), None),
    ((4095, 7167, 2049, 128), "K = 2049 is not a multiple of 128"),
    ((4096, 7167, 2048, 128), "N = 7167 is not a multiple of 128"),
    ((4096, 7184, 2048, 1), None),  # 1×128 B needs N % 16 only
    ((4096, 7170, 2048, 1), "N = 7170 is not a multiple of 16"),
    ((4095, 7168, 2048, 128), "M = 4095 is not a multiple of 16"),
])
def test_cublas_says_which_shapes_it_refuses(hopper, shape, needle):
    M, N, K, b_group = shape
    reason = fg._cublas_runs(*hopper(M, N, K, b_group))
    assert reason is None if needle is None else (needle in reason and "\n" not in reason)


def test_cublas_refuses_other_gpus_old_cuda_and_other_dtypes(hopper, monkeypatch):
    args = hopper(256, 256, 256)
    assert "torch.float8_e5m2" in fg._cublas_runs(*hopper(256, 256, 256, dtype=torch.float8_e5m2))
    assert "bf16, fp16 or fp32" in fg._cublas_runs(*args, out_dtype=torch.float8_e4m3fn)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "CUDA ≥ 12.9" in fg._cublas_runs(*args)
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    for capability in ((8, 9), (10, 0), (12, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert "SM 9.x (Hopper) only" in fg._cublas_runs(*args)


@pytest.mark.parametrize("name", ["cublas", "triton"])
def test_pinning_a_gpu_implementation_on_a_cpu_is_one_line(monkeypatch, name):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as a real CPU cell: no interpreter
    aq, a_s, bq, b_s = _operands(7, 128, 256, 128)
    with pytest.raises(choice.KernelUnavailable) as info:
        choice.Chooser(pins={"fp8_gemm": name}).run("fp8_gemm", aq, a_s, bq, b_s, 128)
    message = str(info.value)
    assert message.startswith(f"kernels.fp8_gemm: {name!r} does not run") and "\n" not in message
    refusal = choice.check_pins({"fp8_gemm": name}, "cpu")
    assert refusal.startswith(f"kernels.fp8_gemm: {name!r} cannot run on cpu") and "\n" not in refusal


def test_auto_on_a_cpu_measures_the_implementations_that_run_here():
    aq, a_s, bq, b_s = _operands(63, 130, 384, 128)
    chooser = choice.Chooser(reps=1)
    out = chooser.run("fp8_gemm", aq, a_s, bq, b_s, 128)
    assert _rel(out, fg.fp8_gemm_reference(aq, a_s, bq, b_s, 128)) < 1e-6
    why = chooser.columns()["kernel_fp8_gemm_why"]
    measured = ("reference", "scaled_mm_loop", "triton") if INTERPRETER else ("reference", "scaled_mm_loop")
    assert all(f"{n} " in why for n in measured) and "not run: cublas (cuBLASLt runs on CUDA" in why


def test_the_pick_is_shared_by_token_counts_up_to_the_next_power_of_two():
    """An MoE expert's token count changes every step (M in Fprop and Dgrad, K in Wgrad): a pick
    per exact count would measure, and drop the step's sample, every step."""
    key = FAMILY.key
    keys = {key(*_operands(M, 128, 256, 128), 128) for M in (65, 100, 128)}
    assert len(keys) == 1 and key(*_operands(129, 128, 256, 128), 128) not in keys
    assert key(*_operands(63, 130, 200, 128), 128) == key(*_operands(63, 130, 256, 128), 128)
    aq, a_s, bq, b_s = _operands(63, 130, 384, 128)
    assert key(aq, a_s, bq, b_s, 128) != key(aq, a_s, bq.T.contiguous().T, b_s, 128)  # B read transposed


# --- the Triton kernel's tuning ---


def test_triton_tunes_over_gpu_tiles_and_the_interpreter_runs_one(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(fg._gemm_configs()) == 1  # the interpreter: nothing to tune, the tests stay cheap
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = fg._gemm_configs()
    assert len(configs) >= 8
    for c in configs:
        assert 64 <= c.kwargs["BLOCK_M"] <= 256 and 64 <= c.kwargs["BLOCK_N"] <= 256 and c.kwargs["GROUP_M"] == 8
        assert c.num_warps in (4, 8) and 3 <= c.num_stages <= 5
    decode = fg._prune_configs(configs, {"M": 4, "N": 7168})
    assert decode and all(c.kwargs["BLOCK_M"] == 64 for c in decode)  # no 128-row tiles for 4 tokens


# --- on a GPU (skipped without CUDA; scripts/gpu_check.sh runs them with TRITON_INTERPRET=0) ---


@pytest.mark.gpu
@pytest.mark.parametrize("b_group", [128, 1])
@pytest.mark.parametrize("M,N,K", [(63, 130, 384), (896, 7168, 2049), (256, 7168, 2048)])
def test_every_implementation_on_this_gpu_matches_the_reference(M, N, K, b_group):
    """The family's tolerance, 2^-10 (FP32 output): Hopper's FP8 MMA accumulates each 128-wide
    slice in ~14 bits. Where cuBLASLt's block scaling should run (SM 9.0, CUDA ≥ 12.9, aligned
    shapes) the family must offer it; the dgrad layout (B a transposed view) too."""
    if INTERPRETER:
        pytest.skip("export TRITON_INTERPRET=0 to test the compiled kernels")
    aq, a_s, bq, b_s = (t.cuda() for t in _operands(M, N, K, b_group))
    runs, why_not = FAMILY.candidates(aq, a_s, bq, b_s, b_group)
    hopper = torch.cuda.get_device_capability()[0] == 9 and fg._cuda_version() >= (12, 9)
    if hopper and hasattr(F, "scaled_mm") and K % 128 == 0 and N % 128 == 0 and M % 16 == 0:
        assert "cublas" in runs, why_not.get("cublas")
    ref = fg.fp8_gemm_reference(aq, a_s, bq, b_s, b_group)
    for name in runs:
        impl = FAMILY.implementations[name].fn
        assert _rel(impl(aq, a_s, bq, b_s, b_group), ref) < 2**-10, name
        assert _rel(impl(aq, a_s, bq, b_s, b_group, torch.bfloat16), ref) < 2**-7, name  # + bf16 rounding
    if b_group == 128:  # dgrad: C (M, N) = A · (Wᵀ)ᵀ with W (N, K)'s blocks passed transposed
        wq, w_s = (t.cuda() for t in fq.weight_quant_reference(torch.randn(K, N) * 0.02))
        ref = fg.fp8_gemm_reference(aq, a_s, wq.T, w_s.T, 128)
        for name in FAMILY.candidates(aq, a_s, wq.T, w_s.T, 128)[0]:
            assert _rel(FAMILY.implementations[name].fn(aq, a_s, wq.T, w_s.T, 128), ref) < 2**-10, name

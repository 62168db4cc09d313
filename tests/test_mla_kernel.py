"""kernels/mla_decode.py: the FlashMLA-style Triton kernel and the `mla_decode` op family
(reference, sdpa, triton) against the plain-PyTorch reference.

The kernel runs under Triton's CPU interpreter here (TRITON_INTERPRET=1, set before anything
imports triton; setdefault, so a GPU run can export TRITON_INTERPRET=0 to test the compiled
kernel, which the `gpu` tests below also do in bf16). Shapes are odd on every axis. Every
implementation is held to the family's own tolerance (kernels/mla_decode.py `_tolerance`,
justified there: fp32 1e-5, bf16 2e-2 RMS-relative).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dsbench.variants.attention import cached_attention  # noqa: E402

triton = pytest.importorskip("triton")
from dsbench.kernels import choice  # noqa: E402
from dsbench.kernels import mla_decode as md  # noqa: E402
from dsbench.variants.config import config_from_size  # noqa: E402
from dsbench.variants.decoder import build_model  # noqa: E402

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


# -- every implementation of the family on odd shapes ----------------------------------------------

FAMILY = choice.family("mla_decode")
ODD = [(H, S, Dc, Dr) for H in (1, 7, 16, 128) for S in (1, 63, 896) for Dc, Dr in ((64, 16), (512, 64))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H, S, Dc, Dr", ODD)
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_each_implementation_matches_the_reference(impl, H, S, Dc, Dr, dtype):
    q, kv = _inputs(2, H, S, Dc, Dr, dtype, seed=H + S)
    scale = (Dc // 4 + Dr) ** -0.5  # Dn = Dc/4, as V3 (Dc 512, Dn 128)
    args = (q, kv, Dc, scale)
    out = FAMILY.implementations[impl].fn(*args)
    assert out.shape == (2, H, Dc) and out.dtype == dtype
    assert rel_err(out, md.reference(*args)) <= FAMILY.tolerance(*args)


def test_tolerance_by_dtype(monkeypatch):
    q, kv = _inputs(1, 2, 3, 16, 4)
    assert FAMILY.tolerance(q, kv, 16, 0.5) == 1e-5
    assert FAMILY.tolerance(q.bfloat16(), kv.bfloat16(), 16, 0.5) == 2e-2
    assert FAMILY.tolerance(q.half(), kv.half(), 16, 0.5) == 3e-3
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 on both sides
    assert FAMILY.tolerance(q, kv, 16, 0.5) == 5e-3


# -- the launcher's choices --------------------------------------------------------------------------


def test_all_heads_in_one_program_up_to_the_accumulator_cap():
    assert md._blocks(128, 512, 64) == (64, 512, 64)  # V3: two head blocks, each KV tile read twice
    assert md._blocks(128, 64, 16) == (128, 64, 16)  # a narrow latent: every head in one program
    assert md._blocks(7, 63, 7) == (16, 64, 16)  # tl.dot's sides ≥ 16


@pytest.mark.parametrize("B, S, P", [(1, 16384, 64), (1, 1024, 16), (32, 4096, 2), (64, 4096, 1), (128, 16384, 1), (1, 1, 1)])
def test_split_count_at_v3_shapes_on_132_sms(B, S, P):
    overhead = md._split_overhead_tokens(64, 512, 576 * 2)
    assert overhead == 228
    splits, length = md._splits(B, 2, S, 132, overhead)
    assert (splits, length % md.SPLIT_ALIGN, -(-S // length)) == (P, 0, P)  # aligned, none empty
    assert B * 2 * splits <= 2 * 132 or splits == 1  # at most ~2× the SMs


def test_the_interpreter_tunes_nothing():
    assert all(len(md._tuned(row).configs) == 1 for row in md.GPU_CONFIGS)


# -- the family and the seam -------------------------------------------------------------------------


def test_the_family_is_registered():
    from dsbench.kernels import families

    assert families.MODULES["mla_decode"] == "mla_decode" and choice.family("mla_decode") is FAMILY
    assert set(FAMILY.implementations) == {"reference", "sdpa", "triton"} and FAMILY.reference == "reference"
    assert choice.preview("mla_decode", "auto", "cuda") == "auto(reference|sdpa|triton)"


def test_the_key_buckets_s_and_does_not_sync():
    q, kv = _inputs(2, 4, 70, 16, 4)
    assert FAMILY.key(q, kv, 16, 0.5) == ("cpu", 2, 4, 128, 20, 16, torch.float32)
    assert FAMILY.key(q, kv[:, :65], 16, 0.5) == FAMILY.key(q, kv, 16, 0.5)


def test_auto_picks_a_correct_implementation_on_cpu():
    chooser = choice.Chooser()
    q, kv = _inputs(3, 7, 63, 64, 16)
    out = chooser.run("mla_decode", q, kv, 64, 0.1)
    assert rel_err(out, md.reference(q, kv, 64, 0.1)) <= 1e-5
    [(key, decision)] = chooser.decisions.items()
    assert key[0] == "mla_decode" and decision.name in FAMILY.implementations and decision.why.startswith("auto: ")
    chooser.run("mla_decode", q, kv[:, :40], 64, 0.1)  # the same S bucket: decided already
    assert len(chooser.decisions) == 1


def test_a_pinned_triton_on_cpu_without_the_interpreter_is_one_line(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, kv = _inputs(1, 4, 9, 16, 4)
    with pytest.raises(choice.KernelUnavailable) as err:
        choice.Chooser(pins={"mla_decode": "triton"}).run("mla_decode", q, kv, 16, 0.5)
    assert "\n" not in str(err.value) and str(err.value).startswith("kernels.mla_decode: 'triton' does not run")
    assert "needs a GPU" in choice.check_pins({"mla_decode": "triton"}, "cpu")


def test_mla_decode_goes_through_the_family():
    # The model's absorbed decode (T = 1) calls the family; a pin decides which implementation.
    model = build_model(config_from_size("debug", "mla", "dense")).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = {}
    for impl in FAMILY.implementations:
        with torch.no_grad(), choice.use(choice.Chooser(pins={"mla_decode": impl})) as chooser:
            caches = model.new_caches(2, 9, torch.float32, torch.device("cpu"))
            model(tokens[:, :8], 0, caches)
            logits[impl] = model(tokens[:, 8:], 8, caches)
        assert chooser.ran["mla_decode"] == {impl}  # the prompt's prefill runs the attention family too
        assert chooser.columns()["kernel_mla_decode"] == impl
    assert all(rel_err(logits[i], logits["reference"]) <= 1e-5 for i in logits)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_each_implementation_on_the_gpu_at_v3_shapes(impl):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("export TRITON_INTERPRET=0 to test the compiled kernel")
    q, kv = _inputs(4, 128, 4100, 512, 64, torch.bfloat16, "cuda")
    args = (q, kv, 512, 192 ** -0.5)
    assert rel_err(FAMILY.implementations[impl].fn(*args), md.reference(*args)) <= FAMILY.tolerance(*args)


def test_the_benchmark_writes_every_implementation_in_gpu_checks_format(tmp_path):
    # scripts/gpu_check.sh keeps the JSON ({device, flush, rows}) and the lines starting "device:"/"|".
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "mla.json"
    done = subprocess.run([sys.executable, str(root / "scripts" / "mla_decode_bench.py"), "--device", "cpu", "--batch", "1",
                           "--context", "70", "--reps", "1", "--no-calibrate", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("device: CPU") for line in done.stdout.splitlines())
    saved = json.loads(out.read_text())
    assert set(saved) == {"device", "flush", "rows"}
    assert [r["impl"] for r in saved["rows"]] == ["reference", "sdpa", "triton"]
    assert all(r["rms_rel_err_vs_reference"] <= r["tolerance"] for r in saved["rows"])

"""GEMM microbenchmark: every implementation of the block-scaled FP8 GEMM against BF16 and per-tensor FP8.

    python scripts/fp8_gemm_bench.py [--device auto|cpu|cuda] [--size M,N,K ...] [--reps N] [--json OUT]

C (M, N) = A (M, K) · Bᵀ with B (N, K), as a linear layer's forward (A activations, B weights).
FLOPs = 2·M·N·K (one multiply and one add per term of the sum); TFLOP/s = FLOPs / median time.
Rows, for each size:
- bf16 / torch.mm:               BF16 operands, cuBLAS (the baseline every ×bf16 column divides by).
- fp8-tensorwise / _scaled_mm:   one scale per operand, torch._scaled_mm.
- fp8 / <implementation>:        every implementation of the `fp8_gemm` op family (kernels/fp8_gemm.py:
                                 reference, scaled_mm_loop, triton, cublas), A in 1×128 tiles, B in
                                 128×128 blocks (DeepSeek-V3 §3.3.2); one that does not run here is a
                                 row that says why.
Columns: "gemm" times the GEMM alone on pre-quantised operands; "+quant" times the activation's
quantisation (act_quant of A, or tensor_quant for per-tensor) and the GEMM in one timed call, as a
layer pays it on every call. The weight's quantisation is timed apart: a weight is quantised once
per optimizer step, or once for good when serving. "err vs ref" is the RMS-relative error of an
implementation's FP32 output against the family's reference on the same FP8 operands (the
family's tolerance is 2^-10); "err vs fp32" that of its BF16 output against the FP32 product of
the unquantised operands (quantisation included).
Timing: warm-up calls first (compilation and Triton's autotuning excluded), then the median, p10
and p90 of --reps calls. On CUDA each call is timed with CUDA events and the L2 cache is flushed
before every call (a 256 MiB buffer is zeroed, outside the timed region), so operands come from
HBM; on a CPU time.perf_counter, nothing flushed, and every FP8 row is emulated (no FP8
hardware): correct numbers, meaningless speed. On a GPU below compute capability 8.9 FP8 rows
are emulated too.

Targets, to be measured on a GPU (not yet measured: results/gpu-check-h200 has the old kernel's
488–609 TFLOP/s against bf16 cuBLAS's 752–789 on an H200):
- the best block-wise FP8 implementation ≥ 1.5 × bf16 at V3's aligned shapes (≥ 1.2 × bf16 with
  the activation's quantisation counted); DeepGEMM reports 1,550 TFLOP/s block-wise on an H800;
- our Triton kernel ≥ 1.0 × bf16.
"""

from __future__ import annotations

import argparse

import torch

from dsbench.kernels import choice
from dsbench.kernels import fp8_gemm as fg
from dsbench.kernels import fp8_quant as fq
from dsbench.measure import bench_device, print_and_save, time_calls

# DeepSeek-V3 (hidden 7168, MoE expert width 2048, dense FFN width 18432, q LoRA rank 1536) at 4096
# tokens, a square one, and an unaligned one (every dimension one off a multiple of 128)
GPU_SIZES = [(4096, 7168, 16384), (4096, 7168, 18432), (4096, 18432, 7168), (4096, 24576, 1536),
             (4096, 2048, 7168), (4096, 4096, 4096), (4095, 7167, 2049)]
CPU_SIZES = [(256, 256, 256), (512, 704, 256), (512, 256, 704), (255, 257, 385)]


def bench_size(M: int, N: int, K: int, device: torch.device, reps: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(M, K, device=device, generator=g, dtype=torch.float32).bfloat16()
    b = (torch.randn(N, K, device=device, generator=g, dtype=torch.float32) * 0.02).bfloat16()
    exact = a.float() @ b.float().T  # (M, N) FP32, of the unquantised operands
    shape, flops = (M, N, K), 2 * M * N * K
    emulated = not fg._has_fp8_tensor_cores(device)

    def row(precision, impl, gemm, with_quant, quant, out, err_ref=None, emulated_row=True):
        return _row(precision, impl, shape, flops, gemm, with_quant, quant, _rel(out, exact), err_ref,
                    emulated and emulated_row)

    bf16 = time_calls(lambda: a @ b.T, device, reps)
    rows = [row("bf16", "torch.mm", bf16, bf16, (None, None), a @ b.T, emulated_row=False)]

    (tq, t_s), (uq, u_s) = fq.tensor_quant(a, check_finite=False), fq.tensor_quant(b, check_finite=False)
    quant = (time_calls(lambda: fq.tensor_quant(a, check_finite=False), device, reps),
             time_calls(lambda: fq.tensor_quant(b, check_finite=False), device, reps))
    rows.append(row("fp8-tensorwise", "_scaled_mm",
                    time_calls(lambda: fg.tensorwise_gemm(tq, t_s, uq, u_s, torch.bfloat16), device, reps),
                    time_calls(lambda: fg.tensorwise_gemm(*fq.tensor_quant(a, check_finite=False), uq, u_s, torch.bfloat16), device, reps),
                    quant, fg.tensorwise_gemm(tq, t_s, uq, u_s, torch.bfloat16)))

    (aq, a_s), (bq, b_s) = fq.act_quant(a, check_finite=False), fq.weight_quant(b, check_finite=False)
    quant = (time_calls(lambda: fq.act_quant(a, check_finite=False), device, reps),
             time_calls(lambda: fq.weight_quant(b, check_finite=False), device, reps))
    family = choice.family("fp8_gemm")
    reference = family.implementations[family.reference].fn(aq, a_s, bq, b_s, 128)
    for name, impl in family.implementations.items():
        why_not = impl.runs_on(aq, a_s, bq, b_s, 128, torch.bfloat16)
        if why_not is not None:
            rows.append({"precision": "fp8", "impl": name, "M": M, "N": N, "K": K, "ran": False, "why_not": why_not})
            continue
        gemm = time_calls(lambda: impl.fn(aq, a_s, bq, b_s, 128, torch.bfloat16), device, reps)
        with_quant = time_calls(lambda: impl.fn(*fq.act_quant(a, check_finite=False), bq, b_s, 128, torch.bfloat16), device, reps)
        err_ref = choice.rms_relative_error(impl.fn(aq, a_s, bq, b_s, 128), reference)
        rows.append(row("fp8", name, gemm, with_quant, quant, impl.fn(aq, a_s, bq, b_s, 128, torch.bfloat16), err_ref))
    for r in rows:
        if r.get("ran", True):
            r["x_bf16"] = r["tflops_gemm"] / rows[0]["tflops_gemm"]
            r["x_bf16_with_quant"] = r["tflops_with_quant"] / rows[0]["tflops_gemm"]
    return rows


def _rel(out: torch.Tensor, exact: torch.Tensor) -> float:
    return choice.rms_relative_error(out.float(), exact)


def _row(precision, impl, shape, flops, gemm, with_quant, quant, err_fp32, err_ref, emulated) -> dict:
    act_quant, weight_quant = quant
    return {
        "precision": precision, "impl": impl, "M": shape[0], "N": shape[1], "K": shape[2], "ran": True,
        "gemm_ms_median": 1e3 * gemm["median"], "gemm_ms_p10": 1e3 * gemm["p10"], "gemm_ms_p90": 1e3 * gemm["p90"],
        "n": gemm["n"],
        "with_quant_ms_median": 1e3 * with_quant["median"],
        "act_quant_ms": 1e3 * act_quant["median"] if act_quant else None,
        "weight_quant_ms": 1e3 * weight_quant["median"] if weight_quant else None,
        "tflops_gemm": flops / gemm["median"] / 1e12,
        "tflops_with_quant": flops / with_quant["median"] / 1e12,
        "err_vs_reference": err_ref,
        "err_vs_fp32": err_fp32,
        "emulated": emulated,
    }


def print_table(rows: list[dict]) -> None:
    head = ("precision", "impl", "M×N×K", "gemm ms (p10–p90, n)", "TFLOP/s", "× bf16", "act quant ms", "+quant ms",
            "TFLOP/s +quant", "× bf16 +quant", "weight quant ms", "err vs ref", "err vs fp32", "emulated")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        size = f"{r['M']}×{r['N']}×{r['K']}"
        if not r["ran"]:
            print(f"| {r['precision']} | {r['impl']} | {size} | not run: {r['why_not']} |" + " |" * (len(head) - 4))
            continue
        fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['precision']} | {r['impl']} | {size} | {r['gemm_ms_median']:.3f} ({r['gemm_ms_p10']:.3f}–"
              f"{r['gemm_ms_p90']:.3f}, n={r['n']}) | {r['tflops_gemm']:.3f} | {r['x_bf16']:.2f} | "
              f"{fmt(r['act_quant_ms'])} | {r['with_quant_ms_median']:.3f} | {r['tflops_with_quant']:.3f} | {r['x_bf16_with_quant']:.2f} | "
              f"{fmt(r['weight_quant_ms'])} | {fmt(r['err_vs_reference'], '.1e')} | {r['err_vs_fp32']:.1e} | {r['emulated']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--size", action="append", default=[], help="M,N,K (repeatable); default: a table per device")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device, name, flush = bench_device(args.device)
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.size] or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    print(f"device: {name}; {flush}; TFLOP/s = 2·M·N·K / median time; × bf16 = TFLOP/s ÷ torch.mm's (gemm alone); "
          f"emulated rows: speed means nothing\n")
    rows = [row for shape in sizes for row in bench_size(*shape, device, args.reps)]
    print_and_save(rows, print_table, args.json, name, flush)


if __name__ == "__main__":
    main()

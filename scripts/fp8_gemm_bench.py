"""GEMM microbenchmark: FP8 (block-scaled and per-tensor) against BF16, quantisation apart.

    python scripts/fp8_gemm_bench.py [--device auto|cpu|cuda] [--size M,N,K ...] [--reps N] [--json OUT]

C (M, N) = A (M, K) · Bᵀ with B (N, K), as a linear layer's forward (A activations, B weights).
FLOPs = 2·M·N·K (one multiply and one add per term); TFLOP/s = FLOPs / median time.
For each size:
- bf16:            torch.mm on BF16 operands.
- fp8 (blockwise): A in 1×128 tiles, B in 128×128 blocks (DeepSeek-V3 §3.3.2), block-scaled GEMM
                   (kernels/fp8_gemm.py) on the pre-quantised operands; the quantisation of A and of
                   B is timed separately (a weight is quantised once per optimizer step, or once
                   for good when serving; activations every call).
- fp8-tensorwise:  one scale per operand, torch._scaled_mm.
"gemm" columns time the GEMM alone; "+quant" adds the activation and weight quantisation.
Timing: warm-up calls first (compilation and autotuning excluded), then the median, p10 and p90
of --reps calls. On CUDA each call is timed with CUDA events and the L2 cache is flushed before
every call (a 256 MiB buffer is zeroed, outside the timed region), so operands come from HBM.
On a CPU nothing is flushed and every FP8 row is emulated (no FP8 hardware): correct numbers,
meaningless speed. On a GPU below compute capability 8.9 FP8 rows are emulated too.
"""

from __future__ import annotations

import argparse

import torch

from dsbench.kernels import fp8_gemm as fg
from dsbench.kernels import fp8_quant as fq
from dsbench.measure import bench_device, print_and_save, time_calls

# DeepSeek-V3 (hidden 7168, MoE expert width 2048, dense FFN width 18432, q LoRA rank 1536) at 4096 tokens
GPU_SIZES = [(4096, 7168, 16384), (4096, 7168, 18432), (4096, 18432, 7168), (4096, 24576, 1536),
             (4096, 2048, 7168), (4096, 4096, 4096), (4095, 7167, 2049)]
CPU_SIZES = [(256, 256, 256), (2048, 704, 256), (2048, 256, 704), (1000, 1000, 1000)]
def bench_size(M: int, N: int, K: int, device: torch.device, reps: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(M, K, device=device, generator=g, dtype=torch.float32).bfloat16()
    b = (torch.randn(N, K, device=device, generator=g, dtype=torch.float32) * 0.02).bfloat16()
    flops = 2 * M * N * K
    emulated = not fg._has_fp8_tensor_cores(device)
    rows = [_row("bf16", (M, N, K), flops, time_calls(lambda: a @ b.T, device, reps), None, None, False)]

    (aq, a_s), (bq, b_s) = fq.act_quant(a, check_finite=False), fq.weight_quant(b, check_finite=False)
    gemm = time_calls(lambda: fg.fp8_gemm(aq, a_s, bq, b_s, b_group=128, out_dtype=torch.bfloat16), device, reps)
    quant_a = time_calls(lambda: fq.act_quant(a, check_finite=False), device, reps)
    quant_b = time_calls(lambda: fq.weight_quant(b, check_finite=False), device, reps)
    rows.append(_row("fp8", (M, N, K), flops, gemm, quant_a, quant_b, emulated))

    (tq, t_s), (uq, u_s) = fq.tensor_quant(a, check_finite=False), fq.tensor_quant(b, check_finite=False)
    gemm = time_calls(lambda: fg.tensorwise_gemm(tq, t_s, uq, u_s, out_dtype=torch.bfloat16), device, reps)
    quant_a = time_calls(lambda: fq.tensor_quant(a, check_finite=False), device, reps)
    quant_b = time_calls(lambda: fq.tensor_quant(b, check_finite=False), device, reps)
    rows.append(_row("fp8-tensorwise", (M, N, K), flops, gemm, quant_a, quant_b, emulated))
    return rows


def _row(name, shape, flops, gemm, quant_a, quant_b, emulated) -> dict:
    quant_s = (quant_a["median"] if quant_a else 0.0) + (quant_b["median"] if quant_b else 0.0)
    return {
        "precision": name, "M": shape[0], "N": shape[1], "K": shape[2],
        "gemm_ms_median": 1e3 * gemm["median"], "gemm_ms_p10": 1e3 * gemm["p10"], "gemm_ms_p90": 1e3 * gemm["p90"],
        "n": gemm["n"],
        "act_quant_ms": 1e3 * quant_a["median"] if quant_a else None,
        "weight_quant_ms": 1e3 * quant_b["median"] if quant_b else None,
        "tflops_gemm": flops / gemm["median"] / 1e12,
        "tflops_with_quant": flops / (gemm["median"] + quant_s) / 1e12,
        "emulated": emulated,
    }


def print_table(rows: list[dict]) -> None:
    head = ("precision", "M×N×K", "gemm ms (p10–p90)", "act quant ms", "weight quant ms", "TFLOP/s gemm", "TFLOP/s +quant", "emulated")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {r['precision']} | {r['M']}×{r['N']}×{r['K']} | {r['gemm_ms_median']:.3f} "
              f"({r['gemm_ms_p10']:.3f}–{r['gemm_ms_p90']:.3f}, n={r['n']}) | {fmt(r['act_quant_ms'])} | "
              f"{fmt(r['weight_quant_ms'])} | {r['tflops_gemm']:.3f} | {r['tflops_with_quant']:.3f} | {r['emulated']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--size", action="append", default=[], help="M,N,K (repeatable); default: a table per device")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device, name, flush = bench_device(args.device)
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.size] or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    print(f"device: {name}; {flush}; TFLOP/s = 2·M·N·K / median time; emulated rows: speed means nothing\n")
    rows = [row for shape in sizes for row in bench_size(*shape, device, args.reps)]
    print_and_save(rows, print_table, args.json, name, flush)


if __name__ == "__main__":
    main()

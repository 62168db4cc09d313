"""Causal attention (train and prefill) microbenchmark: every implementation of the `attention`
op family (dsbench/kernels/attention.py) side by side, with its error against the reference.

    python scripts/attention_bench.py [--device auto|cpu|cuda] [--shape B,H,G,T,D ...] [--backward] [--reps N] [--json OUT]

q (B, H, T, D), k and v (B, G, T, D), causal. FLOPs = 2·B·H·T²·D (QKᵀ and PV over the causal
half: 4·B·H·T·D·(T+1)/2, written 2·B·H·T²·D for T ≫ 1); with --backward, ×3.5 (FlashAttention-2's
convention: the backward recomputes the scores, 2.5× the forward). TFLOP/s = FLOPs ÷ median time.
Timing as dsbench.measure.time_calls: warm-up calls first, then the median, p10 and p90 of --reps
calls; CUDA events with the L2 flushed before every call on a GPU, perf_counter on a CPU.
Error: ‖out − ref‖ / ‖ref‖ in float64 against `reference` (plain matmuls, fp32 softmax).
An implementation that does not run on these inputs says why in one line.
"""

from __future__ import annotations

import argparse

import torch

from dsbench.kernels import choice
from dsbench.measure import bench_device, print_and_save, time_calls

# V3's MLA prefill after absorption into MHA form: 128 heads of qk width 192 (V padded to it), 4K tokens
GPU_SHAPES = [(1, 128, 128, 4096, 192), (4, 32, 32, 4096, 128), (8, 16, 16, 2048, 128), (2, 32, 8, 8192, 128)]
CPU_SHAPES = [(8, 8, 8, 256, 32), (4, 4, 4, 512, 64), (2, 8, 2, 1024, 32)]


def bench_shape(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, reps: int, backward: bool) -> list[dict]:
    B, H, G, T, D = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, device=device, generator=g).to(dtype) for n in (H, G, G))
    scale = D ** -0.5
    fam = choice.family("attention")
    ref = fam.implementations["reference"].fn(q, k, v, scale)
    flops = 2 * B * H * T * T * D * (3.5 if backward else 1.0)
    rows = []
    for name, impl in fam.implementations.items():
        row = {"implementation": name, "shape": "×".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."),
               "backward": backward, "why_not": impl.runs_on(q, k, v, scale)}
        if row["why_not"] is None:
            try:
                row.update(_timed(impl.fn, q, k, v, scale, ref, device, reps, backward, flops))
            except RuntimeError as e:  # a backend refusing these inputs
                row["why_not"] = str(e).strip().splitlines()[0][:160]
        rows.append(row)
    return rows


def _timed(fn, q, k, v, scale, ref, device, reps, backward, flops) -> dict:
    with torch.no_grad():
        error = choice.rms_relative_error(fn(q, k, v, scale), ref)
    if backward:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grad = torch.ones_like(ref)
        stats = time_calls(lambda: fn(*leaves, scale).backward(grad), device, reps)
    else:
        with torch.no_grad():
            stats = time_calls(lambda: fn(q, k, v, scale), device, reps)
    return {"ms_median": 1e3 * stats["median"], "ms_p10": 1e3 * stats["p10"], "ms_p90": 1e3 * stats["p90"], "n": stats["n"],
            "tflops": flops / stats["median"] / 1e12, "rms_rel_error": error}


def print_table(rows: list[dict]) -> None:
    head = ("implementation", "B×H×G×T×D", "dtype", "fwd+bwd", "ms (p10–p90)", "TFLOP/s", "error vs reference")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        if r["why_not"]:
            print(f"| {r['implementation']} | {r['shape']} | {r['dtype']} | {r['backward']} | not run: {r['why_not']} | | |")
            continue
        print(f"| {r['implementation']} | {r['shape']} | {r['dtype']} | {r['backward']} | {r['ms_median']:.3f} "
              f"({r['ms_p10']:.3f}–{r['ms_p90']:.3f}, n={r['n']}) | {r['tflops']:.3f} | {r['rms_rel_error']:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--shape", action="append", help="B,H,G,T,D (repeatable); default: V3-like shapes on a GPU, small on a CPU")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--backward", action="store_true", help="time forward + backward (training)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device, name, flush = bench_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    print(f"command: python scripts/attention_bench.py --device {device.type} --reps {args.reps}" + (" --backward" if args.backward else ""))
    print(f"device: {name}; torch threads {torch.get_num_threads()}")
    print(f"timing: median of {args.reps} calls after 3 warm-up calls; {flush}; FLOPs 2·B·H·T²·D" + (" × 3.5 (fwd+bwd)" if args.backward else ""))
    rows = [r for shape in shapes for r in bench_shape(shape, device, dtype, args.reps, args.backward)]
    print_and_save(rows, print_table, args.json, name, flush)


if __name__ == "__main__":
    main()

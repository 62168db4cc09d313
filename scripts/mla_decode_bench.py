"""MLA decode kernel microbenchmark: the Triton kernel (kernels/mla_decode.py) against its PyTorch
reference, over the latent cache, at DeepSeek-V3's attention shape.

    python scripts/mla_decode_bench.py [--device auto|cpu|cuda] [--batch B ...] [--context S ...] [--reps N] [--json OUT]

One decoded token per row: q (B, H, Dc + Dr) with W^UK already folded in, the cache kv (B, S, Dc + Dr)
in bf16 (fp32 on a CPU). V3: H = 128 heads, Dc = kv_lora_rank 512, Dr = qk_rope_head_dim 64
(DeepSeek-V3 §2.1.1), softmax scale (192)^-½ (the query/key width before absorption).
Decode is memory-bound: the figure of merit is the cache bytes read per second, B·S·(Dc+Dr)·bytes
/ median time, against the device's HBM bandwidth. FLOPs = 2·B·H·S·(2·Dc + Dr).
Timing (dsbench.measure.time_calls): warm-up calls first (Triton compilation and autotuning
excluded), then median/p10/p90 of --reps calls; on CUDA, CUDA events per call and the L2 flushed
(256 MiB zeroed) before each, so the cache comes from HBM. Each row also gives the kernel's max
abs error against the reference. On a CPU only the reference runs (Triton needs CUDA here).
"""

from __future__ import annotations

import argparse

import torch

from dsbench.kernels import mla_decode as md
from dsbench.measure import bench_device, print_and_save, time_calls

H, DC, DR = 128, 512, 64  # DeepSeek-V3: heads, kv_lora_rank, qk_rope_head_dim
SCALE = (128 + 64) ** -0.5  # V3's q/k head width before absorption: qk_nope 128 + qk_rope 64
GPU_CASES = [(b, s) for b in (1, 32, 128) for s in (1024, 4096, 16384, 32768) if b * s <= 128 * 16384]
CPU_CASES = [(1, 1024), (8, 1024), (1, 4096)]


def bench_case(B: int, S: int, device: torch.device, reps: int) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, DC + DR, device=device, generator=g).to(dtype)
    kv = torch.randn(B, S, DC + DR, device=device, generator=g).to(dtype)
    cache_bytes = B * S * (DC + DR) * kv.element_size()
    flops = 2 * B * H * S * (2 * DC + DR)
    want = md.reference(q, kv, DC, SCALE).float()
    impls = {"reference": lambda: md.reference(q, kv, DC, SCALE)}
    if device.type == "cuda" and md.triton is not None:
        impls["triton"] = lambda: md.mla_decode_triton(q, kv, DC, SCALE)
    rows = []
    for name, fn in impls.items():
        t = time_calls(fn, device, reps)
        err = float((fn().float() - want).abs().max())
        rows.append({"impl": name, "B": B, "S": S, "dtype": str(dtype).removeprefix("torch."), "ms_median": t["median"] * 1e3,
                     "ms_p10": t["p10"] * 1e3, "ms_p90": t["p90"] * 1e3, "n": t["n"], "cache_gb_per_s": cache_bytes / t["median"] / 1e9,
                     "tflops": flops / t["median"] / 1e12, "max_abs_err_vs_reference": err})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| impl | B | S | dtype | ms (p10–p90) | cache GB/s | TFLOP/s | max abs err vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['B']} | {r['S']} | {r['dtype']} | {r['ms_median']:.3f} ({r['ms_p10']:.3f}–{r['ms_p90']:.3f}, n={r['n']}) "
              f"| {r['cache_gb_per_s']:.1f} | {r['tflops']:.2f} | {r['max_abs_err_vs_reference']:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch", type=int, action="append", default=[])
    parser.add_argument("--context", type=int, action="append", default=[])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device, name, flush = bench_device(args.device)
    cases = ([(b, s) for b in args.batch or [1] for s in args.context or [4096]] if args.batch or args.context
             else GPU_CASES if device.type == "cuda" else CPU_CASES)
    print(f"device: {name}; {flush}; H={H}, Dc={DC}, Dr={DR}; cache GB/s = cache bytes / median time\n")
    rows = [row for B, S in cases for row in bench_case(B, S, device, args.reps)]
    print_and_save(rows, print_table, args.json, name, flush)


if __name__ == "__main__":
    main()

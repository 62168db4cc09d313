"""MLA decode microbenchmark: every implementation of the `mla_decode` op family (kernels/mla_decode.py:
reference, sdpa, triton) side by side over the latent cache, at DeepSeek-V3's attention shape.

    python scripts/mla_decode_bench.py [--device auto|cpu|cuda] [--batch B ...] [--context S ...]
        [--impl NAME ...] [--splits P] [--reps N] [--no-calibrate] [--json OUT]

One decoded token per row: q (B, H, Dc + Dr) with W^UK already folded in, the cache kv (B, S, Dc + Dr)
in bf16 (fp32 on a CPU). V3: H = 128 heads, Dc = kv_lora_rank 512, Dr = qk_rope_head_dim 64
(DeepSeek-V3 §2.1.1), softmax scale (192)^-½ (the query/key width before absorption).
Cases: B 1, 32, 64, 128 × context 1K, 4K, 16K on CUDA; B 1, 8 at 1K and B 1 at 4K on a CPU.

Decode is memory-bound: the figure of merit is the cache read per second,
    cache GB/s = B·S·(Dc + Dr)·bytes / median time,
against the copy ceiling: `copy_` bandwidth (2 × bytes / time) calibrated on this device
(dsbench.hardware.calibrate), or with --no-calibrate the datasheet's HBM bandwidth (none on a CPU).
FLOPs = 2·B·H·S·(2·Dc + Dr). Error: RMS-relative against the reference, ‖out − ref‖ / ‖ref‖ (the
family's measure; its tolerance: kernels/mla_decode.py `_tolerance`).
Timing (dsbench.measure.time_calls): 3 warm-up calls first (Triton compilation and autotuning
excluded), then median/p10/p90 of --reps calls; on CUDA, CUDA events per call and the L2 flushed
(256 MiB zeroed) before each, so the cache comes from HBM; on a CPU, time.perf_counter per call,
no flush (set OMP_NUM_THREADS=1 on a shared machine). Triton runs on a CPU only under
TRITON_INTERPRET=1, where its speed means nothing.

Targets, to be measured on a GPU (not claimed here): with the best implementation ≥ 2.5 TB/s
cache read at B ≥ 32 and context ≥ 4K (FlashMLA reaches ~3 TB/s on H800), and ours (triton) at
least the torch reference's GB/s. Before this kernel (H200, results/gpu-check-h200): triton
393–409 GB/s, reference 622–775 GB/s, against a 4.19 TB/s calibrated copy.
"""

from __future__ import annotations

import argparse
import sys

import torch

from dsbench import hardware
from dsbench.kernels import choice
from dsbench.kernels import mla_decode as md
from dsbench.measure import bench_device, print_and_save, time_calls

H, DC, DR = 128, 512, 64  # DeepSeek-V3: heads, kv_lora_rank, qk_rope_head_dim
SCALE = (128 + 64) ** -0.5  # V3's q/k head width before absorption: qk_nope 128 + qk_rope 64
GPU_CASES = [(b, s) for b in (1, 32, 64, 128) for s in (1024, 4096, 16384)]
CPU_CASES = [(1, 1024), (8, 1024), (1, 4096)]
WARMUP = 3


def copy_ceiling(device: torch.device, dtype: torch.dtype, name: str, calibrate: bool) -> tuple[float | None, str]:
    """(bytes/s, where it comes from): the calibrated copy_ bandwidth, else the datasheet's."""
    if calibrate:
        return hardware.calibrate(device, dtype, budget_s=2.0)["copy_bytes_per_s"], "calibrated copy_"
    if device.type == "cuda" and (bw := hardware.lookup_bandwidth_bytes_per_s(name)):
        return bw, f"datasheet {hardware.match_gpu(name)}"
    return None, "none"


def inputs(B: int, S: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, DC + DR, device=device, generator=g).to(dtype)
    kv = torch.randn(B, S, DC + DR, device=device, generator=g).to(dtype)
    return q, kv


def implementations(names: list[str], splits: int | None) -> dict:
    fam = choice.family("mla_decode")
    impls = {n: fam.implementations[n].fn for n in names or fam.implementations}
    if "triton" in impls and splits is not None:
        impls["triton"] = lambda q, kv, dc, scale: md.mla_decode_triton(q, kv, dc, scale, splits=splits)
    return impls


def bench_case(B: int, S: int, device: torch.device, impls: dict, reps: int, ceiling: tuple[float | None, str],
               splits: int | None = None) -> list[dict]:
    q, kv = inputs(B, S, device)
    args = (q, kv, DC, SCALE)
    cache_bytes = B * S * (DC + DR) * kv.element_size()
    flops = 2 * B * H * S * (2 * DC + DR)
    fam = choice.family("mla_decode")
    want = md.reference(*args)
    rows = []
    for name, fn in impls.items():
        if reason := fam.implementations[name].runs_on(*args):
            _say_once(f"not run: {name}: {reason}")
            continue
        try:
            t = time_calls(lambda: fn(*args), device, reps, warmup=WARMUP)
        except Exception as e:  # noqa: BLE001 — one failing implementation must not lose the others' rows
            _say_once(f"failed: {name} at B={B}, S={S}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        gb_per_s = cache_bytes / t["median"] / 1e9
        rows.append({"impl": name, "B": B, "S": S, "dtype": str(kv.dtype).removeprefix("torch."),
                     "ms_median": t["median"] * 1e3, "ms_p10": t["p10"] * 1e3, "ms_p90": t["p90"] * 1e3, "n": t["n"],
                     "cache_gb_per_s": gb_per_s, "ceiling_gb_per_s": ceiling[0] / 1e9 if ceiling[0] else None,
                     "ceiling_source": ceiling[1], "pct_of_ceiling": 100 * gb_per_s * 1e9 / ceiling[0] if ceiling[0] else None,
                     "tflops": flops / t["median"] / 1e12, "rms_rel_err_vs_reference": choice.rms_relative_error(fn(*args), want),
                     "tolerance": fam.tolerance(*args), "config": _config(name, args, splits)})
    return rows


_said: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line)


def _config(name: str, args, splits: int | None) -> str | None:
    """Triton's head block, split count and autotuned (BLOCK_N, warps, stages), for tuning on a GPU."""
    if name != "triton":
        return None
    p = md.plan(*args[:3], splits=splits)
    best = getattr(md._tuned(p.row), "best_config", None)
    return f"BLOCK_H {p.block_h}, P {p.splits}" + (f", BLOCK_N {best.kwargs['BLOCK_N']} w{best.num_warps} s{best.num_stages}" if best else "")


def print_table(rows: list[dict]) -> None:
    print("| impl | B | S | dtype | ms (p10–p90) | cache GB/s | % of ceiling | TFLOP/s | RMS rel err vs reference (tol) | config |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pct = "-" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.1f}"
        print(f"| {r['impl']} | {r['B']} | {r['S']} | {r['dtype']} | {r['ms_median']:.3f} ({r['ms_p10']:.3f}–{r['ms_p90']:.3f}, n={r['n']}) "
              f"| {r['cache_gb_per_s']:.1f} | {pct} | {r['tflops']:.2f} | {r['rms_rel_err_vs_reference']:.1e} ({r['tolerance']:.0e}) "
              f"| {r['config'] or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch", type=int, action="append", default=[])
    parser.add_argument("--context", type=int, action="append", default=[])
    parser.add_argument("--impl", action="append", default=[], choices=("reference", "sdpa", "triton"),
                        help="an implementation to time (repeatable); default: all")
    parser.add_argument("--splits", type=int, help="triton's split count P (default: the launcher's cost model)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-calibrate", action="store_true", help="the datasheet's HBM bandwidth as the ceiling")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device, name, flush = bench_device(args.device)
    cases = ([(b, s) for b in args.batch or [1] for s in args.context or [4096]] if args.batch or args.context
             else GPU_CASES if device.type == "cuda" else CPU_CASES)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceiling = copy_ceiling(device, dtype, name, not args.no_calibrate)
    clock = "CUDA events per call" if device.type == "cuda" else f"time.perf_counter per call, {torch.get_num_threads()} thread(s)"
    print(f"command: python {' '.join(sys.argv)}")
    interpreted = "; triton runs interpreted (TRITON_INTERPRET=1): its speed means nothing" if md.INTERPRETED else ""
    print(f"timing: {WARMUP} warm-up calls, then the median (p10–p90) of {args.reps}; {clock}; {flush}{interpreted}")
    print(f"device: {name}; {flush}; H={H}, Dc={DC}, Dr={DR}; cache GB/s = cache bytes / median time; "
          f"ceiling: {ceiling[1]}" + (f" {ceiling[0] / 1e9:.0f} GB/s" if ceiling[0] else "") + "\n")
    impls = implementations(args.impl, args.splits)
    rows = [row for B, S in cases for row in bench_case(B, S, device, impls, args.reps, ceiling, args.splits)]
    print_and_save(rows, print_table, args.json, name, flush)


if __name__ == "__main__":
    main()

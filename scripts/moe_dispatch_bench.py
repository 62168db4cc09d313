"""The routed experts' implementations (kernels/grouped_mm.py, op family moe_experts), eager and compiled.

    python scripts/moe_dispatch_bench.py [--quick] [--device auto|cpu|cuda] [--size debug small]
        [--experts 8 64 256] [--tokens 8 1024 2048] [--dtype fp32 bf16] [--load uniform skewed]
        [--compile-tokens 1024] [--compile-load skewed] [--reps N] [--threads N] [--progress] [--json OUT]

One experts block (three expert matmuls, SwiGLU between) on rows already sorted by expert,
timed with each implementation forced: `grouped_mm` (torch._grouped_mm as a custom op),
`padded_bmm` (every expert's rows zero-padded to the busiest expert's count, one torch.bmm) and
`expert_loop` (one expert's SwiGLU at a time, hand-written backward; CPU). All compute the same
rows; padded_bmm multiplies E·max(count) rows where the others multiply Σ count, so
`pad` = E·max(count) ÷ (N·K) is the work it wastes.
Layouts, as the presets build them from the size's dense width d_ff:
- classic (GShard, the `moe` variant): E experts of width d_ff/2, top-2.
- fine (DeepSeekMoE 2401.06066 §3.1, the `deepseekmoe` variant): E experts of width d_ff/8,
  top-8 (E ≥ 64 only: with E = 8 every token would take every expert).
Tokens per step: 8 (a decode step at batch 8), 1024 (moe-cpu, fp8-moe-cpu: 8 × 128) and 2048
(cpu-small, fp8-cpu: 8 × 256); --tokens adds larger ones. Loads: `uniform` (token t takes experts (tK + j) mod E) and
`skewed` (each token draws K distinct experts with probability ∝ 1/rank, Zipf s = 1, a fixed
random ranking of the experts): the freshly initialised gate is near uniform, a trained one is not.
Modes: `fwd` (inference, no autograd) and `fwd+bwd` (training: gradients of rows and weights).
Timing: dsbench.measure's StepTimer and summarize: 3 warm-up calls per path, then the median, p10
and p90 of n calls (perf_counter on CPU, CUDA events on GPU, no cache flush: the experts' weights
are reused step after step). The paths of a case alternate call by call, so load from other
processes falls on both alike; n is cut below --reps so one case stays near 1 s, never below 5. Compiled rows: torch.compile (inductor) of the block with the path fixed,
compile time (the first call) apart; graph breaks and graphs counted by torch._dynamo's counters.
A path that does not compile is reported with its error's first line; padded_bmm and expert_loop
compile with graph breaks (they read the experts' counts on the host), grouped_mm in one graph.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

from dsbench.measure import StepTimer, bench_device, print_and_save, summarize
from dsbench.variants.config import SIZES
from dsbench.kernels.grouped_mm import MOE_EXPERTS, grouped_mm_runs
from dsbench.variants.experts import GroupedExperts
from dsbench.variants.router import uniform_assignment

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("grouped_mm", "padded_bmm", "expert_loop")  # the reference (a Python loop over experts) is the tests' truth
MEASURE_BUDGET_S = 1.0  # one measurement's target time; n is cut to fit (at least MIN_REPS)
MIN_REPS = 5
WARMUP = 3
SKEW_S = 1.0  # Zipf exponent of the skewed load


def layouts(experts: list[int], d_ff: int) -> list[tuple[str, int, int, int]]:
    """(name, E, K, F) for each layout the presets build at these expert counts."""
    out = [("classic", E, 2, d_ff // 2) for E in experts]
    out += [("fine", E, 8, d_ff // 8) for E in experts if E >= 64]
    return out


def expert_counts(n_tokens: int, E: int, K: int, load: str, seed: int = 0) -> torch.Tensor:
    """Rows each expert receives: the load's assignment of n_tokens tokens to K experts each."""
    if load == "uniform":
        ids_NK = uniform_assignment(n_tokens, E, K, "cpu")
    else:
        g = torch.Generator().manual_seed(seed)
        p_E = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** SKEW_S
        p_E = p_E[torch.randperm(E, generator=g)]
        ids_NK = torch.multinomial(p_E.expand(n_tokens, E), K, replacement=False, generator=g)
    return torch.bincount(ids_NK.flatten(), minlength=E)


def make_case(C: int, E: int, K: int, F: int, n_tokens: int, load: str, dtype, device):
    torch.manual_seed(0)
    experts = GroupedExperts(E, C, F).to(device=device, dtype=dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    counts_E = expert_counts(n_tokens, E, K, load)
    x_MC = torch.randn(int(counts_E.sum()), C, device=device, dtype=dtype)
    return experts, x_MC, counts_E.cumsum(0).to(device), counts_E


def step_fn(block, experts: GroupedExperts, x_MC: torch.Tensor, ends_E: torch.Tensor, mode: str):
    """One call of the block as the mode runs it: forward alone, or forward and backward."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return block(x_MC, ends_E)
        return fwd
    x = x_MC.detach().requires_grad_(True)
    grad_MC = torch.randn_like(x_MC)

    def fwd_bwd():
        block(x, ends_E).backward(grad_MC)
        x.grad = None
        for p in experts.parameters():
            p.grad = None
    return fwd_bwd


def timed_interleaved(fns: list, device, reps: int) -> list[dict]:
    """summarize() of each fn's timed calls. The fns alternate call by call (ABAB…, then BABA…)
    after WARMUP untimed calls each, so load from other processes falls on every path alike;
    n is cut below reps to keep one round of all near MEASURE_BUDGET_S."""
    for fn in fns:
        for _ in range(WARMUP):
            fn()
    start = time.perf_counter()
    for fn in fns:
        fn()
    n = max(MIN_REPS, min(reps, int(MEASURE_BUDGET_S / max(time.perf_counter() - start, 1e-9))))
    timers = [StepTimer(device) for _ in fns]
    for i in range(n):
        pairs = list(zip(fns, timers))
        for fn, timer in pairs if i % 2 == 0 else reversed(pairs):
            with timer.step():
                fn()
    return [summarize(t.samples_s()) for t in timers]


def compile_counts() -> dict:
    counters = torch._dynamo.utils.counters
    return {"graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}


def error_line(e: Exception) -> str:
    """The innermost error dynamo wraps (e.g. a meta function's dtype check), on one line."""
    text = str(e)
    inner = re.search(r"got (\w+Error\(.*?\))\s*$", text, re.MULTILINE)
    return (inner.group(1) if inner else text.strip().splitlines()[0])[:200].replace("|", "/")


def prepare(experts, x_MC, ends_E, path: str, mode: str, compiled: bool):
    """(the call to time or None, its row so far). Compiled: the first call compiles, timed apart;
    graph breaks and graphs are the dynamo counters' growth over it."""
    row: dict = {"path": path, "compiled": compiled, "error": None}
    impl = MOE_EXPERTS.implementations[path].fn
    block = lambda x, ends: impl(x, experts.w1_ECF, experts.w3_ECF, experts.w2_EFC, ends)  # noqa: E731
    if not compiled:
        return step_fn(block, experts, x_MC, ends_E, mode), row
    fn = step_fn(torch.compile(block), experts, x_MC, ends_E, mode)
    before, start = compile_counts(), time.perf_counter()
    try:
        fn()
    except Exception as e:  # a path inductor cannot trace: say so, time nothing
        return None, {**row, "error": error_line(e), **compile_counts()}
    row["compile_s"] = time.perf_counter() - start
    return fn, {**row, **{k: v - before[k] for k, v in compile_counts().items()}}


def bench_case(size, layout, n_tokens, dtype_name, load, mode, compiled, device, reps) -> list[dict]:
    name, E, K, F = layout
    C, dtype = SIZES[size]["d_model"], DTYPES[dtype_name]
    experts, x_MC, ends_E, counts_E = make_case(C, E, K, F, n_tokens, load, dtype, device)
    case = {"size": size, "layout": name, "E": E, "K": K, "C": C, "F": F, "tokens": n_tokens, "dtype": dtype_name,
            "load": load, "mode": mode, "rows": int(counts_E.sum()), "max_rows": int(counts_E.max()),
            "empty_experts": int((counts_E == 0).sum()), "pad": E * int(counts_E.max()) / int(counts_E.sum())}
    probe = torch.empty(0, C, device=device, dtype=dtype)
    paths = [p for p in PATHS if (p != "grouped_mm" or grouped_mm_runs(probe) is None) and (p != "expert_loop" or device.type == "cpu")]
    if compiled:
        torch._dynamo.reset()  # one code object compiled per case: dynamo's cache limit is never reached
        torch._dynamo.utils.counters.clear()
    prepared = [prepare(experts, x_MC, ends_E, p, mode, compiled) for p in paths]
    runnable = [(fn, row) for fn, row in prepared if fn is not None]
    stats = timed_interleaved([fn for fn, _ in runnable], device, reps) if runnable else []
    timed_rows = {id(row): st for (_, row), st in zip(runnable, stats)}
    return [{**case, **row, **timed_rows.get(id(row), {})} for _, row in prepared]


def winners(rows: list[dict]) -> list[dict]:
    """Each row with `speedup` = the fastest other path's median ÷ its own (> 1: this path wins)."""
    key = lambda r: tuple(r[k] for k in ("size", "layout", "E", "tokens", "dtype", "load", "mode", "compiled"))  # noqa: E731
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(key(r), []).append(r)
    for group in by_case.values():
        timed_rows = [r for r in group if r.get("median")]
        for r in group:
            others = [o["median"] for o in timed_rows if o is not r]
            r["speedup"] = min(others) / r["median"] if others and r.get("median") else None
    return rows


def print_table(rows: list[dict]) -> None:
    head = ("size", "layout", "E", "K", "F", "tokens", "dtype", "load", "pad", "mode", "compiled", "path",
            "ms median (p10–p90, n)", "other ÷ this", "compile s", "graph breaks", "graphs", "note")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        timing = (f"{1e3 * r['median']:.3f} ({1e3 * r['p10']:.3f}–{1e3 * r['p90']:.3f}, n={r['n']})"
                  if r.get("median") else "-")
        speed = f"{r['speedup']:.2f}" if r.get("speedup") else "-"
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") else "-"
        breaks, graphs = (str(r["graph_breaks"]), str(r["graphs"])) if r["compiled"] else ("-", "-")
        print(f"| {r['size']} | {r['layout']} | {r['E']} | {r['K']} | {r['F']} | {r['tokens']} | {r['dtype']} | "
              f"{r['load']} | {r['pad']:.2f} | {r['mode']} | {'compile' if r['compiled'] else 'eager'} | {r['path']} | "
              f"{timing} | {speed} | {comp} | {breaks} | {graphs} | {r['error'] or ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--size", nargs="+", default=["debug", "small"], choices=sorted(SIZES))
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 1024, 2048])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--load", nargs="+", default=["uniform", "skewed"], choices=("uniform", "skewed"))
    parser.add_argument("--mode", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    parser.add_argument("--compile-tokens", type=int, nargs="*", default=[1024],
                        help="token counts also run under torch.compile (none: eager only)")
    parser.add_argument("--compile-load", nargs="*", default=["skewed"], choices=("uniform", "skewed"),
                        help="loads also run under torch.compile (a compile takes seconds)")
    parser.add_argument("--progress", action="store_true", help="each row on stderr as it is measured")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="one tiny shape per path and mode, eager only")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.size, args.experts, args.tokens, args.dtype, args.load = ["debug"], [8], [16], ["fp32"], ["skewed"]
        args.compile_tokens, args.reps = [], 5  # eager only: a compile takes tens of seconds
    for field in ("experts", "tokens", "reps", "threads"):
        value = getattr(args, field)
        bad = [v for v in (value if isinstance(value, list) else [value]) if v is not None and v < 1]
        if bad:
            parser.exit(2, f"--{field}: {bad[0]} is not allowed (a positive integer)\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, name, _ = bench_device(args.device)
    flush = "no cache flush (weights are reused step after step)"
    print(f"device: {name}; {flush}; threads: {torch.get_num_threads()}; torch {torch.__version__}; "
          f"timing: paths interleaved call by call, {WARMUP} warm-up calls each, median (p10–p90) of n calls; "
          f"'other ÷ this' (the fastest other) > 1: this path wins\n")
    rows = []
    for size in args.size:
        for layout in layouts(args.experts, SIZES[size]["d_ff"]):
            for n_tokens in args.tokens:
                for dtype_name in args.dtype:
                    for load in args.load:
                        for mode in args.mode:
                            also = n_tokens in args.compile_tokens and load in args.compile_load
                            for compiled in (False, True) if also else (False,):
                                case_rows = bench_case(size, layout, n_tokens, dtype_name, load, mode, compiled, device, args.reps)
                                rows += case_rows
                                for row in case_rows if args.progress else ():
                                    print(json.dumps(row), file=sys.stderr, flush=True)
    print_and_save(winners(rows), print_table, args.json, name, flush)


if __name__ == "__main__":
    main()

"""One MoE layer, forward + backward, against the dense SwiGLU with the same activated FLOPs and
against the naive per-expert loop.

    python scripts/moe_layer_bench.py [--size small] [--experts 8 64 256] [--tokens 2048] [--profile]
    python scripts/moe_layer_bench.py --shape fine-64        # the DeepSeekMoE shape below, 1 thread
        [--rounds 21] [--warmup 3] [--threads N] [--clock wall|cpu] [--pin IMPL] [--profile]

Shapes:
- classic (default): GShard top-2 MoE with E experts of width d_ff/2 (`--experts`), so the two
  active experts hold the dense layer's d_ff.
- fine-64: DeepSeekMoE with 64 routed experts, top-6 + 1 shared, expert width 128, d_model 256
  (the small size), 2,048 tokens, against a dense SwiGLU of width 7·128 = 896; one thread unless
  --threads says otherwise.
Activated FLOPs are equal but for the gate (C·E per token). Routing is learned (a freshly
initialised gate: close to uniform but not exactly) and, separately, forced uniform (the best
case): the gap between the two is imbalance cost; the gap between uniform and dense is dispatch
cost. The experts' implementation is the chooser's (auto: measured on the first call, that call
untimed), or --pin's.

Timing: the variants run in interleaved rounds (each round every variant once, the order reversed
every other round) after --warmup untimed rounds, so load from other processes falls on all alike;
each ratio is the median over rounds of that round's ratio, with p20–p80. --clock cpu times with
the thread's CPU time (one thread only): a shared machine's descheduling then costs nothing,
memory contention still does. On a GPU: synchronize around each call, wall clock.
"""

from __future__ import annotations

import argparse
import time

import torch

from dsbench.kernels import choice
from dsbench.variants.config import config_from_size, with_parts
from dsbench.variants.ffn import DenseFFN
from dsbench.variants.dispatch import dispatch_reference
from dsbench.variants.moe import MoEFeedForward

FINE_64 = dict(size="small", tokens=2048, routed=dict(kind="deepseekmoe", granularity=1, n_experts=65, top_k=7, n_shared=1, d_ff=896))


def fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor, params) -> None:
    fn(x).backward(grad)
    x.grad = None
    for p in params:
        p.grad = None


def interleaved(fns: dict, x: torch.Tensor, params: list, warmup: int, rounds: int, clock) -> dict[str, list[float]]:
    """Seconds of every round of each fn (all fns once a round, the order reversed every other)."""
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device)
    names = list(fns)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 else names[::-1]:
            sync(x.device)
            start = clock()
            fwd_bwd(fns[name], x, grad, params)
            sync(x.device)
            if r >= warmup:
                seconds[name].append(clock() - start)
    return seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_layer(layer: MoEFeedForward):
    """The same layer, dispatched by the per-expert Python loop (the reference)."""

    def forward(x_BTC: torch.Tensor) -> torch.Tensor:
        x_NC = x_BTC.flatten(0, 1)
        routing = layer.router(x_NC)
        out = dispatch_reference(x_NC, routing.expert_ids_NK, routing.weights_NK, layer.experts)
        out = out if layer.shared is None else out + layer.shared(x_NC)
        return out.view(x_BTC.shape)

    return forward


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def build(size: str, routed: dict, device):
    base = config_from_size(size, d_ff=routed.get("d_ff", config_from_size(size).ffn.d_ff))
    torch.manual_seed(0)
    dense = DenseFFN(base).to(device)
    learned_cfg = with_parts(base, ffn={"balance": "none", **{k: v for k, v in routed.items() if k != "d_ff"}})
    learned = MoEFeedForward(learned_cfg).to(device).train()
    uniform = MoEFeedForward(with_parts(learned_cfg, ffn={"uniform_routing": True})).to(device).train()
    uniform.load_state_dict(learned.state_dict())
    return base, dense, learned, uniform


def bench(size: str, routed: dict, tokens: int, warmup: int, rounds: int, device, clock, naive: bool) -> dict:
    base, dense, learned, uniform = build(size, routed, device)
    x = torch.randn(1, tokens, base.d_model, device=device, requires_grad=True)
    fns = {"dense": dense, "moe": learned, "moe_uniform": uniform}
    if naive:
        fns["naive_loop"] = naive_layer(learned)
    params = [p for m in (dense, learned, uniform) for p in m.parameters()]
    seconds = interleaved(fns, x, params, warmup, rounds, clock)
    ratio = {n: [d / s for d, s in zip(seconds["dense"], seconds[n])] for n in fns}  # n's speed ÷ dense's, per round
    return {"layout": learned.lay, "implementation": learned.experts.dispatch_label(),
            "tokens_per_s": {n: tokens / quantile(s, 0.5) for n, s in seconds.items()},
            "vs_dense": {n: (quantile(r, 0.5), quantile(r, 0.2), quantile(r, 0.8)) for n, r in ratio.items()}}


def profile_table(size: str, routed: dict, tokens: int, device) -> str:
    _, _, layer, _ = build(size, routed, device)
    x = torch.randn(1, tokens, layer.router.weight.shape[1], device=device, requires_grad=True)
    grad = torch.randn(x.shape, device=device)
    for _ in range(3):
        fwd_bwd(layer, x, grad, list(layer.parameters()))
    with torch.profiler.profile() as prof:
        for _ in range(5):
            fwd_bwd(layer, x, grad, list(layer.parameters()))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("classic", "fine-64"), default="classic")
    parser.add_argument("--size", default="small")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256], help="classic: the E to sweep")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (fine-64: 1 unless given)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: the thread's CPU time (one thread)")
    parser.add_argument("--pin", help="run this moe_experts implementation (default: auto)")
    parser.add_argument("--no-naive", action="store_true", help="leave out the per-expert Python loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table (classic: at 64 experts)")
    args = parser.parse_args()
    if args.shape == "fine-64":
        args.size, args.tokens = FINE_64["size"], FINE_64["tokens"]
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.exit(2, "--clock cpu: times one thread; add --threads 1\n")
    device, clock = torch.device(args.device), time.thread_time if args.clock == "cpu" else time.perf_counter
    shapes = ([("fine-64", FINE_64["routed"])] if args.shape == "fine-64" else
              [(f"classic E={n}", dict(kind="moe", n_experts=n, top_k=2)) for n in args.experts])
    pins = {"moe_experts": args.pin} if args.pin else {}
    print(f"size={args.size} tokens={args.tokens} device={device} threads={torch.get_num_threads()} clock={args.clock} "
          f"fwd+bwd, {args.rounds} interleaved rounds after {args.warmup} warm-up; ×: speed ÷ dense's, median [p20–p80] of rounds")
    with choice.use(choice.Chooser(pins=pins)):
        for name, routed in shapes:
            r = bench(args.size, routed, args.tokens, args.warmup, args.rounds, device, clock, not args.no_naive)
            print(f"{name}: {r['layout']}, experts ran {r['implementation']}")
            for n, tps in r["tokens_per_s"].items():
                med, lo, hi = r["vs_dense"][n]
                print(f"  {n:12s} {tps:>12,.0f} tok/s   ×{med:.3f} [{lo:.3f}–{hi:.3f}]")
            if args.profile and (args.shape == "fine-64" or routed["n_experts"] == 64):
                print(profile_table(args.size, routed, args.tokens, device))


if __name__ == "__main__":
    main()

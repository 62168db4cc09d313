"""One MoE layer, forward + backward, against the dense SwiGLU with the same activated FLOPs and
against the naive per-expert loop.

    python scripts/moe_layer_bench.py [--size small] [--experts 8 64 256] [--tokens 2048] [--profile]

Classic top-2 MoE with E experts of width d_ff/2, so the two active experts hold the dense
layer's d_ff (activated FLOPs equal but for the gate, C·E per token). Each row: median of
`--repeats` timed fwd+bwd steps after `--warmup` untimed ones (perf_counter on CPU; CUDA events
on GPU), tokens/s = tokens / median. Routing is learned (a freshly initialised gate: close to
uniform but not exactly) and, separately, forced uniform (the best case): the gap between the
two is imbalance cost; the gap between uniform and dense is dispatch cost.
"""

from __future__ import annotations

import argparse

import torch

from dsbench.measure import StepTimer, summarize
from dsbench.variants.config import config_from_size, with_parts
from dsbench.variants.ffn import DenseFFN
from dsbench.variants.moe import MoEFeedForward, dispatch_reference


def time_fwd_bwd(fn, x: torch.Tensor, warmup: int, repeats: int) -> float:
    timer = StepTimer(x.device)
    grad = None
    for i in range(warmup + repeats):
        with timer.step(record=i >= warmup):
            out = fn(x)
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
        x.grad = None
    return summarize(timer.samples_s())["median"]


def naive_layer(layer: MoEFeedForward):
    """The same layer, dispatched by the per-expert Python loop (the reference)."""

    def forward(x_BTC: torch.Tensor) -> torch.Tensor:
        x_NC = x_BTC.flatten(0, 1)
        routing = layer.router(x_NC)
        return dispatch_reference(x_NC, routing.expert_ids_NK, routing.weights_NK, layer.experts)

    return forward


def bench(size: str, n_experts: int, tokens: int, warmup: int, repeats: int, device) -> dict:
    base = config_from_size(size)
    torch.manual_seed(0)
    dense = DenseFFN(base).to(device)
    learned_cfg = with_parts(base, ffn={"kind": "moe", "balance": "none", "n_experts": n_experts, "top_k": 2})
    learned = MoEFeedForward(learned_cfg).to(device)
    uniform = MoEFeedForward(with_parts(learned_cfg, ffn={"uniform_routing": True})).to(device)
    uniform.load_state_dict(learned.state_dict())
    x = torch.randn(1, tokens, base.d_model, device=device, requires_grad=True)
    seconds = {
        "dense": time_fwd_bwd(dense, x, warmup, repeats),
        "moe": time_fwd_bwd(learned, x, warmup, repeats),
        "moe_uniform": time_fwd_bwd(uniform, x, warmup, repeats),
        "naive_loop": time_fwd_bwd(naive_layer(learned), x, max(1, warmup // 2), max(3, repeats // 3)),
    }
    return {"experts": n_experts, **{f"{k}_tokens_per_s": tokens / v for k, v in seconds.items()}}


def profile_table(size: str, n_experts: int, tokens: int, device) -> str:
    cfg = with_parts(config_from_size(size), ffn={"kind": "moe", "balance": "none", "n_experts": n_experts, "top_k": 2})
    layer = MoEFeedForward(cfg).to(device)
    x = torch.randn(1, tokens, cfg.d_model, device=device, requires_grad=True)
    time_fwd_bwd(layer, x, 3, 1)
    with torch.profiler.profile() as prof:
        time_fwd_bwd(layer, x, 0, 5)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table at 64 experts")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"size={args.size} tokens={args.tokens} device={device} threads={torch.get_num_threads()} "
          f"fwd+bwd, median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'experts':>8} {'dense tok/s':>12} {'moe tok/s':>10} {'uniform':>10} {'naive':>10} {'moe/dense':>10} {'uniform/dense':>13} {'moe/naive':>10}")
    for n in args.experts:
        r = bench(args.size, n, args.tokens, args.warmup, args.repeats, device)
        print(f"{n:>8} {r['dense_tokens_per_s']:>12,.0f} {r['moe_tokens_per_s']:>10,.0f} {r['moe_uniform_tokens_per_s']:>10,.0f} "
              f"{r['naive_loop_tokens_per_s']:>10,.0f} {r['moe_tokens_per_s'] / r['dense_tokens_per_s']:>10.2f} "
              f"{r['moe_uniform_tokens_per_s'] / r['dense_tokens_per_s']:>13.2f} {r['moe_tokens_per_s'] / r['naive_loop_tokens_per_s']:>10.2f}")
    if args.profile:
        print(profile_table(args.size, 64, args.tokens, device))


if __name__ == "__main__":
    main()

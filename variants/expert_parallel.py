"""Expert parallelism: a routed FFN's experts split across the ranks of a process group.

Each rank holds a contiguous block of E/R routed experts (V3 keeps a group's experts on one
device, so `n_group` groups map onto ranks in order), routes its own tokens, and sends each
assignment's row to the rank holding its expert with `all_to_all_single` (variable splits);
that rank runs its experts on what it received and sends the outputs back, and the sender
combines them with the gate weights. The router, shared experts and everything else are
replicated (data parallel over each rank's own batch).

Legend: N local tokens, C model width, E routed experts, L = E/R local experts, R ranks,
M assignment rows this rank sends (sorted by expert, hence by destination rank), P rows it receives.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .profiling import part


@dataclass
class StepTraffic:
    """What one MoE forward (and its backward) moved; one record per forward."""

    training: bool
    dispatch_s: float = 0.0  # counts exchange + token rows out (and, in training, their backward)
    combine_s: float = 0.0  # expert outputs back (and, in training, their backward)
    bytes_sent: int = 0  # row bytes sent to other ranks (a rank's rows to itself are a local copy)
    rows_received: int = 0  # assignments this rank's experts processed
    tokens: int = 0  # local tokens routed
    ranks_reached: float = 0.0  # sum over local tokens of the distinct ranks its experts sit on


@dataclass
class ExpertShard:
    """This rank's place in the expert-parallel group of one MoE layer."""

    group: object  # torch.distributed ProcessGroup (None: the default group)
    rank: int
    world: int
    n_experts: int  # E, all ranks together
    records: list[StepTraffic] = field(default_factory=list)

    @property
    def n_local(self) -> int:
        return self.n_experts // self.world

    @property
    def first(self) -> int:
        return self.rank * self.n_local

    def timed(self, device: torch.device):
        return _CollectiveClock(device)


class _CollectiveClock:
    """perf_counter around a collective; on CUDA a synchronize before and after, so the time is
    the collective's own and includes waiting for the slowest rank to arrive."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits whose backward is the reverse exchange.

    torch.distributed.nn.functional.all_to_all_single does the same but is deprecated in torch
    2.13 (its successor lives in the private _functional_collectives); this one also times both
    directions into the forward's StepTraffic record.
    """

    @staticmethod
    def forward(ctx, x_MC, out_splits, in_splits, shard: ExpertShard, record: StepTraffic, phase: str):
        ctx.splits, ctx.shard, ctx.record, ctx.phase = (out_splits, in_splits), shard, record, phase
        return _exchange(x_MC, out_splits, in_splits, shard, record, phase)

    @staticmethod
    def backward(ctx, grad_PC):
        out_splits, in_splits = ctx.splits
        grad_MC = _exchange(grad_PC.contiguous(), in_splits, out_splits, ctx.shard, ctx.record, ctx.phase)
        return grad_MC, None, None, None, None, None


def _exchange(x_MC, out_splits, in_splits, shard: ExpertShard, record: StepTraffic, phase: str) -> torch.Tensor:
    out_PC = x_MC.new_empty(sum(out_splits), *x_MC.shape[1:])
    with shard.timed(x_MC.device) as clock:
        dist.all_to_all_single(out_PC, x_MC.contiguous(), out_splits, in_splits, group=shard.group)
    setattr(record, f"{phase}_s", getattr(record, f"{phase}_s") + clock.seconds)
    row_bytes = math.prod(x_MC.shape[1:]) * x_MC.element_size()
    record.bytes_sent += (sum(in_splits) - in_splits[shard.rank]) * row_bytes
    return out_PC


def exchange_counts(send_counts_RL: torch.Tensor, shard: ExpertShard, record: StepTraffic) -> torch.Tensor:
    """Rows per (destination rank, its local expert) out → rows per (source rank, my local expert) in."""
    recv_counts_RL = torch.empty_like(send_counts_RL)
    with shard.timed(send_counts_RL.device) as clock:
        dist.all_to_all_single(recv_counts_RL, send_counts_RL, group=shard.group)
    record.dispatch_s += clock.seconds
    return recv_counts_RL


def run_experts(x_NC: torch.Tensor, token_M: torch.Tensor, ends_E: torch.Tensor, experts, shard: ExpertShard,
                expert_ids_NK: torch.Tensor, training: bool, owner=None) -> torch.Tensor:
    """Expert outputs for the rows x_NC[token_M] (sorted by expert, ends_E its bounds over all E
    experts), computed on the ranks that hold them; rows come back in the same order."""
    record = StepTraffic(training, tokens=x_NC.shape[0], ranks_reached=float(ranks_per_token(expert_ids_NK, shard).sum()))
    shard.records.append(record)
    R, L = shard.world, shard.n_local
    with part("dispatch", owner):
        counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
        send_counts_RL = counts_E.view(R, L).to(torch.int64)
        recv_counts_RL = exchange_counts(send_counts_RL, shard, record)
        in_splits, out_splits = send_counts_RL.sum(dim=1).tolist(), recv_counts_RL.sum(dim=1).tolist()
        received_PC = _AllToAll.apply(x_NC[token_M], out_splits, in_splits, shard, record, "dispatch")
        # Rows arrive by source rank, then by local expert: regroup them by local expert.
        local_P = torch.repeat_interleave(torch.arange(L, device=x_NC.device).repeat(R), recv_counts_RL.flatten())
        order_P = local_P.argsort(stable=True)
        record.rows_received = int(local_P.numel())
    with part("experts", owner):
        ends_L = torch.bincount(local_P, minlength=L).cumsum(0)
        out_sorted_PC = experts(received_PC[order_P], ends_L)
    with part("dispatch", owner):
        out_PC = out_sorted_PC.new_empty(out_sorted_PC.shape).index_copy(0, order_P, out_sorted_PC)
        return _AllToAll.apply(out_PC, in_splits, out_splits, shard, record, "combine")


def ranks_per_token(expert_ids_NK: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """(N,) distinct ranks each token's routed experts sit on (device-limited routing bounds it)."""
    rank_NK = expert_ids_NK // shard.n_local
    hit_NR = torch.zeros(expert_ids_NK.shape[0], shard.world, dtype=torch.bool, device=expert_ids_NK.device)
    hit_NR.scatter_(1, rank_NK, True)
    return hit_NR.sum(dim=1)


@torch.no_grad()
def keep_local_experts(experts: torch.nn.Module, shard: ExpertShard) -> None:
    """Replace the stacked (E, …) expert weights by this rank's (L, …) block, in place."""
    for name, param in list(experts.named_parameters(recurse=False)):
        block = param[shard.first:shard.first + shard.n_local].clone()
        setattr(experts, name, torch.nn.Parameter(block, requires_grad=param.requires_grad))


def all_reduce_sum(t: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """t summed over the ranks (e.g. expert loads, so a replicated routing bias stays identical)."""
    t = t.clone()
    dist.all_reduce(t, group=shard.group)
    return t


# --- the model: which layers are sharded, and their parameters ---


def shard_model(model: torch.nn.Module, group, rank: int, world: int) -> list[ExpertShard]:
    """Split every routed FFN's experts across the ranks (all ranks built the same full model
    from the same seed, so each keeps its block of identical weights)."""
    shards = []
    for _, p in model.parts():
        if hasattr(p, "shard_experts"):
            shard = ExpertShard(group, rank, world, p.lay.n_routed)
            p.shard_experts(shard)
            shards.append(shard)
    return shards


def sharded_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that live on one rank only (the routed experts of sharded layers)."""
    return {id(w) for _, p in model.parts() if getattr(p, "shard", None) is not None for w in p.experts.parameters()}

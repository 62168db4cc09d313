"""Expert parallelism: a routed FFN's experts split across the ranks of a process group.

Each rank holds a contiguous block of E/R routed experts (V3 keeps a group's experts on one
device, so `n_group` groups map onto ranks in order), routes its own tokens, and sends each
assignment's row to the rank holding its expert with `all_to_all_single` (variable splits);
that rank runs its experts on what it received and sends the outputs back, and the sender
combines them with the gate weights. The router, shared experts and everything else are
replicated (data parallel over each rank's own batch).

With redundant experts (EPLB, DeepSeek-V3 §3.4.1) the ranks hold S physical slots each instead:
a placement maps every slot to a logical expert (hot experts get several), and a sender splits an
expert's rows evenly over its replicas; the experts' weights are copies, so outputs are unchanged.

Legend: N local tokens, C model width, E routed experts, L local expert slots (E/R, or S with a
placement), R ranks, M assignment rows this rank sends, P rows it receives, W replicas at most.
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
    load_E: torch.Tensor | None = None  # rows this rank sent to each logical expert (CPU)


@dataclass(frozen=True)
class Placement:
    """Where each logical expert's replicas sit (variants/eplb.py's rebalance_experts, one layer)."""

    phy2log_P: torch.Tensor  # (R·S,) the logical expert in each physical slot; rank r holds slots r·S … (r+1)·S − 1
    log2phy_EW: torch.Tensor  # (E, W) each expert's slots by replica, −1 past its count
    logcnt_E: torch.Tensor  # (E,) replicas per expert


@dataclass
class ExpertShard:
    """This rank's place in the expert-parallel group of one MoE layer."""

    group: object  # torch.distributed ProcessGroup (None: the default group)
    rank: int
    world: int
    n_experts: int  # E, all ranks together
    placement: Placement | None = None  # None: rank r holds logical experts r·E/R … (r+1)·E/R − 1
    records: list[StepTraffic] = field(default_factory=list)

    @property
    def n_slots(self) -> int:
        return self.n_experts if self.placement is None else int(self.placement.phy2log_P.numel())

    @property
    def n_local(self) -> int:
        return self.n_slots // self.world

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
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    record = StepTraffic(training, tokens=x_NC.shape[0], load_E=counts_E.cpu())
    shard.records.append(record)
    R, L = shard.world, shard.n_local
    with part("dispatch", owner):
        order_M, counts_slot = to_slots(counts_E, shard)
        send_rows_M = token_M if order_M is None else token_M[order_M]
        send_counts_RL = counts_slot.view(R, L).to(torch.int64)
        record.ranks_reached = float(ranks_per_token(expert_ids_NK, shard, token_M, order_M, counts_slot).sum())
        recv_counts_RL = exchange_counts(send_counts_RL, shard, record)
        in_splits, out_splits = send_counts_RL.sum(dim=1).tolist(), recv_counts_RL.sum(dim=1).tolist()
        received_PC = _AllToAll.apply(x_NC[send_rows_M], out_splits, in_splits, shard, record, "dispatch")
        order_P, ends_L = by_local_slot(recv_counts_RL)
        record.rows_received = int(order_P.numel())
    with part("experts", owner):
        out_sorted_PC = experts(received_PC[order_P], ends_L)
    with part("dispatch", owner):
        out_PC = unsort(out_sorted_PC, order_P)
        back_MC = _AllToAll.apply(out_PC, in_splits, out_splits, shard, record, "combine")
        return back_MC if order_M is None else unsort(back_MC, order_M)


def by_local_slot(recv_counts_RL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Received rows arrive by source rank, then by local slot: (order that groups them by local
    slot, the groups' ends) for the grouped GEMM."""
    R, L = recv_counts_RL.shape
    local_P = torch.repeat_interleave(torch.arange(L, device=recv_counts_RL.device).repeat(R), recv_counts_RL.flatten())
    return local_P.argsort(stable=True), torch.bincount(local_P, minlength=L).cumsum(0)


def unsort(sorted_XC: torch.Tensor, order_X: torch.Tensor) -> torch.Tensor:
    """Rows taken in `order` put back where they came from (differentiable)."""
    return sorted_XC.new_empty(sorted_XC.shape).index_copy(0, order_X, sorted_XC)


def to_slots(counts_E: torch.Tensor, shard: ExpertShard) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(order of the expert-sorted rows by physical slot, rows per slot). Without a placement the
    slots are the experts (order None). With one, an expert's j-th row goes to replica j mod its
    count: each sender splits a replicated expert's rows evenly."""
    if shard.placement is None:
        return None, counts_E
    pl = shard.placement
    E, M = counts_E.numel(), int(counts_E.sum())
    expert_M = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E, output_size=M)
    within_M = torch.arange(M, device=counts_E.device) - (counts_E.cumsum(0) - counts_E)[expert_M]
    log2phy_EW, logcnt_E = pl.log2phy_EW.to(counts_E.device), pl.logcnt_E.to(counts_E.device)
    slot_M = log2phy_EW[expert_M, within_M % logcnt_E[expert_M]]
    return slot_M.argsort(stable=True), torch.bincount(slot_M, minlength=shard.n_slots)


def ranks_per_token(expert_ids_NK, shard: ExpertShard, token_M=None, order_M=None, counts_slot=None) -> torch.Tensor:
    """(N,) distinct ranks each token's routed experts sit on (device-limited routing bounds it);
    with a placement, the ranks its rows were actually sent to."""
    N = expert_ids_NK.shape[0]
    hit_NR = torch.zeros(N, shard.world, dtype=torch.bool, device=expert_ids_NK.device)
    if shard.placement is None:
        hit_NR.scatter_(1, expert_ids_NK // shard.n_local, True)
    else:
        slot_rank = torch.repeat_interleave(torch.arange(shard.n_slots, device=counts_slot.device) // shard.n_local, counts_slot)
        hit_NR[token_M[order_M], slot_rank] = True
    return hit_NR.sum(dim=1)


@torch.no_grad()
def keep_local_experts(experts: torch.nn.Module, shard: ExpertShard) -> None:
    """Replace the stacked (E, …) expert weights by this rank's (L, …) slots, in place: its block
    of experts, or with a placement copies of the logical experts its slots hold."""
    slots = torch.arange(shard.first, shard.first + shard.n_local)
    logical = slots if shard.placement is None else shard.placement.phy2log_P[slots].cpu()
    for name, param in list(experts.named_parameters(recurse=False)):
        block = param[logical.to(param.device)].clone()
        setattr(experts, name, torch.nn.Parameter(block, requires_grad=param.requires_grad))


def all_reduce_sum(t: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """t summed over the ranks (e.g. expert loads, so a replicated routing bias stays identical)."""
    t = t.clone()
    dist.all_reduce(t, group=shard.group)
    return t


# --- the model: which layers are sharded, and their parameters ---


def routed_layers(model: torch.nn.Module) -> list:
    return [p for _, p in model.parts() if hasattr(p, "shard_experts")]


def shard_model(model: torch.nn.Module, group, rank: int, world: int, placements: list[Placement] | None = None) -> list[ExpertShard]:
    """Split every routed FFN's experts across the ranks (all ranks built the same full model
    from the same seed, so each keeps its block of identical weights); placements: one per
    routed layer (redundant experts), else contiguous blocks."""
    shards = []
    for i, p in enumerate(routed_layers(model)):
        shard = ExpertShard(group, rank, world, p.lay.n_routed, None if placements is None else placements[i])
        p.shard_experts(shard)
        shards.append(shard)
    return shards


def sharded_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that live on one rank only (the routed experts of sharded layers)."""
    return {id(w) for _, p in model.parts() if getattr(p, "shard", None) is not None for w in p.experts.parameters()}

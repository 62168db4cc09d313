"""A cell that spans several processes (`[parallel] ep = R`): the ranks' side of it.

The runner launches the worker under torchrun (`torch.distributed.run`), one process per rank;
each rank joins the process group (gloo on CPU, NCCL on CUDA), builds the same full model from
the cell's seed, keeps its block of routed experts (variants/expert_parallel.py) and trains or
runs on its own slice of a global batch of R × batch_size rows. Replicated parameters get their
gradients averaged over the ranks; the experts' gradients already hold every rank's tokens.
Rank 0 gathers what each rank measured and writes the cell's result.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import math
import os
import re
import signal
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsbench.contention import usable_cores
from dsbench.variants import eplb, expert_parallel, registry
from dsbench.variants.balance import RoutingStats

# A collective that waits longer than this has lost a rank: fail rather than hang (the runner's
# own timeout kills everything anyway; this only makes a crash surface sooner).
COLLECTIVE_TIMEOUT_S = 300


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int
    group: object = None  # None: the default (world) group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expert_parallel_size(cell) -> int:
    return int(cell.parallel.get("ep", 1))


def join(cell) -> Ranks | None:
    """Join the cell's process group (None for a one-process cell)."""
    if expert_parallel_size(cell) == 1:
        return None
    die_with_parent()
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if ranks.world != expert_parallel_size(cell):
        raise RuntimeError(f"parallel.ep = {expert_parallel_size(cell)} but WORLD_SIZE = {ranks.world}")
    if cell.device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    backend = "nccl" if cell.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return ranks


def leave(ranks: Ranks | None) -> None:
    if ranks is not None and dist.is_initialized():
        dist.destroy_process_group()


def failure_message(message: str) -> str:
    """A failed rank's one-line error, naming the rank. gloo opens its errors with a source
    location, "[/path/pair.cc:553] ", that says nothing to a reader (and that a rich console
    would read as a markup tag); the rest says what happened (a peer that died: "Connection
    closed by peer … typically caused by a remote worker crashing")."""
    return f"rank {os.environ.get('RANK', '?')}: " + re.sub(r"\[/[^\]]*\]\s*", "", message)


def die_with_parent() -> None:
    """torchrun starts each rank in its own session, so the runner's killpg on a timeout reaches
    torchrun only: a rank must die with it (Linux PR_SET_PDEATHSIG), or it would hang on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # torchrun already died before the line above
        os._exit(1)


def threads_per_rank(requested: int, ranks: Ranks) -> tuple[int, str]:
    """(threads, why) for one rank: measure.threads, else this machine's cores ÷ ranks. Not
    OMP_NUM_THREADS: torchrun sets it to 1 for every multi-process launch, and the free cores
    cannot be sampled while the other ranks start up beside this one."""
    if requested > 0:
        return requested, "measure.threads"
    cores = usable_cores()
    return max(1, cores // ranks.world), f"cores ÷ ranks: {cores} ÷ {ranks.world}"


class RankSlice:
    """A dataset whose batch(step, B, T) is this rank's B rows of the global R·B-row batch, so the
    ranks together see exactly what one process with batch R·B would."""

    def __init__(self, data, ranks: Ranks):
        self.data, self.ranks = data, ranks

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch(self, step: int, batch_size: int, seq_len: int, split: str = "train"):
        full = self.data.batch(step, batch_size * self.ranks.world, seq_len, split)
        rows = slice(self.ranks.rank * batch_size, (self.ranks.rank + 1) * batch_size)
        return type(full)(full.inputs[rows], full.targets[rows], full.domains[rows])


def shard(model: torch.nn.Module, ranks: Ranks | None, placements: list | None = None) -> list:
    if ranks is None:
        return []
    return expert_parallel.shard_model(model, ranks.group, ranks.rank, ranks.world, placements)


@torch.no_grad()
def eplb_placements(model: torch.nn.Module, ranks: Ranks, inputs_BT: torch.Tensor, redundant: int) -> list:
    """Redundant experts (DeepSeek-V3 §3.4.1) placed by EPLB (variants/eplb.py) from the expert
    load every routed layer sees on a calibration batch (this rank's rows of it, summed over the
    ranks), run through the full model before it is sharded. One placement per routed layer."""
    layers = expert_parallel.routed_layers(model)
    loads = [torch.zeros(p.lay.n_routed, dtype=torch.int64, device=inputs_BT.device) for p in layers]

    def count(i):
        def hook(module, args, routing) -> None:  # returning None leaves the router's output alone
            loads[i].add_(torch.bincount(routing.expert_ids_NK.flatten(), minlength=loads[i].numel()))
        return hook

    hooks = [p.router.register_forward_hook(count(i)) for i, p in enumerate(layers)]
    try:
        model.eval()
        model(inputs_BT)
    finally:
        for h in hooks:
            h.remove()
    for p in layers:  # the calibration forward is not one of the cell's own
        p.stats = RoutingStats(p.lay.n_routed)
    load_LE = torch.stack(loads)
    dist.all_reduce(load_LE, group=ranks.group)
    E, n_group = load_LE.shape[1], registry.module_of("ffn", model.cfg).layout(model.cfg).expert_groups
    phy2log, log2phy, logcnt = eplb.rebalance_experts(load_LE, E + redundant, n_group, 1, ranks.world)
    return [expert_parallel.Placement(phy2log[i], log2phy[i], logcnt[i]) for i in range(len(layers))]


@torch.no_grad()
def sync_gradients(model: torch.nn.Module, ranks: Ranks | None) -> None:
    """Data-parallel gradients: each rank's loss is the mean over its own rows, so the global
    batch's gradient is the mean over ranks. Replicated parameters: all_reduce, ÷ R (one flat
    buffer). Sharded experts already received every rank's gradient through the all-to-all's
    backward (a sum over ranks): ÷ R."""
    if ranks is None:
        return
    sharded = expert_parallel.sharded_parameters(model)
    replicated = [p for p in model.parameters() if p.grad is not None and id(p) not in sharded]
    if replicated:
        flat = torch.cat([p.grad.flatten() for p in replicated])
        dist.all_reduce(flat, group=ranks.group)
        flat /= ranks.world
        for p, g in zip(replicated, flat.split([p.numel() for p in replicated])):
            p.grad.copy_(g.view_as(p.grad))
    for p in model.parameters():
        if id(p) in sharded and p.grad is not None:
            p.grad /= ranks.world


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float, ranks: Ranks | None) -> torch.Tensor:
    """torch's clip_grad_norm_, with the norm over the whole model: the replicated gradients
    (equal on every rank after sync_gradients) once, plus every rank's expert gradients."""
    if ranks is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    sharded = expert_parallel.sharded_parameters(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    own = [g for p in model.parameters() if p.grad is not None and id(p) in sharded for g in [p.grad]]
    total_sq = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=grads[0].device))
    own_sq = sum((g.float().pow(2).sum() for g in own), torch.zeros((), device=grads[0].device))
    shared_sq = total_sq - own_sq
    dist.all_reduce(own_sq, group=ranks.group)
    norm = (shared_sq + own_sq).sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm


def all_rows(t: torch.Tensor, ranks: Ranks | None, dim: int = 0) -> torch.Tensor:
    """Every rank's rows of a (small, CPU) per-row tensor, concatenated in rank order along dim:
    with RankSlice's batches, the global batch's rows in their order."""
    return t if ranks is None else torch.cat(gather(t, ranks), dim=dim)


def gather(obj, ranks: Ranks) -> list:
    """Every rank's obj, in rank order (on each rank)."""
    out = [None] * ranks.world
    dist.all_gather_object(out, obj, group=ranks.group)
    return out


# --- what the ranks measured ---


def timed_samples(timer, ranks: Ranks | None, what: str) -> list[float]:
    """The timer's samples; with ranks, only the steps no rank dropped. The ranks meet at every
    all-to-all, so a step in which one rank did once-only work (the kernel choice timing its
    candidates on a shape only its rows have: each rank receives other rows every step) held
    every rank: it is no sample anywhere. A collective: every rank calls it once, at the end."""
    if ranks is None:
        return timer.samples_s()
    dropped = gather(sorted(timer.dropped_steps), ranks)
    return agreed_samples(timer, dropped, what)


def agreed_samples(timer, dropped_by_rank: list[list[int]], what: str) -> list[float]:
    """The samples of the steps no rank dropped; none left is one line saying why and what to change."""
    union = {step for steps in dropped_by_rank for step in steps}
    samples = timer.samples_without(union)
    if not samples and timer.timed_steps:
        raise RuntimeError(f"no timed step left: each of the {timer.timed_steps} timed steps of {what} did once-only work "
                           f"on some rank (a kernel choice timing its candidates on a new shape, or a compile); give "
                           f"more timed steps, or pin the kernels ([kernels] family = implementation)")
    return samples


def rank_traffic(shards: list, n_timed: int, warmup: int, training: bool) -> dict:
    """This rank's all-to-all traffic over the timed steps: each layer keeps one record per
    forward; the timed ones are the forwards of the timed pass (train: training forwards;
    prefill: inference forwards) after the warm-up ones."""
    per_layer = [[r for r in s.records if r.training == training][warmup:warmup + n_timed] for s in shards]
    steps = max(1, n_timed)
    tokens = sum(r.tokens for r in per_layer[0]) if per_layer else 0
    return {
        "dispatch_s": sum(r.dispatch_s for layer in per_layer for r in layer) / steps,
        "combine_s": sum(r.combine_s for layer in per_layer for r in layer) / steps,
        "bytes_per_token": sum(r.bytes_sent for layer in per_layer for r in layer) / max(1, tokens),
        "rows_received_L": [sum(r.rows_received for r in layer) for layer in per_layer],
        "load_LE": [sum(r.load_E for r in layer).tolist() for layer in per_layer if layer],
        "ranks_reached": sum(r.ranks_reached for layer in per_layer for r in layer),
        "tokens_routed": sum(r.tokens for layer in per_layer for r in layer),
    }


def ep_columns(shards: list, ranks: Ranks, run, warmup: int, training: bool) -> dict:
    """The cell's expert-parallel columns from every rank's traffic and step times (a collective:
    every rank calls it; each gets the same columns)."""
    own = rank_traffic(shards, len(run.step_times_s), warmup, training)
    own["step_s"] = sum(run.step_times_s) / max(1, len(run.step_times_s))
    own["tokens_per_s"] = run.tokens_per_step / statistics.median(run.step_times_s)  # timed_samples: every rank the same steps, ≥ 1
    every = gather(own, ranks)
    mean = lambda key: sum(r[key] for r in every) / len(every)  # noqa: E731
    a2a_s = mean("dispatch_s") + mean("combine_s")
    measured = straggler_factor([r["rows_received_L"] for r in every])
    placed = any(s.placement is not None for s in shards)
    return {
        "a2a_dispatch_ms": 1e3 * mean("dispatch_s"),
        "a2a_combine_ms": 1e3 * mean("combine_s"),
        "a2a_share": a2a_s / mean("step_s"),
        "a2a_bytes_per_token": mean("bytes_per_token"),
        # With redundant experts: what contiguous blocks would have given the same routing, beside the measured
        "ep_straggler_factor": contiguous_straggler_factor(every, ranks.world) if placed else measured,
        "ep_straggler_factor_eplb": measured if placed else None,
        "ranks_per_token": sum(r["ranks_reached"] for r in every) / max(1, sum(r["tokens_routed"] for r in every)),
        "tokens_per_s_per_rank": mean("tokens_per_s"),
    }


def contiguous_straggler_factor(every: list[dict], world: int) -> float | None:
    """straggler_factor of the timed steps' global expert loads had rank r held experts
    r·E/R … (r+1)·E/R − 1 (the placement without redundant experts)."""
    load_LE = torch.tensor([r["load_LE"] for r in every]).sum(dim=0)  # (L, E) over ranks
    per_rank_LR = load_LE.view(load_LE.shape[0], world, -1).sum(dim=-1)
    return straggler_factor(per_rank_LR.T.tolist())


def straggler_factor(rows_RL: list[list[int]]) -> float | None:
    """Max ÷ mean over ranks of the rows each rank's experts received, per layer (summed over the
    timed steps), averaged over the layers: 1 = every rank equally loaded."""
    factors = []
    for layer in zip(*rows_RL):
        mean = sum(layer) / len(layer)
        if mean > 0:
            factors.append(max(layer) / mean)
    return sum(factors) / len(factors) if factors else None

"""Expert-parallel load balancer (EPLB): which GPU holds which routed expert, and which hot
experts get redundant copies.

DeepSeek-V3 §3.4.1 (redundant experts): high-load experts are duplicated and the copies
spread so that every GPU computes about the same number of tokens, rearranging within a
node so cross-node all-to-all traffic does not grow. The algorithm is that of DeepSeek's
EPLB (github.com/deepseek-ai/EPLB, `eplb.py`), re-implemented here with the same semantics
and tie-breaking, so it reproduces their placement (the one their README prints, and theirs
on any load: checked on random and tied loads against their code).

Legend: L MoE layers, E logical experts, R physical experts (replicas, num_replicas),
G expert groups, N nodes, P GPUs, X independent rows (L, or L·N within nodes), I items, M packs.
"""

from __future__ import annotations

import numbers

import torch


def balanced_packing(weight_XI: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put I weighted items into M packs of exactly I/M items each, heaviest item first into
    the lightest pack with room (greedy LPT with a cardinality limit), every row on its own.
    Returns (pack index, rank of the item within its pack), both (X, I)."""
    X, I = weight_XI.shape
    per_pack = I // num_packs
    if per_pack == 1:  # DeepSeek's eplb.py: one item a pack leaves every item where it is
        return torch.arange(I).expand(X, I).clone(), torch.zeros(X, I, dtype=torch.int64)
    rows_X = torch.arange(X)
    pack_load_XM = torch.zeros(X, num_packs, dtype=weight_XI.dtype)
    pack_fill_XM = torch.zeros(X, num_packs, dtype=torch.int64)
    pack_XI = torch.empty(X, I, dtype=torch.int64)
    rank_XI = torch.empty(X, I, dtype=torch.int64)
    # ties as DeepSeek's eplb.py breaks them: torch.sort's own order for equal weights (it is not
    # stable; replicas of one expert always tie), argmin's first lightest pack for Python's min
    for item_X in weight_XI.sort(dim=-1, descending=True).indices.T:
        open_load_XM = pack_load_XM.masked_fill(pack_fill_XM >= per_pack, float("inf"))
        pack_X = open_load_XM.argmin(dim=-1)
        pack_XI[rows_X, item_X] = pack_X
        rank_XI[rows_X, item_X] = pack_fill_XM[rows_X, pack_X]
        pack_fill_XM[rows_X, pack_X] += 1
        pack_load_XM[rows_X, pack_X] += weight_XI[rows_X, item_X]
    return pack_XI, rank_XI


def replicate_experts(weight_XE: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread E logical experts over num_physical ≥ E slots so that the largest load per
    replica is as small as the greedy gets it: slot s < E holds expert s, and each further slot
    goes to the expert with the largest load ÷ replicas so far (the first such on a tie).
    Returns (phy2log (X, R), replica rank (X, R), replica count (X, E))."""
    X, E = weight_XE.shape
    rows_X = torch.arange(X)
    phy2log_XR = torch.arange(num_physical).repeat(X, 1)
    rank_XR = torch.zeros(X, num_physical, dtype=torch.int64)
    count_XE = torch.ones(X, E, dtype=torch.int64)
    for slot in range(E, num_physical):
        hottest_X = (weight_XE / count_XE).argmax(dim=-1)
        phy2log_XR[:, slot] = hottest_X
        rank_XR[:, slot] = count_XE[rows_X, hottest_X]
        count_XE[rows_X, hottest_X] += 1
    return phy2log_XR, rank_XR, count_XE


def _inverse_permutation(perm_XI: torch.Tensor) -> torch.Tensor:
    """inv[x, perm[x, i]] = i, row by row."""
    inv_XI = torch.empty_like(perm_XI)
    return inv_XI.scatter_(1, perm_XI, torch.arange(perm_XI.shape[1]).expand_as(perm_XI).contiguous())


def _groups_to_nodes(weight_LE: torch.Tensor, num_groups: int, num_nodes: int) -> torch.Tensor:
    """Step 1: pack whole expert groups onto nodes by their summed load. Returns each logical
    expert's position in node-major order (L, E): node n owns positions n·E/N … (n+1)·E/N − 1,
    a group's experts stay together in their own order."""
    L, E = weight_LE.shape
    group_size = E // num_groups
    node_LG, rank_in_node_LG = balanced_packing(weight_LE.unflatten(-1, (num_groups, group_size)).sum(-1), num_nodes)
    first_LG = (node_LG * (num_groups // num_nodes) + rank_in_node_LG) * group_size
    return (first_LG.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)


def _place_within_nodes(
    node_weight_XE: torch.Tensor, num_physical: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2 and 3 for each node (a row): replicate its experts to its num_physical slots,
    then pack the replicas, each carrying load ÷ replicas, onto its num_gpus GPUs.
    Returns (node-local expert of each slot, replica rank of each slot, replica count), slots
    numbered GPU-major (GPU g holds slots g·R/P … (g+1)·R/P − 1)."""
    phy2local_XR, rank_XR, count_XE = replicate_experts(node_weight_XE, num_physical)
    replica_load_XR = (node_weight_XE / count_XE).gather(-1, phy2local_XR)
    gpu_XR, rank_in_gpu_XR = balanced_packing(replica_load_XR, num_gpus)
    phy_of_slot_XR = _inverse_permutation(gpu_XR * (num_physical // num_gpus) + rank_in_gpu_XR)
    return phy2local_XR.gather(-1, phy_of_slot_XR), rank_XR.gather(-1, phy_of_slot_XR), count_XE


def rebalance_experts_hierarchical(
    weight_LE: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's hierarchical policy (for group-limited routing): groups to nodes, replicas
    within each node, replicas to the node's GPUs, so no group spans two nodes. weight_LE is a
    float tensor on the CPU (rebalance_experts makes it one). Returns (phy2log (L, R), replica rank (L, R), replica count (L, E))."""
    _check_placement(weight_LE, num_physical, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes:
        raise ValueError(f"num_groups: {num_groups} groups cannot be shared equally by num_nodes = {num_nodes} nodes")
    L, E = weight_LE.shape
    log2pos_LE = _groups_to_nodes(weight_LE, num_groups, num_nodes)
    pos2log_LE = _inverse_permutation(log2pos_LE)
    node_weight_XE = weight_LE.gather(-1, pos2log_LE).view(L * num_nodes, E // num_nodes)
    local_XR, rank_XR, count_XE = _place_within_nodes(node_weight_XE, num_physical // num_nodes, num_gpus // num_nodes)
    node_offset_N1 = (torch.arange(num_nodes) * (E // num_nodes)).view(num_nodes, 1)
    pos_LR = (local_XR.view(L, num_nodes, -1) + node_offset_N1).flatten(-2)
    return pos2log_LE.gather(-1, pos_LR), rank_XR.view(L, -1), count_XE.view(L, -1).gather(-1, log2pos_LE)


def _logical_to_physical(phy2log_LR: torch.Tensor, rank_LR: torch.Tensor, count_LE: torch.Tensor) -> torch.Tensor:
    """log2phy (L, E, max replicas): the slots of each expert's replicas by replica rank, -1 past its count."""
    (L, R), E = phy2log_LR.shape, count_LE.shape[1]
    width = int(count_LE.max())
    log2phy = torch.full((L, E * width), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log_LR * width + rank_LR, torch.arange(R).expand(L, R).contiguous())
    return log2phy.view(L, E, width)


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place num_replicas physical experts (E logical ones plus num_replicas − E redundant
    copies) on num_gpus GPUs in num_nodes nodes, from weight (L, E): each expert's recent load.

    DeepSeek-V3 §3.4.1; github.com/deepseek-ai/EPLB `rebalance_experts`. The hierarchical
    policy when groups divide among nodes (prefill, smaller EP), else the global one: the same
    with one group on one node (decode, larger EP). GPU g holds slots g·R/P … (g+1)·R/P − 1.

    Returns, on weight's device:
      phy2log (L, num_replicas): the logical expert in each physical slot;
      log2phy (L, E, max replicas): each expert's slots by replica rank, -1 padded;
      logcnt (L, E): each expert's number of replicas (≥ 1, summing to num_replicas).
    """
    _check_placement(weight, num_replicas, num_groups, num_nodes, num_gpus)
    weight_LE = weight.detach().float().cpu()  # float32 on the CPU, as DeepSeek's: ties resolve alike
    if num_groups % num_nodes == 0:
        plan = rebalance_experts_hierarchical(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        plan = rebalance_experts_hierarchical(weight_LE, num_replicas, 1, 1, num_gpus)
    phy2log_LR, rank_LR, count_LE = plan
    log2phy_LEW = _logical_to_physical(phy2log_LR, rank_LR, count_LE)
    return phy2log_LR.to(weight.device), log2phy_LEW.to(weight.device), count_LE.to(weight.device)


def _check_placement(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """One clear line for arguments no placement satisfies."""
    if weight.dim() != 2:
        raise ValueError(f"weight: shape {tuple(weight.shape)} is not (layers, experts)")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("weight: loads must be finite and ≥ 0")
    counts = {"num_replicas": num_replicas, "num_groups": num_groups, "num_nodes": num_nodes, "num_gpus": num_gpus}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}: {value!r} is not a positive integer")
    E = weight.shape[1]
    if E % num_groups:
        raise ValueError(f"num_groups: {E} experts do not split into {num_groups} equal groups")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus: {num_gpus} GPUs do not split into num_nodes = {num_nodes} equal nodes")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas: {num_replicas} is not a multiple of num_gpus = {num_gpus} (GPUs hold equal shares)")
    if num_replicas < E:
        raise ValueError(f"num_replicas: {num_replicas} is fewer than the {E} logical experts (each needs a replica)")


def gpu_loads(load: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Tokens each GPU computes (..., P) when each logical expert's load (..., E) splits evenly
    over its logcnt replicas and GPU g holds slots g·R/P … (g+1)·R/P − 1 of phy2log (..., R)."""
    if phy2log.shape[-1] % num_gpus:
        raise ValueError(f"num_gpus: {phy2log.shape[-1]} physical experts do not split over {num_gpus} GPUs")
    per_replica = (load.float() / logcnt).gather(-1, phy2log)
    return per_replica.unflatten(-1, (num_gpus, -1)).sum(-1)


def straggler_factor(load: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """max ÷ mean per-GPU load (...,): how much longer the busiest GPU works than a perfectly
    balanced one; 1 is perfect, nan when nothing was routed."""
    per_gpu = gpu_loads(load, phy2log, logcnt, num_gpus)
    return per_gpu.amax(dim=-1) / per_gpu.mean(dim=-1)

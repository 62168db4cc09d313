"""EPLB: DeepSeek's README example placed exactly as their code places it, the invariants of
every placement on random loads, the greedy steps against brute force and by hand, and the
arguments no placement satisfies."""

from __future__ import annotations

import itertools

import pytest
import torch

from dsbench.variants.eplb import (
    balanced_packing,
    gpu_loads,
    rebalance_experts,
    rebalance_experts_hierarchical,
    replicate_experts,
    straggler_factor,
)

# github.com/deepseek-ai/EPLB README: 2 layers × 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs
README_WEIGHT = torch.tensor(
    [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
)
README_PHY2LOG = torch.tensor(
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
)

# (E experts, R replicas, G groups, N nodes, P GPUs): hierarchical ones, one group a node,
# one expert a GPU, no redundancy, and G % N ≠ 0 (the global policy)
CONFIGS = [
    (12, 16, 4, 2, 8),
    (64, 80, 8, 2, 16),
    (64, 72, 8, 4, 8),
    (32, 40, 4, 4, 8),
    (16, 16, 4, 2, 16),
    (12, 24, 4, 2, 4),
    (24, 32, 6, 4, 8),
    (30, 36, 5, 2, 6),
]


def assert_valid_placement(phy2log, log2phy, logcnt, num_replicas):
    L, E = logcnt.shape
    assert phy2log.shape == (L, num_replicas) and log2phy.shape == (L, E, int(logcnt.max()))
    assert bool((logcnt >= 1).all()) and logcnt.sum(dim=1).tolist() == [num_replicas] * L
    for layer in range(L):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=E), logcnt[layer])
        filled = log2phy[layer] >= 0
        assert torch.equal(filled.sum(dim=1), logcnt[layer])  # -1 only past each expert's count
        assert torch.equal(filled, torch.arange(log2phy.shape[2]) < logcnt[layer].unsqueeze(1))
        slots = log2phy[layer][filled]
        assert sorted(slots.tolist()) == list(range(num_replicas))
        owners = torch.arange(E).unsqueeze(1).expand_as(filled)[filled]
        assert torch.equal(phy2log[layer, slots], owners)


def nodes_of_groups(phy2log, num_experts, num_groups, num_nodes):
    """For each layer, {group: set of nodes holding one of its replicas}."""
    L, R = phy2log.shape
    node_of_slot = torch.arange(R) // (R // num_nodes)
    group_of_slot = phy2log // (num_experts // num_groups)
    return [
        {g: set(node_of_slot[group_of_slot[layer] == g].tolist()) for g in range(num_groups)} for layer in range(L)
    ]


def skewed_load(layers, experts, seed):
    """Zipf-like loads in a random order: a few hot experts, as routers produce."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(layers)])
    return (1000.0 / (1.0 + ranks.float())) * (0.5 + torch.rand(layers, experts, generator=g))


def test_readme_example_is_placed_as_deepseek_prints_it():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(phy2log, README_PHY2LOG)
    assert_valid_placement(phy2log, log2phy, logcnt, 16)
    assert all(len(nodes) == 1 for layer in nodes_of_groups(phy2log, 12, 4, 2) for nodes in layer.values())


def test_readme_example_lowers_the_straggler_factor():
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    # without a balancer: slots in expert order, the 4 spare ones to experts 0…3 whatever their load
    naive_phy2log = (torch.arange(16) % 12).expand(2, 16)
    naive_logcnt = torch.bincount(torch.arange(16) % 12).expand(2, 12)
    before = straggler_factor(README_WEIGHT, naive_phy2log, naive_logcnt, 8)
    after = straggler_factor(README_WEIGHT, phy2log, logcnt, 8)
    assert bool((after <= before).all()) and bool((after >= 1).all()), (before, after)


@pytest.mark.parametrize("E, R, G, N, P", CONFIGS)
def test_random_loads_give_valid_placements(E, R, G, N, P):
    for seed in range(3):
        weight = skewed_load(3, E, seed)
        phy2log, log2phy, logcnt = rebalance_experts(weight, R, G, N, P)
        assert_valid_placement(phy2log, log2phy, logcnt, R)
        assert bool((straggler_factor(weight, phy2log, logcnt, P) >= 1 - 1e-6).all())
        assert torch.allclose(gpu_loads(weight, phy2log, logcnt, P).sum(dim=1), weight.sum(dim=1))


@pytest.mark.parametrize("E, R, G, N, P", [c for c in CONFIGS if c[2] % c[3] == 0])
def test_hierarchical_keeps_each_group_on_one_node(E, R, G, N, P):
    phy2log, _, _ = rebalance_experts(skewed_load(4, E, seed=7), R, G, N, P)
    for layer in nodes_of_groups(phy2log, E, G, N):
        assert all(len(nodes) == 1 for nodes in layer.values()), layer
        assert sorted(n for nodes in layer.values() for n in nodes) == sorted(list(range(N)) * (G // N))


def test_groups_that_nodes_cannot_share_fall_back_to_the_global_policy():
    weight = skewed_load(2, 30, seed=3)
    phy2log, _, logcnt = rebalance_experts(weight, 36, 5, 2, 6)
    global_phy2log, _, global_logcnt = rebalance_experts_hierarchical(weight, 36, 1, 1, 6)
    assert torch.equal(phy2log, global_phy2log) and torch.equal(logcnt, global_logcnt)
    hierarchical_phy2log, _, _ = rebalance_experts(weight, 36, 6, 2, 6)
    assert not torch.equal(phy2log, hierarchical_phy2log)  # the policy really differs


def test_replication_minimises_the_largest_load_per_replica():
    g = torch.Generator().manual_seed(0)
    for E, R in [(3, 7), (4, 8), (5, 9)]:
        weight = torch.rand(4, E, generator=g) * 100
        _, _, count = replicate_experts(weight, R)
        for row in range(4):
            best = min(
                max(w / c for w, c in zip(weight[row].tolist(), counts))
                for counts in itertools.product(range(1, R - E + 2), repeat=E)
                if sum(counts) == R
            )
            assert (weight[row] / count[row]).max().item() == pytest.approx(best, rel=1e-6)


def test_replica_ranks_count_up_per_expert():
    phy2log, rank, count = replicate_experts(torch.tensor([[10.0, 1.0, 4.0]]), 6)
    assert phy2log.tolist() == [[0, 1, 2, 0, 0, 2]]  # 10, then 10/2 = 5 > 4, then 4 > 10/3
    assert rank.tolist() == [[0, 0, 0, 1, 2, 1]] and count.tolist() == [[3, 1, 2]]


def test_packing_puts_the_heaviest_item_into_the_lightest_open_pack():
    pack, rank = balanced_packing(torch.tensor([[10.0, 9.0, 8.0, 1.0]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0]] and rank.tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("items, packs", [(16, 4), (40, 8), (9, 3), (6, 6)])
def test_every_pack_gets_the_same_number_of_items(items, packs):
    weight = skewed_load(3, items, seed=items)
    pack, rank = balanced_packing(weight, packs)
    for row in range(3):
        assert torch.bincount(pack[row], minlength=packs).tolist() == [items // packs] * packs
        assert sorted(zip(pack[row].tolist(), rank[row].tolist())) == [
            (p, r) for p in range(packs) for r in range(items // packs)
        ]


def test_gpu_loads_split_a_replicated_expert_evenly():
    load = torch.tensor([6.0, 3.0, 3.0])
    assert gpu_loads(load, torch.tensor([0, 1, 0, 2]), torch.tensor([2, 1, 1]), 2).tolist() == [6.0, 6.0]
    assert straggler_factor(load, torch.tensor([0, 1, 0, 2]), torch.tensor([2, 1, 1]), 2).item() == 1.0
    unreplicated = torch.tensor([6.0, 3.0, 3.0, 0.0])
    assert straggler_factor(unreplicated, torch.arange(4), torch.ones(4, dtype=torch.int64), 2).item() == 1.5


@pytest.mark.parametrize(
    "weight, args, message",
    [
        (README_WEIGHT, (15, 4, 2, 8), "num_replicas: 15 is not a multiple of num_gpus = 8"),
        (README_WEIGHT, (8, 4, 2, 4), "num_replicas: 8 is fewer than the 12 logical experts"),
        (README_WEIGHT, (16, 5, 1, 8), "num_groups: 12 experts do not split into 5 equal groups"),
        (README_WEIGHT, (16, 4, 3, 8), "num_gpus: 8 GPUs do not split into num_nodes = 3 equal nodes"),
        (README_WEIGHT, (16, 4, 0, 8), "num_nodes: 0 is not a positive integer"),
        (README_WEIGHT[0], (16, 4, 2, 8), r"weight: shape \(12,\) is not \(layers, experts\)"),
        (-README_WEIGHT, (16, 4, 2, 8), "weight: loads must be finite and ≥ 0"),
    ],
)
def test_impossible_arguments_raise_one_clear_line(weight, args, message):
    with pytest.raises(ValueError, match=message) as error:
        rebalance_experts(weight, *args)
    assert "\n" not in str(error.value)


def test_hierarchical_policy_refuses_groups_the_nodes_cannot_share():
    with pytest.raises(ValueError, match="num_groups: 3 groups cannot be shared equally by num_nodes = 2 nodes"):
        rebalance_experts_hierarchical(README_WEIGHT.float(), 16, 3, 2, 8)


def test_gpu_loads_refuse_slots_that_do_not_split_over_the_gpus():
    with pytest.raises(ValueError, match="num_gpus: 16 physical experts do not split over 3 GPUs"):
        gpu_loads(README_WEIGHT, README_PHY2LOG, torch.bincount(README_PHY2LOG[0]).expand(2, 12), 3)

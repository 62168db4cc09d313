"""Routed FFNs: routing rules on hand-built cases, balance losses by hand, dispatch vs the naive
loop, accounting, and the balance metrics a train cell records."""

from __future__ import annotations

import math

import pytest
import torch

from dsbench.data import load_dataset
from dsbench.variants.balance import (
    device_balance_loss,
    expert_balance_loss,
    maxvio,
    sequence_balance_loss,
    update_bias,
)
from dsbench.variants.config import config_from_size, with_parts
from dsbench.variants.decoder import build_model, param_counts
from dsbench.variants.dispatch import combine, dispatch_reference, plan_dispatch
from dsbench.variants.experts import GroupedExperts
from dsbench.variants.moe import MoEFeedForward, layout
from dsbench.variants.router import Router, group_limited, uniform_assignment
from dsbench.variants.precision import PRECISIONS
from dsbench.kernels.grouped_mm import padded_bmm
from dsbench.workloads import Context, run_train


def moe_config(kind="moe", size="debug", **ffn):
    return with_parts(config_from_size(size), ffn={"kind": kind, "balance": ffn.pop("balance", "none"), **ffn})


@torch.no_grad()
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


def router_with(cfg, weight_EC: torch.Tensor) -> Router:
    router = Router(cfg, layout(cfg.ffn))
    with torch.no_grad():
        router.weight.copy_(weight_EC)
    return router


# --- routing on hand-built cases ---


def identity_router(kind="moe", **ffn):
    """A router whose logits equal the input (C = E = 4 experts)."""
    cfg = with_parts(config_from_size("debug", d_model=4, n_heads=1, d_ff=8), ffn={"kind": kind, "n_experts": 4, "top_k": 2, **ffn})
    return router_with(cfg, torch.eye(4))


def test_topk_softmax_gate_weights():
    router = identity_router()
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    r = router(x)
    assert r.expert_ids_NK.tolist() == [[0, 2]]
    probs = torch.softmax(x, -1)[0]
    torch.testing.assert_close(r.weights_NK[0], probs[[0, 2]])  # softmax gates are not renormalised


def test_normalised_and_scaled_v3_router():
    router = identity_router(router="v3", routed_scale=2.5)
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    r = router(x)
    s = torch.sigmoid(x)[0, [0, 2]]
    torch.testing.assert_close(r.weights_NK[0], 2.5 * s / s.sum())
    torch.testing.assert_close(r.scores_NE, torch.sigmoid(x))


def test_bias_changes_selection_but_never_gate_weights():
    router = identity_router(router="sigmoid", balance="bias")
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    with torch.no_grad():
        router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    r = router(x)
    assert sorted(r.expert_ids_NK[0].tolist()) == [0, 3]  # the bias pulled expert 3 in
    s = torch.sigmoid(x)[0, r.expert_ids_NK[0]]
    torch.testing.assert_close(r.weights_NK[0], s / s.sum())  # from the unbiased scores


def test_group_limit_masks_with_minus_inf():
    # 8 experts in 4 groups of 2; keep the 2 best groups by the sum of their top-1 (top_k 2 / 2 groups)
    select = torch.tensor([[0.9, 0.1, 0.2, 0.2, 0.8, 0.0, 0.3, 0.3]])
    masked = group_limited(select, n_group=4, topk_group=2, top_k=2)
    assert torch.isneginf(masked[0, 2:4]).all() and torch.isneginf(masked[0, 6:8]).all()
    torch.testing.assert_close(masked[0, [0, 1, 4, 5]], select[0, [0, 1, 4, 5]])
    # masked groups are −inf, so even all-negative scores never pick a masked expert
    negative = group_limited(-1 - select, n_group=4, topk_group=1, top_k=1)  # group maxima −1.1, −1.2, −1.0, −1.3
    assert torch.isneginf(negative[0, [0, 1, 2, 3, 6, 7]]).all()
    assert negative.topk(1).indices.item() == 5  # a masked 0 would have beaten every kept score


def test_group_limited_router_only_picks_from_kept_groups():
    router = identity_router(n_group=2, topk_group=1)
    # softmax ∝ e^1, e^0.9, e^1.5, e^−5: group 0's top-2 sum 5.18 beats group 1's 4.49 …
    r = router(torch.tensor([[1.0, 0.9, 1.5, -5.0]]))
    assert sorted(r.expert_ids_NK[0].tolist()) == [0, 1]  # … so expert 2 (best alone) is not chosen


# --- balance losses by hand ---


def test_expert_balance_loss_by_hand():
    # N = 2 tokens, E = 4, K = 1: token 0 → expert 0, token 1 → expert 0
    share = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2]])
    ids = torch.tensor([[0], [0]])
    # f = E/(K·N)·count = [4, 0, 0, 0]; P = mean share = [0.55, 0.15, 0.15, 0.15]; Σ f·P = 2.2
    assert float(expert_balance_loss(share, ids, alpha=0.1)) == pytest.approx(0.22)


def test_device_balance_loss_by_hand():
    share = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2]])
    ids = torch.tensor([[0], [2]])
    # f = [2, 0, 2, 0]; devices {0,1}, {2,3}: f' = [1, 1]; P' = [0.55+0.15, 0.15+0.15] = [0.7, 0.3]
    assert float(device_balance_loss(share, ids, n_devices=2, alpha=1.0)) == pytest.approx(1.0)


def test_sequence_balance_loss_by_hand():
    share = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [1.0, 0.0]]])  # B=2, T=2, E=2
    ids = torch.tensor([[[0], [1]], [[0], [0]]])  # seq 0 balanced, seq 1 all on expert 0
    # seq 0: f = [1, 1], P = [.5, .5] → 1; seq 1: f = [2, 0], P = [1, 0] → 2; mean 1.5
    assert float(sequence_balance_loss(share, ids, alpha=1.0)) == pytest.approx(1.5)


def test_bias_update_sign_and_size():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.001, zero_mean=False)  # mean 5
    torch.testing.assert_close(bias, torch.tensor([-0.001, 0.001, 0.001, 0.001]))
    update_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.001, zero_mean=True)
    assert float(bias.sum()) == pytest.approx(0.0, abs=1e-9)


def test_maxvio_on_a_known_load():
    assert float(maxvio(torch.tensor([4, 4, 4, 4]))) == 0.0
    assert float(maxvio(torch.tensor([10, 2, 4, 4]))) == pytest.approx((10 - 5) / 5)


# --- dispatch ---


@pytest.mark.parametrize("C, F", [(16, 8), (12, 10)])  # grouped_mm path; padded-bmm path (rows not 16-byte aligned)
@pytest.mark.parametrize("n_tokens, n_experts, top_k", [(7, 5, 2), (63, 16, 2), (33, 31, 7), (1, 4, 1)])
def test_grouped_dispatch_matches_the_naive_loop_forward_and_backward(n_tokens, n_experts, top_k, C, F):
    torch.manual_seed(0)
    experts = GroupedExperts(n_experts, C, F)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(n_tokens, C, requires_grad=True)
    ids = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    ids[ids == n_experts - 1] = 0  # leave the last expert with no tokens at all
    weights = torch.rand(n_tokens, top_k, requires_grad=True)

    plan = plan_dispatch(ids, weights, n_experts, capacity=None)
    fast = combine(experts(x[plan.token_M], plan.ends_E), plan, n_tokens)
    grad_out = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, [x, weights, *experts.parameters()], grad_out)
    slow = dispatch_reference(x, ids, weights, experts)
    slow_grads = torch.autograd.grad(slow, [x, weights, *experts.parameters()], grad_out)
    # fp32, same products summed in another order: agreement to rounding (RMS-relative 1e-5)
    assert rel_err(fast, slow) < 1e-5
    for g_fast, g_slow in zip(fast_grads, slow_grads):
        assert rel_err(g_fast, g_slow) < 1e-5
    assert float(fast_grads[2][n_experts - 1].abs().sum()) == 0.0  # the idle expert gets no gradient


def test_padded_bmm_matches_grouped_mm():
    torch.manual_seed(0)
    x = torch.randn(11, 8)
    w = torch.randn(4, 8, 12)
    ends = torch.tensor([3, 3, 10, 11])  # expert 1 empty
    expected = torch.cat([x[0:3] @ w[0], x[3:10] @ w[2], x[10:11] @ w[3]])
    torch.testing.assert_close(padded_bmm(x, w, ends), expected)
    torch.testing.assert_close(torch._grouped_mm(x, w, offs=ends.to(torch.int32)), expected)


def test_only_selected_experts_receive_gradient():
    cfg = moe_config(n_experts=8)
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg)
    x = torch.randn(1, 3, cfg.d_model)
    layer(x).sum().backward()
    chosen = set(layer.stats.train_load_SE[-1].nonzero().flatten().tolist())
    touched = {e for e in range(8) if layer.experts.w1_ECF.grad[e].abs().sum() > 0}
    assert touched == chosen and len(chosen) <= 3 * 2


def test_capacity_drops_overflow_in_token_order():
    ids = torch.tensor([[0], [0], [0], [1]])
    plan = plan_dispatch(ids, torch.ones(4, 1), n_experts=2, capacity=2)
    assert plan.dropped == 1
    assert plan.token_M.tolist() == [0, 1, 3]  # token 2 was third in line for expert 0
    assert plan.ends_E.tolist() == [2, 3]


def test_uniform_routing_is_perfectly_balanced():
    ids = uniform_assignment(n_tokens=12, n_experts=8, top_k=2, device="cpu")
    assert torch.bincount(ids.flatten(), minlength=8).tolist() == [3] * 8
    assert all(len(set(row)) == 2 for row in ids.tolist())


# --- accounting ---


@pytest.mark.parametrize("kind", ["moe", "deepseekmoe"])
@pytest.mark.parametrize("first_k_dense", [0, 1])
def test_analytic_params_equal_instantiated(kind, first_k_dense):
    cfg = moe_config(kind, first_k_dense=first_k_dense)
    model = build_model(cfg)
    assert param_counts(cfg)["params_total"] == sum(p.numel() for p in model.parameters())


def test_moe_and_deepseekmoe_match_in_expert_params_and_dense_in_activated():
    moe, ds, dense = moe_config("moe", size="small"), moe_config("deepseekmoe", size="small"), config_from_size("small")
    lay_moe, lay_ds = layout(moe.ffn), layout(ds.ffn)
    C = moe.d_model
    expert_total = lambda lay: 3 * C * (lay.n_routed * lay.expert_d_ff + lay.shared_d_ff)  # noqa: E731
    expert_active = lambda lay: 3 * C * (lay.top_k * lay.expert_d_ff + lay.shared_d_ff)  # noqa: E731
    assert expert_total(lay_moe) == expert_total(lay_ds)
    assert expert_active(lay_moe) == expert_active(lay_ds) == 3 * C * dense.ffn.d_ff
    # Only the gate (C per routed expert) separates the totals and the activated counts.
    gate_gap = C * (lay_ds.n_routed - lay_moe.n_routed) * moe.n_layers
    assert param_counts(ds)["params_total"] - param_counts(moe)["params_total"] == gate_gap
    assert param_counts(ds)["params_active"] - param_counts(moe)["params_active"] == gate_gap
    assert (lay_ds.n_routed, lay_ds.top_k, lay_ds.shared_d_ff) == (63, 7, lay_ds.expert_d_ff)  # DeepSeekMoE 2B's 1 + 63, 7 active


# --- metrics from a real (tiny) train run ---


@pytest.mark.parametrize("balance", ["aux", "bias"])
def test_train_run_records_balance_metrics(balance):
    cfg = moe_config("deepseekmoe", balance=balance, n_experts=4, first_k_dense=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    data = load_dataset("synthetic", 0)
    ctx = Context(model, data, torch.device("cpu"), PRECISIONS["fp32"], warmup=1, repeats=1)
    settings = dict(batch_size=4, seq_len=32, steps=6, lr=3e-3, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_batches=1)
    run = run_train(ctx, settings)
    metrics = {p[1] for p in run.series}
    assert {"maxvio_batch", "expert_load", "router_entropy", "routing_by_domain"} <= metrics
    s = run.summary
    assert s["maxvio_global_source"] == "eval" and s["maxvio_global"] >= 0
    assert 0 <= s["dead_expert_fraction"] <= 1 and s["router_entropy"] > 0
    per_step = [p for p in run.series if p[1] == "maxvio_batch" and p[3] is None]
    assert len(per_step) == 6  # one per step: the mean over the routed layers
    loads = [p for p in run.series if p[1] == "expert_load" and p[0] == 0]
    assert {p[3] for p in loads} == {1}  # layer 0 stayed dense (first_k_dense = 1)
    assert sum(p[2] for p in loads) == 4 * 32 * layout(cfg.ffn).top_k
    share = {}
    for p in run.series:
        if p[1] == "routing_by_domain":
            share[p[5]] = share.get(p[5], 0.0) + p[2]
    assert all(math.isclose(v, 1.0, rel_tol=1e-5) for v in share.values())
    if balance == "aux":
        assert s["aux_loss_final"] > 0
    else:
        bias = [p[2] for p in run.series if p[1] == "expert_bias"]
        assert any(b != 0 for b in bias) and s["aux_loss_final"] is None

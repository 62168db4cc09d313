"""The routed layer against DeepSeek-V3's own code (deepseek-ai/DeepSeek-V3 inference/model.py,
`Gate.forward` and `MoE.forward`, restated below with its weights taken from our layer), forward
and backward, through every moe_experts implementation: whatever runs the experts, the layer
computes what DeepSeek's does, to fp32 rounding (RMS-relative 1e-6: the same products, summed in
another order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsbench.kernels import choice
from dsbench.variants.config import config_from_size, with_parts
from dsbench.variants.moe import MoEFeedForward

IMPLEMENTATIONS = ("reference", "grouped_mm", "padded_bmm", "expert_loop")


def v3_gate(x, weight, bias, score_func, n_groups, topk_groups, topk, route_scale):
    """DeepSeek-V3 inference/model.py Gate.forward, restated (bias: their e-score correction,
    present in V3 itself; its group score is then the sum of each group's top 2)."""
    scores = F.linear(x, weight)
    scores = scores.softmax(dim=-1, dtype=torch.float32) if score_func == "softmax" else scores.sigmoid()
    original_scores = scores
    if bias is not None:
        scores = scores + bias
    if n_groups > 1:
        scores = scores.view(x.size(0), n_groups, -1)
        group_scores = scores.amax(dim=-1) if bias is None else scores.topk(2, dim=-1)[0].sum(dim=-1)
        indices = group_scores.topk(topk_groups, dim=-1)[1]
        mask = scores.new_ones(x.size(0), n_groups, dtype=bool).scatter_(1, indices, False)
        scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, topk, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    if score_func == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * route_scale).type_as(x), indices


def v3_moe(layer: MoEFeedForward, x, score_func, n_groups, topk_groups, route_scale):
    """DeepSeek-V3 inference/model.py MoE.forward, restated (one rank): a loop over experts."""
    shape = x.size()
    x = x.view(-1, shape[-1])
    bias = layer.router.expert_bias_E if layer.router.use_bias else None
    weights, indices = v3_gate(x, layer.router.weight, bias, score_func, n_groups, topk_groups, layer.lay.top_k, route_scale)
    y = torch.zeros_like(x)
    counts = torch.bincount(indices.flatten(), minlength=layer.lay.n_routed).tolist()
    ex = layer.experts
    for i in range(layer.lay.n_routed):
        if counts[i] == 0:
            continue
        idx, top = torch.where(indices == i)
        expert = lambda h: (F.silu(h @ ex.w1_ECF[i]) * (h @ ex.w3_ECF[i])) @ ex.w2_EFC[i]  # noqa: E731  w2(silu(w1 x) * w3 x)
        y = y.index_add(0, idx, expert(x[idx]) * weights[idx, top, None])  # their y[idx] += …, out of place for autograd
    z = layer.shared(x) if layer.shared is not None else 0
    return (y + z).view(shape)


CASES = {
    # V3's router: sigmoid affinities, bias-adjusted selection, 8 groups of which 4 are kept, top-8, scale 2.5
    "v3-sigmoid-bias-groups": (dict(router="v3", balance="bias", n_experts=4, top_k=2, granularity=4, n_shared=0,
                                    n_group=8, topk_group=4, routed_scale=2.5), ("sigmoid", 8, 4, 2.5)),
    # DeepSeekMoE's: softmax gates, not renormalised, 1 shared expert + 15 routed, top-7
    "softmax-shared": (dict(router="softmax", balance="aux", n_experts=4, top_k=2, granularity=4, n_shared=1), ("softmax", 1, 1, 1.0)),
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_the_layer_computes_what_deepseek_v3s_code_computes(case, impl):
    ffn, (score_func, n_groups, topk_groups, scale) = CASES[case]
    cfg = with_parts(config_from_size("debug"), ffn={"kind": "deepseekmoe", **ffn})
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg).train()
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)  # well-separated scores: no near-tie for rounding to flip
        layer.router.expert_bias_E.uniform_(-0.1, 0.1)  # a bias that changes selections (used only by bias balancing)
    x = torch.randn(2, 24, cfg.d_model, requires_grad=True)
    params = [x, *layer.parameters()]
    with choice.use(choice.Chooser(pins={"moe_experts": impl})):
        ours = layer(x)
    theirs = v3_moe(layer, x, score_func, n_groups, topk_groups, scale)
    assert layer.experts.dispatch_label() == impl
    rel = lambda a, b: float((a - b).detach().norm() / b.detach().norm())  # noqa: E731
    assert rel(ours, theirs) < 1e-6
    grad = torch.randn_like(ours)
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(theirs, params, grad)):
        assert rel(g_ours, g_theirs) < 1e-6

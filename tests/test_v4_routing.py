"""DeepSeek-V4's routing against Hugging Face's deepseek_v4 (tests/hf_deepseek_v4.py) with the
same weights, fp32: the top-k router for each score V4 supports (sigmoid, as our router = v3;
sqrtsoftplus) chooses the same experts and gives the same gate weights, and the whole sparse
block (shared expert + routed experts) computes the same output. Router weights are drawn wide so
no near-tie can flip a top-k choice under rounding."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_spec_text

from dsbench.kernels import choice
from dsbench.kernels.grouped_mm import MOE_EXPERTS
from dsbench.results import load_results
from dsbench.variants.balance import update_bias
from dsbench.variants.config import config_from_size, with_parts
from dsbench.variants.dispatch import plan_dispatch, sum_rows
from dsbench.variants.moe import MoEFeedForward
import hf_deepseek_v4

# our router value → HF's scoring_func (HF always renormalises the top-k weights and scales them)
SCORES = {"v3": "sigmoid", "sqrtsoftplus": "sqrtsoftplus"}
TOL = 1e-5


def layers(router: str, balance: str = "bias", swiglu_limit: float = 0.0):
    """Our routed layer (1 shared + 15 routed experts, top-7) and HF's sparse block, same weights."""
    cfg = with_parts(config_from_size("debug"), ffn={"kind": "deepseekmoe", "router": router, "balance": balance,
                                                     "n_experts": 4, "top_k": 2, "granularity": 4, "n_shared": 1,
                                                     "routed_scale": 1.5, "swiglu_limit": swiglu_limit})
    torch.manual_seed(0)
    ours = MoEFeedForward(cfg).eval()
    with torch.no_grad():
        ours.router.weight.normal_(std=0.5)
        ours.router.expert_bias_E.uniform_(-0.1, 0.1)
    lay = ours.lay
    hf_cfg = hf_deepseek_v4.configuration().DeepseekV4Config(
        hidden_size=cfg.d_model, n_routed_experts=lay.n_routed, num_experts_per_tok=lay.top_k,
        moe_intermediate_size=lay.expert_d_ff, n_shared_experts=1, scoring_func=SCORES[router],
        routed_scaling_factor=1.5, swiglu_limit=swiglu_limit or 1e9,  # ours: 0 = no clamp
        num_hidden_layers=2, mlp_layer_types=["moe", "moe"])
    theirs = hf_deepseek_v4.modeling().DeepseekV4SparseMoeBlock(hf_cfg, layer_idx=hf_cfg.num_hidden_layers - 1).eval()
    assert not theirs.is_hash
    copy_weights(ours, theirs)
    return ours, theirs


@torch.no_grad()
def copy_weights(ours: MoEFeedForward, theirs) -> None:
    theirs.gate.weight.copy_(ours.router.weight)
    theirs.gate.e_score_correction_bias.copy_(ours.router.expert_bias_E)
    ex = ours.experts
    theirs.experts.gate_up_proj.copy_(torch.cat([ex.w1_ECF, ex.w3_ECF], dim=-1).transpose(1, 2))  # (E, 2F, C)
    theirs.experts.down_proj.copy_(ex.w2_EFC.transpose(1, 2))  # (E, C, F)
    for name, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        getattr(theirs.shared_experts, proj).weight.copy_(getattr(ours.shared, name).weight)


@pytest.mark.parametrize("router", SCORES)
def test_the_router_chooses_and_weighs_as_hfs_topk_router(router):
    ours, theirs = layers(router)
    x_NC = torch.randn(48, ours.router.weight.shape[1])
    routing = ours.router(x_NC)
    _, weights, indices = theirs.gate(x_NC)
    ours_sorted, order = routing.expert_ids_NK.sort(dim=-1)  # HF's top-k is unsorted
    theirs_sorted, their_order = indices.sort(dim=-1)
    assert torch.equal(ours_sorted, theirs_sorted)
    gap = (routing.weights_NK.gather(1, order) - weights.gather(1, their_order)).abs().max().item()
    assert gap <= TOL, gap


@pytest.mark.parametrize("router", SCORES)
def test_the_sparse_block_computes_what_hfs_computes(router):
    ours, theirs = layers(router)
    x_BTC = torch.randn(2, 24, ours.router.weight.shape[1])
    gap = (ours(x_BTC) - theirs(x_BTC)).abs().max().item()
    assert gap <= TOL, gap


LIMIT = 0.05  # small enough that the debug model's gate and up projections hit the clamp


@pytest.mark.parametrize("impl", MOE_EXPERTS.implementations)
def test_the_clamped_experts_compute_what_hfs_compute(impl):
    """HF DeepseekV4Experts with swiglu_limit, same routing and weights: the routed output, through
    every moe_experts implementation; the clamp really bites (it changes the output)."""
    ours, theirs = layers("sqrtsoftplus", swiglu_limit=LIMIT)
    x_NC = torch.randn(48, ours.router.weight.shape[1])
    routing = ours.router(x_NC)
    plan = plan_dispatch(routing.expert_ids_NK, routing.weights_NK, ours.lay.n_routed, None)
    with choice.use(choice.Chooser(pins={"moe_experts": impl})):
        mine = sum_rows(ours.run_experts(x_NC, plan, routing), plan, x_NC.shape[0])
    assert ours.experts.dispatch_label() == impl
    hf = theirs.experts(x_NC, routing.expert_ids_NK, routing.weights_NK)
    gap = (mine - hf).abs().max().item()
    assert gap <= TOL, gap
    theirs.experts.limit = 1e9
    assert (theirs.experts(x_NC, routing.expert_ids_NK, routing.weights_NK) - hf).abs().max() > 100 * TOL


@pytest.mark.parametrize("impl", [name for name in MOE_EXPERTS.implementations if name != "reference"])
def test_the_clamp_keeps_every_implementations_backward_right(impl):
    """Gradients of x, the three weights and the gate weights against autograd of the reference."""
    torch.manual_seed(1)
    E, C, F_, M = 4, 8, 6, 20
    ends_E = torch.tensor([5, 5, 12, 20])  # expert 1 empty
    leaves = [torch.randn(M, C), torch.randn(E, C, F_), torch.randn(E, C, F_), torch.randn(E, F_, C), torch.rand(M)]
    runs = []
    for name in ("reference", impl):
        args = [t.clone().requires_grad_() for t in leaves]
        x, w1, w3, w2, weight = args
        out = MOE_EXPERTS.implementations[name].fn(x, w1, w3, w2, ends_E, weight, 1.0)
        runs.append((out, torch.autograd.grad(out, args, torch.ones_like(out))))
    (ref, ref_grads), (got, got_grads) = runs
    assert (ref - got).abs().max() <= TOL
    for a, b in zip(ref_grads, got_grads):
        assert (a - b).abs().max() <= TOL * max(1.0, a.abs().max().item())


def test_bias_balancing_with_sqrtsoftplus_moves_selection_toward_the_underloaded_experts():
    """One V3 §2.1.2 bias step on sqrtsoftplus scores: overloaded experts' bias falls, underloaded
    ones' rises, and the next choice (ours and HF's, given the same bias) stays identical."""
    ours, theirs = layers("sqrtsoftplus")
    x_NC = torch.randn(256, ours.router.weight.shape[1])
    load_E = torch.bincount(ours.router(x_NC).expert_ids_NK.flatten(), minlength=ours.lay.n_routed).float()
    before = ours.router.expert_bias_E.clone()
    update_bias(ours.router.expert_bias_E, load_E, 0.01, False)
    step_E = ours.router.expert_bias_E - before
    over, under = load_E > load_E.mean(), load_E < load_E.mean()
    assert (step_E[over] < 0).all() and (step_E[under] > 0).all()
    with torch.no_grad():
        theirs.gate.e_score_correction_bias.copy_(ours.router.expert_bias_E)
    mine = ours.router(x_NC).expert_ids_NK.sort(dim=-1).values
    assert torch.equal(mine, theirs.gate(x_NC)[2].sort(dim=-1).values)


def run_sweep(spec, out):
    return subprocess.run([sys.executable, "-m", "dsbench", "run", "sweep", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)


REFUSALS = [  # (the [ffn] line, what the one-line error must say)
    ('router = "sqrtsoft"', ("ffn.router", "'sqrtsoft'", "allowed: softmax, sigmoid, v3, sqrtsoftplus")),
    ('router = "softplus"', ("ffn.router", "'softplus'", "allowed: softmax, sigmoid, v3, sqrtsoftplus")),
    ("swiglu_limit = -1.0", ("ffn.swiglu_limit", "-1.0", "≥ 0")),
]


@pytest.mark.parametrize("line, needles", REFUSALS)
def test_a_bad_v4_routing_value_is_refused_in_one_line(tmp_path, line, needles):
    spec = tmp_path / "bad.toml"
    spec.write_text(f'name = "x"\ndevice = "cpu"\n[ffn]\n{line}\n[axes]\nffn = ["deepseekmoe"]\n')
    done = run_sweep(spec, tmp_path / "r")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_tiny_sweep_over_the_v4_scores_runs_every_workload(tmp_path):
    spec = tmp_path / "v4.toml"
    text = tiny_spec_text(name="v4").replace("[axes]\n", '[axes]\nffn = ["deepseekmoe"]\n"ffn.router" = ["v3", "sqrtsoftplus"]\n'
                                             'balance = ["bias"]\n"ffn.swiglu_limit" = [10.0]\n')
    spec.write_text(text)
    done = run_sweep(spec, tmp_path / "r")
    assert done.returncode == 0, done.stderr[-3000:]
    cells = load_results(tmp_path / "r").cells
    assert (cells["status"] == "ok").all()
    assert {(r, w) for r, w in zip(cells["router"], cells["workload"])} == {
        (r, w) for r in ("v3", "sqrtsoftplus") for w in ("train", "prefill", "decode")}

"""mHC (variants/mhc.py) against Hugging Face's DeepseekV4HyperConnection / DeepseekV4HyperHead
with the same weights, fp32: every output within 1e-5 max abs."""

from __future__ import annotations

import pytest
import torch

from dsbench.variants import mhc
from tests import hf_deepseek_v4

D, N, ITERS = 32, 4, 20  # V4's hc_mult and hc_sinkhorn_iters (HF config defaults)
TOL = 1e-5  # fp32, same op order as HF: only reduction-order rounding differs


def hf_config():
    cfg_mod = hf_deepseek_v4.configuration()
    return cfg_mod.DeepseekV4Config(hidden_size=D, hc_mult=N, hc_sinkhorn_iters=ITERS, num_hidden_layers=1)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights (base and scale away from their 0 / 1 init, so every term is tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def streams(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, N, D, generator=torch.Generator().manual_seed(seed))


def test_hyper_connection_matches_hf():
    hf_cfg = hf_config()
    ours = randomized(mhc.HyperConnection(D, N, ITERS, hf_cfg.hc_eps, hf_cfg.rms_norm_eps), seed=1)
    ref = hf_deepseek_v4.modeling().DeepseekV4HyperConnection(hf_cfg).float()
    ref.load_state_dict(ours.state_dict())
    x = streams()
    for a, b in zip(ours(x), ref(x)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= TOL


def test_sinkhorn_output_is_doubly_stochastic():
    """Columns sum to 1 (up to eps) after the last column pass; rows converge geometrically, at
    a rate set by the matrix: with these peaked random logits 20 iterations leave rows within
    1e-2 (measured ~2e-3), and 200 iterations within 1e-5."""
    hf_cfg = hf_config()
    x = streams(3)
    for iters, row_tol in ((ITERS, 1e-2), (200, 1e-5)):
        hc = randomized(mhc.HyperConnection(D, N, iters, hf_cfg.hc_eps, hf_cfg.rms_norm_eps), seed=2)
        _, comb, _ = hc(x)
        assert (comb.sum(-2) - 1).abs().max().item() < 1e-5
        assert (comb.sum(-1) - 1).abs().max().item() < row_tol
        assert comb.min().item() > 0


def test_merge_matches_hf_block_formula():
    """The block's merge (post·out + combᵀ·streams) as HF's decoder layer writes it."""
    x, out = streams(4), torch.randn(2, 5, D)
    hf_cfg = hf_config()
    hc = randomized(mhc.HyperConnection(D, N, ITERS, hf_cfg.hc_eps, hf_cfg.rms_norm_eps), seed=5)
    post, comb, _ = hc(x)
    expected = torch.einsum("btn,btc->btnc", post, out) + torch.einsum("btjk,btjc->btkc", comb, x)
    assert (mhc.merge(x, out, post, comb) - expected).abs().max().item() <= TOL


def test_hyper_head_matches_hf():
    hf_cfg = hf_config()
    ours = randomized(mhc.HyperHead(D, N, hf_cfg.hc_eps, hf_cfg.rms_norm_eps), seed=6)
    ref = hf_deepseek_v4.modeling().DeepseekV4HyperHead(hf_cfg).float()
    ref.load_state_dict(ours.state_dict())
    x = streams(7)
    assert (ours(x) - ref(x)).abs().max().item() <= TOL


@pytest.mark.parametrize("module, count", [
    (lambda: mhc.HyperConnection(D, N, ITERS), lambda: mhc.HyperConnection.param_count(D, N)),
    (lambda: mhc.HyperHead(D, N), lambda: mhc.HyperHead.param_count(D, N)),
])
def test_param_counts_match_modules(module, count):
    assert sum(p.numel() for p in module().parameters()) == count()

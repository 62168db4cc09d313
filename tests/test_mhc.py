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


def test_plain_identity_unchanged_and_mhc_in_identity():
    from dsbench.variants.config import config_from_size

    plain = config_from_size("debug").to_dict()
    assert not {"residual", "hc_mult", "hc_sinkhorn_iters"} & set(plain)  # existing cell ids hold
    assert config_from_size("debug", residual="mhc").to_dict()["hc_mult"] == N


def test_mhc_decoder_params_decode_and_train():
    """The mHC decoder: its parameter count is the accounting's, cached decode equals the full
    forward, and a training step moves every mixing weight."""
    from dsbench.variants.config import config_from_size
    from dsbench.variants.decoder import build_model, forward_flops_per_token, param_counts

    cfg = config_from_size("debug", residual="mhc")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["params_total"]
    assert forward_flops_per_token(cfg, 8) > forward_flops_per_token(config_from_size("debug"), 8)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(2, 16, torch.float32, "cpu")
        stepped = torch.cat([model(tokens[:, :5], 0, caches), model(tokens[:, 5:6], 5, caches),
                             model(tokens[:, 6:], 6, caches)], dim=1)
    assert (stepped - full).abs().max().item() <= TOL
    out = model.forward_losses(tokens[:, :-1], tokens[:, 1:])
    out.total().backward()
    mixing = [p for name, p in model.named_parameters() if ".hc." in name or name.startswith("residual.")]
    assert len(mixing) == 3 * 2 * cfg.n_layers + 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixing)


def test_mhc_refuses_mtp():
    from dsbench.variants.config import config_from_size

    with pytest.raises(ValueError, match="model.residual = 'mhc' with model.mtp = 1"):
        config_from_size("debug", residual="mhc", mtp=1)

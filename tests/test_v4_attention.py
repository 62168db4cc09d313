"""DeepSeek-V4's compressed attention against Hugging Face's deepseek_v4 with the same weights.

Part 1 so far: the KV compressor HCA and CSA share (variants/v4_compressor.py) against HF's
DeepseekV4HCACompressor, DeepseekV4CSACompressor and the CSA indexer's own compressor, fp32,
prefill from position 0 (HF's stateless path), max abs ≤ 1e-5.

Intended differences from HF (so far):
- The compressor returns its entries (B, W, D) only; HF's also builds the attention's block mask
  (HCA) or runs the indexer (CSA). dsbench keeps masking and selection with the attention.
- RoPE here is "default" (no YaRN) in both; V4's compress rope uses YaRN factor 16, not yet built.
"""

from __future__ import annotations

import pytest
import torch

from hf_deepseek_v4 import configuration, modeling
from dsbench.variants.v4_compressor import KVCompressor

C, HEAD_DIM, ROPE_DIM, INDEX_DIM = 32, 16, 8, 12
RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}


def hf_config():
    return configuration().DeepseekV4Config(
        hidden_size=C, head_dim=HEAD_DIM, partial_rotary_factor=ROPE_DIM / HEAD_DIM, num_attention_heads=2,
        q_lora_rank=24, index_head_dim=INDEX_DIM, index_n_heads=2, index_topk=3, compress_rates=dict(RATES),
        compress_rope_theta=160000.0, num_hidden_layers=2, vocab_size=64)


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def copy_into(ours: KVCompressor, hf: torch.nn.Module) -> None:
    with torch.no_grad():
        for name in ("kv_proj.weight", "gate_proj.weight", "position_bias", "kv_norm.weight"):
            ours.get_parameter(name).copy_(hf.get_parameter(name).float())


CASES = {  # name: (HF module from config, entry width, ratio, overlap)
    "hca": (lambda cfg: modeling().DeepseekV4HCACompressor(cfg), HEAD_DIM, RATES["heavily_compressed_attention"], False),
    "csa": (lambda cfg: modeling().DeepseekV4CSACompressor(cfg), HEAD_DIM, RATES["compressed_sparse_attention"], True),
    "csa-indexer": (lambda cfg: modeling().DeepseekV4Indexer(cfg), INDEX_DIM, RATES["compressed_sparse_attention"], True),
}


def hf_entries(name: str, hf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's compressed entries (B, W, D) from a stateless forward (no cache)."""
    if name == "csa-indexer":  # the indexer's entries are internal: read them off its scorer's input
        seen = {}
        hook = hf.scorer.register_forward_pre_hook(lambda mod, args: seen.update(kv=args[1]))
        q_residual = torch.randn(x.shape[0], x.shape[1], 24)
        hf(x, q_residual, torch.arange(x.shape[1])[None].expand(x.shape[0], -1), None, 0)
        hook.remove()
        return seen["kv"]
    q_residual = torch.randn(x.shape[0], x.shape[1], 24)
    return hf(x, q_residual, torch.arange(x.shape[1])[None].expand(x.shape[0], -1), None, 0)[0].squeeze(1)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("T", [8, 19, 33])
def test_compressor_matches_hf(name, T):
    torch.manual_seed(0)
    build, width, ratio, overlap = CASES[name]
    hf = build(hf_config()).float()
    randomize(hf, seed=T)
    ours = KVCompressor(C, width, ratio, overlap, ROPE_DIM, 160000.0)
    copy_into(ours, hf)
    x = torch.randn(2, T, C)
    with torch.no_grad():
        expected, got = hf_entries(name, hf, x), ours(x)
    assert got.shape == (2, T // ratio, width)
    assert expected.shape == got.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_compressor_param_count_matches_module():
    for _, width, ratio, overlap in CASES.values():
        module = KVCompressor(C, width, ratio, overlap, ROPE_DIM, 10000.0)
        assert KVCompressor.param_count(C, width, ratio, overlap) == sum(p.numel() for p in module.parameters())


def test_compressor_is_causal_by_window():
    """An entry depends only on its own window (HCA) or its own and the previous one (CSA)."""
    torch.manual_seed(1)
    for overlap in (False, True):
        module = KVCompressor(C, HEAD_DIM, 4, overlap, ROPE_DIM, 10000.0)
        x = torch.randn(1, 16, C)
        later = x.clone()
        later[:, 8:] += 1.0  # change windows 2 and 3 only
        with torch.no_grad():
            a, b = module(x), module(later)
        assert torch.equal(a[:, :2], b[:, :2])
        assert not torch.allclose(a[:, 2:], b[:, 2:])

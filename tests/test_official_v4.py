"""DeepSeek-V4's analytic accounting (dsbench/official_v4.py) against Hugging Face's deepseek_v4
module tree built from the same config.json, and its 1M-context claims."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from dsbench import claims, official_v4
from dsbench.claims.analytic import published_value
from dsbench.errors import OfficialConfigError

import hf_deepseek_v4


def hf_config(name: str):
    raw = json.loads(resources.files("dsbench").joinpath("official_configs", f"{name}.json").read_text())
    return hf_deepseek_v4.configuration().DeepseekV4Config(**{k: v for k, v in raw.items() if not k.startswith("_")})


@pytest.mark.parametrize("name", official_v4.V4_MODELS)
def test_param_count_is_hugging_faces_module_tree_exactly(name):
    """Built on the meta device: every parameter of HF's DeepseekV4ForCausalLM, no memory."""
    modeling = hf_deepseek_v4.modeling()
    with torch.device("meta"):
        model = modeling.DeepseekV4ForCausalLM(hf_config(name))
    hf_total = sum(p.numel() for p in model.parameters())
    hf_experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    counts = official_v4.param_counts(official_v4.load_v4(name))
    assert counts.total == hf_total
    assert counts.routed_experts == hf_experts
    a = official_v4.load_v4(name)
    k_of_e = a.num_experts_per_tok / a.n_routed_experts
    assert counts.activated == hf_total - counts.embedding - hf_experts + round(hf_experts * k_of_e)


@pytest.mark.parametrize("name", official_v4.V4_MODELS)
def test_layer_schedule_is_hugging_faces(name):
    types = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    a = official_v4.load_v4(name)
    assert [types[r] for r in a.compress_ratios] == hf_config(name).layer_types
    assert len(a.compress_ratios) == a.num_hidden_layers


def test_schedules_as_the_report_describes_them():
    pro, flash = official_v4.load_v4("deepseek-v4-pro"), official_v4.load_v4("deepseek-v4-flash")
    assert (pro.compress_ratios.count(128), pro.compress_ratios.count(4), pro.compress_ratios.count(0)) == (31, 30, 0)
    assert (flash.compress_ratios.count(128), flash.compress_ratios.count(4), flash.compress_ratios.count(0)) == (20, 21, 2)


def test_kv_cache_by_hand_for_flash():
    a = official_v4.load_v4("deepseek-v4-flash")
    L = 10_000
    window = 128 * 512  # every layer's window entries of head_dim 512
    csa = (L // 4) * 512 + (L // 4) * 128  # compressed entries and the indexer's keys
    hca = (L // 128) * 512
    assert official_v4.kv_cache_elements(a, L) == 43 * window + 21 * csa + 20 * hca
    entry = 448 * 1 + 64 * 2  # FP8 without the RoPE dims, BF16 for them
    expected = (43 * 128 + 21 * (L // 4) + 20 * (L // 128)) * entry + 21 * (L // 4) * 128 * 0.5
    assert official_v4.kv_cache_bytes(a, L) == expected


def test_short_contexts_read_only_what_exists():
    a = official_v4.load_v4("deepseek-v4-flash")
    assert official_v4.attended_entries(a, 0, 50) == 50  # a window-only layer before the window fills
    assert official_v4.attended_entries(a, 2, 50) == 50 + 12  # CSA: 12 compressed entries, fewer than index_topk
    assert official_v4.attended_entries(a, 2, 1 << 20) == 128 + 512  # CSA at 1M: the window and index_topk
    assert official_v4.attended_entries(a, 3, 1 << 20) == 128 + (1 << 20) // 128  # HCA reads every compressed entry


def test_v32_is_v3_with_its_indexer():
    v = official_v4.load_v32()
    assert (v.base.hidden_size, v.base.num_hidden_layers, v.index_n_heads, v.index_head_dim, v.index_topk) == (7168, 61, 64, 128, 2048)
    assert official_v4.v32_kv_cache_elements(v, 1000) == 1000 * 61 * (512 + 64 + 128)


def test_decode_flops_grow_with_context_and_v4_grows_slower():
    pro, v32 = official_v4.load_v4("deepseek-v4-pro"), official_v4.load_v32()
    short, long = 4096, 1 << 20
    v4_growth = official_v4.decode_flops_per_token(pro, long) - official_v4.decode_flops_per_token(pro, short)
    v32_growth = official_v4.v32_decode_flops_per_token(v32, long) - official_v4.v32_decode_flops_per_token(v32, short)
    assert 0 < v4_growth < v32_growth


def test_the_v4_claims_report_what_the_counter_computes():
    rows = {r.claim.id: r for r in claims.evaluate() if r.claim.id.startswith("v4-")}
    assert len(rows) == 8
    pro, v32 = official_v4.load_v4("deepseek-v4-pro"), official_v4.load_v32()
    ratio = official_v4.kv_cache_bytes(pro, 1 << 20) / official_v4.v32_kv_cache_bytes(v32, 1 << 20)
    assert rows["v4-pro-1m-kv"].evidence.measured == f"{100 * ratio:.1f}%"
    expected = claims.REPRODUCED if abs(ratio - 0.10) <= 0.02 else claims.NOT_REPRODUCED
    assert rows["v4-pro-1m-kv"].evidence.verdict == expected
    assert all(r.evidence.verdict in (claims.REPRODUCED, claims.NOT_REPRODUCED) for r in rows.values())


def test_published_trillions():
    assert published_value("1.6T") == (1.6e12, pytest.approx(0.05e12))
    assert published_value("284B") == (284e9, 0.5e9)


def test_unknown_v4_model_names_the_allowed_ones():
    with pytest.raises(OfficialConfigError, match="deepseek-v4-pro, deepseek-v4-flash"):
        official_v4.load_v4("deepseek-v5")

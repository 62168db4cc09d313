"""DeepSeek-V4's attention kinds as axis values (variants/v4_attention.py): csa, hca, v4-window
and the per-layer schedule v4-hybrid, through the harness. Fidelity to HF is
tests/test_v4_attention.py's; the variant contract (counts, FLOPs by part, decode = the full
forward) is tests/test_contract.py's. Here: the cache's bytes at every context against the
analytic count, the schedule, the cells and rows, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from dsbench import accounting, memory_estimate
from dsbench.errors import SpecError
from dsbench.official_v4 import load_v4
from dsbench.spec import expand, parse_spec
from dsbench.variants import registry
from dsbench.variants.config import config_from_size
from dsbench.variants.decoder import build_model, kv_cache_bytes, kv_cache_bytes_per_token, param_counts
from dsbench.variants.v4_attention import parse_schedule
from dsbench.workloads.decode import cache_bytes_at, max_batch

KINDS = ("csa", "hca", "v4-window", "v4-hybrid")
SMALL = {"window": 8, "hca_ratio": 8, "index_topk": 3, "n_layers": 4, "schedule": "v4-window|csa,hca"}


def v4(kind: str, **overrides):
    fields = registry.config_fields("attention", kind)
    settings = {k: v for k, v in {**SMALL, **overrides}.items() if k in fields or k == "n_layers"}
    return config_from_size("debug", attention=kind, **settings)


def test_the_kinds_are_registered_and_share_one_config():
    assert set(KINDS) <= set(registry.ATTENTION)
    assert set(registry.readers("attention", "index_topk")) >= {"dsa", "csa", "hca", "v4-window", "v4-hybrid"}
    assert registry.readers("attention", "schedule") == ["v4-hybrid"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_cache_bytes_at_every_context_equal_the_analytic_count(kind, dtype):
    """Prefill 5 tokens, then decode one at a time to 40: after each call the bytes the live
    caches hold (window, entries, open windows, CSA's carried half) equal kv_cache_bytes at that
    context, and grow by kv_cache_bytes_per_token per token once the window is full."""
    cfg = v4(kind)
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(dtype)
    width = torch.empty((), dtype=dtype).element_size()
    caches = model.new_caches(2, 40, dtype, "cpu")
    toks = torch.randint(0, cfg.vocab_size, (2, 40))
    assert sum(c.live_bytes_per_token() for c in caches) == kv_cache_bytes_per_token(cfg, width)
    with torch.no_grad():
        model(toks[:, :5], 0, caches)
        for t in range(5, 40):
            model(toks[:, t:t + 1], t, caches)
            assert sum(cache_bytes_at(c, t + 1) for c in caches) == kv_cache_bytes(cfg, width, t + 1)
    # the constant part: from one full HCA window to the next, exactly the entries' growth
    grown = kv_cache_bytes(cfg, width, 40) - kv_cache_bytes(cfg, width, 24)
    assert grown == pytest.approx(16 * kv_cache_bytes_per_token(cfg, width))


def test_kv_bytes_by_hand():
    """debug d_model 64, 4 heads: head_dim 16; CSA m = 4 with a 32-wide indexer, HCA m' = 8, fp32.
    Per token: CSA (16 + 32)·4/4 = 48, HCA 16·4/8 = 8, the window 0."""
    assert kv_cache_bytes_per_token(v4("csa", n_layers=1), 4) == 48
    assert kv_cache_bytes_per_token(v4("hca", n_layers=1), 4) == 8
    assert kv_cache_bytes_per_token(v4("v4-window", n_layers=1), 4) == 0
    # at context 10, HCA: 7 window tokens·16·4 + 1 entry·16·4 + 2 open tokens' kv and gate 2·2·16·4
    assert kv_cache_bytes(v4("hca", n_layers=1), 4, 10) == 7 * 64 + 64 + 256
    hybrid = v4("v4-hybrid")  # v4-window, csa, hca, csa
    assert kv_cache_bytes_per_token(hybrid, 4) == 0 + 48 + 8 + 48


def test_the_schedule_builds_each_layer_as_its_kind():
    cfg = v4("v4-hybrid")
    kinds = [layer_cfg.attention.kind for _, layer_cfg in registry.attention_layers(cfg)]
    assert kinds == ["v4-window", "csa", "hca", "csa"]
    model = build_model(cfg)
    assert [type(b.attn).__name__ for b in model.blocks] == ["CompressedAttention"] * 4
    assert [b.attn.compressor.ratio if b.attn.compressor else 0 for b in model.blocks] == [0, 4, 8, 4]
    assert [b.attn.indexer is not None for b in model.blocks] == [False, True, False, True]
    assert param_counts(cfg)["params_total"] == sum(p.numel() for p in model.parameters())
    per_layer = sum(m.param_count(c) for m, c in registry.attention_layers(cfg))
    assert per_layer == sum(sum(p.numel() for p in b.attn.parameters()) for b in model.blocks)


@pytest.mark.parametrize("name, schedule", [("deepseek-v4-flash", "v4-window,v4-window|csa,hca"),
                                            ("deepseek-v4-pro", "hca,hca|csa,hca")])
def test_the_schedule_spells_v4s_compress_ratios(name, schedule):
    """V4-Flash's and V4-Pro's published compress_ratios (0 window, 4 CSA, 128 HCA), layer by layer."""
    arch = load_v4(name)
    by_ratio = {0: "v4-window", 4: "csa", 128: "hca"}
    assert parse_schedule(schedule, arch.num_hidden_layers) == [by_ratio[r] for r in arch.compress_ratios]


def test_the_default_schedule_is_v4_pros():
    assert registry.ATTENTION["v4-hybrid"].config().schedule == "hca,hca|csa,hca"


@pytest.mark.parametrize("schedule, words", [("csa,mla", ["attention.schedule", "'csa,mla'", "mla is not one"]),
                                             ("hca|", ["attention.schedule", "a cycle"])])
def test_a_bad_schedule_is_one_line(schedule, words):
    raw = {"name": "s", "device": "cpu", "model": {"size": "debug"}, "attention": {"schedule": schedule},
           "axes": {"attention": ["v4-hybrid"], "workload": ["decode"]}, "decode": {"context_lens": [16], "new_tokens": 2}}
    with pytest.raises(SpecError) as e:
        expand(parse_spec(raw), "cpu")
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_each_kind_is_its_own_cell_with_its_rows():
    raw = {"name": "s", "device": "cpu", "model": {"size": "debug", "n_layers": 4},
           "attention": {"window": 8, "hca_ratio": 8, "schedule": "v4-window|csa,hca"},
           "axes": {"attention": ["mla", *KINDS], "workload": ["decode"]}, "decode": {"context_lens": [64], "new_tokens": 2}}
    cells = expand(parse_spec(raw), "cpu")
    assert len({c.cell_id for c in cells}) == len(cells) == 5
    rows = {c.axes["attention"]: accounting.static_row(c) for c in cells}
    assert rows["v4-hybrid"]["attention_schedule"] == "v4-window,csa,hca,csa"
    assert [rows[k]["compress_ratio"] for k in ("csa", "hca", "v4-window")] == [4, 8, 0]
    models = {c.axes["attention"]: c.model for c in cells}
    for kind in KINDS:
        assert rows[kind]["kv_cache_bytes_at_context"] == kv_cache_bytes(models[kind], 4, 64)
    # mla's cache at context 64 is exactly per token × 64; hca's holds its window beside the entries
    assert rows["mla"]["kv_cache_bytes_at_context"] == rows["mla"]["kv_cache_bytes_per_token"] * 64
    assert rows["hca"]["kv_cache_bytes_at_context"] > rows["hca"]["kv_cache_bytes_per_token"] * 64
    assert "schedule" not in json.dumps(cells[0].model.to_dict())  # mla's identity holds no V4 field


def test_the_memory_estimate_and_fit_count_the_window():
    cfg = v4("v4-window", n_layers=2)
    assert kv_cache_bytes_per_token(cfg, 4) == 0
    assert kv_cache_bytes(cfg, 4, 100) == 2 * 7 * 16 * 4  # two layers' 7-token windows
    weights = param_counts(cfg)["params_total"] * 4
    assert max_batch(cfg, weights + 10 * kv_cache_bytes(cfg, 4, 100), 100) == 10


def test_a_context_past_the_cache_is_a_clear_error():
    cfg = v4("v4-window")
    model = build_model(cfg).eval()
    caches = model.new_caches(1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KV cache holds 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), 0, caches)
    with pytest.raises(ValueError, match="without a cache"):
        model.blocks[0].attn(torch.zeros(1, 2, cfg.d_model), 3, None)


def test_speculative_decoding_refuses_a_cache_that_cannot_roll_back():
    raw = {"name": "s", "device": "cpu", "model": {"size": "debug", "mtp": 1}, "attention": {"window": 8},
           "axes": {"attention": ["hca"], "workload": ["speculative"]},
           "speculative": {"batch_size": 1, "context_lens": [16], "new_tokens": 4, "train_steps": [0]}}
    with pytest.raises(SpecError, match="cannot roll back"):
        expand(parse_spec(raw), "cpu")


def test_the_memory_estimate_prices_each_layer():
    """A schedule's train activations are the sum of its layers' (CSA's indexer scores included)."""
    hybrid, csa = v4("v4-hybrid"), v4("csa")
    one = memory_estimate._train_bytes_per_layer_token(csa, 0, 64, 4, 4)
    layers = [memory_estimate._train_bytes_per_layer_token(hybrid, i, 64, 4, 4) for i in range(4)]
    assert layers[1] == layers[3] == one and layers[0] < one

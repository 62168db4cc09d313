"""The attention axis: MHA, GQA, MQA and MLA (absorbed and naive decode paths).

Every attention type: cached decode == the full forward, causality, RoPE's relative-position
property, live cache bytes == the analytic formula, the length limit. MLA: absorbed == naive
(prefill, chunks and decode), the paper's cache sizes, FLOPs against FlopCounterMode. GQA with
n_kv_heads = n_heads is MHA. The spec side: axis values, resolved configs, max-batch cells.

All in fp32 on a CPU with debug-size models; numerical comparisons use the RMS-relative error
‖out − ref‖ / ‖ref‖ with the tolerance stated where it is used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsbench.accounting import static_row
from dsbench.spec import SpecError, expand, load_preset, max_batch, parse_spec
from dsbench.variants import registry
from dsbench.variants.attention import MultiHeadAttention
from dsbench.variants.config import ModelConfig, config_from_size
from dsbench.variants.mla import MLAConfig
from dsbench.variants.decoder import build_model, forward_flops_per_token, kv_cache_bytes_per_token, param_counts, weight_bytes
from dsbench.variants.mla import LatentCache, MultiHeadLatentAttention, mla_dims

CPU = torch.device("cpu")
# The MHA and MLA families this file covers; V4's compressed kinds (csa, hca, v4-window,
# v4-hybrid), whose positions are absolute (windows close at multiples of m), are tests/test_v4_variants.py's.
V4_KINDS = ("csa", "hca", "v4-window", "v4-hybrid")
KINDS = tuple(k for k in registry.ATTENTION if k not in V4_KINDS)  # mha, gqa, mqa, mla, mla-naive, dsa


def resolved(kind: str, **overrides) -> ModelConfig:
    """A debug-size config with 8 heads (so gqa has 2 KV heads, not 1), as a sweep cell builds it."""
    return config_from_size("debug", attention=kind, **{"n_heads": 8, **overrides})


# MLA with query compression and every width distinct and not a power of two, so no formula
# passes by coincidence.
ODD_MLA = dict(kv_lora_rank=24, q_lora_rank=40, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10)
CONFIGS = {kind: resolved(kind) for kind in KINDS}
CONFIGS |= {"mla-odd": resolved("mla", **ODD_MLA), "mla-naive-odd": resolved("mla-naive", **ODD_MLA)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def seeded_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def tokens(cfg: ModelConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def run_chunks(model, toks: torch.Tensor, chunks: list[int], dtype=torch.float32) -> torch.Tensor:
    """Feed toks through fresh caches in chunks of these sizes; all logits (B, T, V)."""
    caches = model.new_caches(toks.shape[0], toks.shape[1], dtype, CPU)
    out, pos = [], 0
    for size in chunks:
        out.append(model(toks[:, pos:pos + size], pos, caches))
        pos += size
    return torch.cat(out, dim=1)


# -- resolved configs ----------------------------------------------------------------------------


def test_axis_values_resolve_to_the_variants():
    assert KINDS == ("mha", "gqa", "mqa", "mla", "mla-naive", "dsa")
    assert [CONFIGS[k].n_kv_heads() for k in ("mha", "gqa", "mqa")] == [8, 2, 1]  # gqa: n_heads/4
    assert CONFIGS["mla"].attention.mla_impl == "absorbed" and CONFIGS["mla-naive"].attention.mla_impl == "naive"
    assert resolved("gqa", n_kv_heads=4).n_kv_heads() == 4  # an explicit n_kv_heads wins
    assert registry.gqa_kv_heads(12) == 3 and registry.gqa_kv_heads(9) == 1 and registry.gqa_kv_heads(2) == 1


def test_mla_dims_default_to_v2_ratios():
    d = mla_dims(config_from_size("small", attention="mla"))  # d_h = 32
    assert (d.Dc, d.Dr, d.Dn, d.Dv, d.Dq) == (128, 16, 32, 32, 0)  # d_c = 4·d_h, d_h^R = d_h/2
    d = mla_dims(resolved("mla", **ODD_MLA))
    assert (d.Dc, d.Dq, d.Dn, d.Dr, d.Dv) == (24, 40, 12, 6, 10)


@pytest.mark.parametrize("name", CONFIGS)
def test_param_count_matches_the_module(name):
    cfg = CONFIGS[name]
    module = registry.ATTENTION[cfg.attention.kind].module(cfg)
    assert module.param_count(cfg) == sum(p.numel() for p in module.parameters())
    assert param_counts(cfg)["params_total"] == sum(p.numel() for p in build_model(cfg).parameters())


def test_mla_param_count_by_hand():
    # debug, 8 heads: C=64, d_h=8 → Dc=32, Dr=4, Dn=Dv=8, no query compression.
    # wq 64·8·12 + wkv_a 64·36 + kv_norm 32 + wkv_b 32·8·16 + wo 8·8·64 = 6144 + 2304 + 32 + 4096 + 4096
    assert MultiHeadLatentAttention.param_count(CONFIGS["mla"]) == 16_672
    # with query compression (Dq=40): wq_a 64·40 + q_norm 40 + wq_b 40·8·18; wkv_a 64·30 + 24; wkv_b 24·8·22; wo 80·64
    assert MultiHeadLatentAttention.param_count(CONFIGS["mla-odd"]) == 2560 + 40 + 5760 + 1920 + 24 + 4224 + 5120


# -- KV cache: live tensors == formulas == the paper ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_live_cache_bytes_match_the_formula(name, dtype):
    cfg = CONFIGS[name]
    B, max_len = 3, 20
    caches = build_model(cfg).new_caches(B, max_len, dtype, CPU)
    expected = kv_cache_bytes_per_token(cfg, torch.empty((), dtype=dtype).element_size())
    assert sum(c.live_bytes_per_token() for c in caches) == expected
    allocated = sum(b.nbytes for c in caches for b in c.buffers())  # independent of live_bytes_per_token
    assert allocated == expected * B * max_len
    if cfg.attention.kind == "mla":  # the decode cache holds only the latent and the rope key
        d = mla_dims(cfg)
        assert all(isinstance(c, LatentCache) and c.kv.shape == (B, max_len, d.Dc + d.Dr) for c in caches)


def test_kv_cache_bytes_by_hand():
    # debug (4 heads, d_h = 16, 2 layers), fp32: MHA 2·2·4·16·4 = 1024;
    # MLA absorbed (Dc + Dr)·L·4 = (64 + 8)·2·4 = 576; naive H·(Dn + Dr + Dv)·L·4 = 4·40·2·4 = 1280.
    debug = config_from_size("debug")
    assert kv_cache_bytes_per_token(debug, 4) == 1024
    assert kv_cache_bytes_per_token(dataclasses.replace(debug, attention=MLAConfig(kind="mla")), 4) == 576
    assert kv_cache_bytes_per_token(dataclasses.replace(debug, attention=MLAConfig(kind="mla", mla_impl="naive")), 4) == 1280


def test_kv_cache_ratios_at_deepseek_v3_sizes():
    # V3 (2412.19437 §4.2): 128 heads, d_h = 128, d_c = 512, d_h^R = 64, d_c' = 1536, 61 layers.
    v3 = dict(d_model=7168, n_layers=61, n_heads=128, head_dim=128, kv_lora_rank=512, q_lora_rank=1536,
              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    mha, mla, naive = (resolved(k, **v3) for k in ("mha", "mla", "mla-naive"))
    per = {k: kv_cache_bytes_per_token(c, 2) for k, c in (("mha", mha), ("mla", mla), ("naive", naive))}
    assert per["mla"] == 61 * 576 * 2  # V2 Table 1: (d_c + d_h^R)·l elements
    assert per["mha"] == 61 * 2 * 128 * 128 * 2  # 2·n_h·d_h·l
    assert per["naive"] / per["mla"] == pytest.approx(128 * 320 / 576)  # ≈ 71×: the issue's "~70×"
    assert per["mha"] / per["mla"] == pytest.approx(32768 / 576)  # ≈ 57×


# -- cached decode == the full forward, for every attention type ---------------------------------

# fp32: the cached path computes the same sums in another order (matmuls instead of SDPA's
# kernel; MLA absorbed also reassociates W^UK and W^UV): observed ≲ 3e-7, bound 1e-5.
TOL = 1e-5


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("chunks", [[12, 1, 1, 1, 1, 1], [10, 7, 1, 1, 1]], ids=["prefill12+decode5", "prefill10+chunk7+decode3"])
def test_cached_decode_matches_the_full_forward(name, chunks):
    cfg = CONFIGS[name]
    model = seeded_model(cfg)
    toks = tokens(cfg, 2, sum(chunks))
    with torch.no_grad():
        full, cached = model(toks), run_chunks(model, toks, chunks)
    pos = 0
    for size in chunks:
        assert rel_err(cached[:, pos:pos + size], full[:, pos:pos + size]) < TOL, (pos, size)
        pos += size
    assert rel_err(cached[:, -1], full[:, -1]) < TOL  # the last position, decoded from the cache


# -- MLA: absorbed == naive ----------------------------------------------------------------------


@pytest.mark.parametrize("odd", [False, True], ids=["debug", "odd-dims+q-lora"])
def test_absorbed_equals_naive(odd):
    absorbed_cfg, naive_cfg = (CONFIGS[k + ("-odd" if odd else "")] for k in ("mla", "mla-naive"))
    absorbed, naive = seeded_model(absorbed_cfg), seeded_model(naive_cfg)
    assert all(torch.equal(a, b) for a, b in zip(absorbed.state_dict().values(), naive.state_dict().values()))
    toks = tokens(absorbed_cfg, 3, 20)
    chunks = [9, 5, 1, 1, 1, 1, 1, 1]  # prefill, a chunk over the latent cache (T > 1, masked), decode
    with torch.no_grad():
        prefill_a, prefill_n = absorbed(toks[:, :9], 0, absorbed.new_caches(3, 9, torch.float32, CPU)), naive(toks[:, :9])
        decode_a, decode_n = run_chunks(absorbed, toks, chunks), run_chunks(naive, toks, chunks)
    assert rel_err(prefill_a, prefill_n) < TOL
    assert rel_err(decode_a, decode_n) < TOL
    assert rel_err(decode_a[:, 9:], decode_n[:, 9:]) < TOL  # the tokens the latent path computed


def test_absorbed_attention_over_the_latent_matches_the_expanded_form():
    # The attention module alone, one token over a long cache: the latent path against
    # up-projecting every cached latent to per-head K and V (what naive caches).
    cfg = CONFIGS["mla-odd"]
    torch.manual_seed(0)
    module = MultiHeadLatentAttention(cfg).eval()
    x = torch.randn(2, 30, cfg.d_model)
    with torch.no_grad():
        full = module(x)  # no cache: the expanded form, causal
        cache = module.new_cache(2, 30, torch.float32, CPU)
        module(x[:, :29], 0, cache)
        last = module(x[:, 29:], 29, cache)  # absorbed: W^UK into q, W^UV into the output
    assert rel_err(last, full[:, 29:]) < TOL


# -- causality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_future_tokens_do_not_change_earlier_logits(name):
    cfg = CONFIGS[name]
    model = seeded_model(cfg)
    toks = tokens(cfg, 2, 20)
    changed = toks.clone()
    changed[:, 13:] = (changed[:, 13:] + 1) % cfg.vocab_size
    with torch.no_grad():
        before, after = model(toks), model(changed)
        cached_before, cached_after = run_chunks(model, toks, [10, 7, 3]), run_chunks(model, changed, [10, 7, 3])
    assert rel_err(after[:, :13], before[:, :13]) < 1e-6  # row-wise identical up to kernel order
    assert rel_err(after[:, 13:], before[:, 13:]) > 1e-3
    assert rel_err(cached_after[:, :13], cached_before[:, :13]) < 1e-6  # the masked chunk (10..16) too


# -- RoPE: only relative positions matter ---------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_shifting_every_position_leaves_the_output_unchanged(name):
    # RoPE scores depend on m − n only; shifting all positions by 77 keeps every m − n. Angles
    # up to ~100 rad in fp32 lose ~1e-5 relative; bound 1e-4. A model without position
    # information would also pass, so the second check shows positions are seen at all.
    cfg = CONFIGS[name]
    model = seeded_model(cfg)
    toks = tokens(cfg, 2, 16)
    with torch.no_grad():
        at_0, at_77 = model(toks, start_pos=0), model(toks, start_pos=77)
        swapped = model(toks[:, [1, 0, *range(2, 16)]], start_pos=0)
    assert rel_err(at_77, at_0) < 1e-4
    assert rel_err(swapped[:, 2:], at_0[:, 2:]) > 1e-3  # order matters: positions are used


def test_mla_rope_scores_depend_only_on_relative_position():
    # The decoupled rope key is shared by all heads: q^R_i(m)·k^R(n) depends only on m − n.
    cfg = CONFIGS["mla-odd"]
    torch.manual_seed(0)
    module = MultiHeadLatentAttention(cfg)
    q, k = torch.randn(1, 8, 1, 6), torch.randn(1, 1, 1, 6)  # (B, H, T, Dr), one key head

    def score(m, n):
        return (module.rope(q, m) * module.rope(k, n)).sum(-1)  # (1, 8, 1)

    assert rel_err(score(40, 31), score(9, 0)) < 1e-5
    assert rel_err(score(10, 0), score(9, 0)) > 1e-3


# -- GQA with n_kv_heads = n_heads is MHA ---------------------------------------------------------


def test_gqa_with_all_kv_heads_is_mha():
    mha, gqa = CONFIGS["mha"], resolved("gqa", n_kv_heads=8)
    assert gqa.n_kv_heads() == mha.n_kv_heads() == 8
    a, b = seeded_model(mha), seeded_model(gqa)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    toks = tokens(mha, 2, 14)
    with torch.no_grad():
        assert torch.equal(a(toks), b(toks))
        assert torch.equal(run_chunks(a, toks, [8, 3, 1, 1, 1]), run_chunks(b, toks, [8, 3, 1, 1, 1]))


def test_grouped_heads_share_each_kv_head():
    # GQA by hand: repeating each KV head for its H/G query heads and running MHA gives the same.
    cfg = CONFIGS["gqa"]
    torch.manual_seed(0)
    gqa = MultiHeadAttention(cfg)
    mha = MultiHeadAttention(CONFIGS["mha"])
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):  # (G·D, C) → each KV head repeated H/G = 4 times
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight.view(2, 1, 8, 64).expand(2, 4, 8, 64).reshape(64, 64))
        x = torch.randn(2, 9, 64)
        assert rel_err(gqa(x), mha(x)) < 1e-6
        cache_g, cache_m = gqa.new_cache(2, 9, torch.float32, CPU), mha.new_cache(2, 9, torch.float32, CPU)
        gqa(x[:, :8], 0, cache_g), mha(x[:, :8], 0, cache_m)
        assert rel_err(gqa(x[:, 8:], 8, cache_g), mha(x[:, 8:], 8, cache_m)) < 1e-6


# -- length limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_context_past_max_seq_len_is_a_clear_error(kind):
    cfg = resolved(kind, max_seq_len=24)
    model = seeded_model(cfg)
    with pytest.raises(ValueError, match=r"positions up to 25 exceed max_seq_len 24"):
        model(tokens(cfg, 1, 25))
    with pytest.raises(ValueError, match=r"cache length 25 exceeds max_seq_len 24"):
        model.new_caches(1, 25, torch.float32, CPU)
    caches = model.new_caches(1, 8, torch.float32, CPU)
    with pytest.raises(ValueError, match="KV cache holds 8 positions"):
        model(tokens(cfg, 1, 9), 0, caches)


# -- FLOPs against FlopCounterMode ---------------------------------------------------------------


def _counted(fn) -> int:
    # Imported here: torch.utils.flop_counter imports triton, and an import of triton before
    # tests/test_fp8.py sets TRITON_INTERPRET at collection would leave its kernels compiled.
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["mla", "mla-naive", "mla-odd", "mla-naive-odd", "mha", "gqa"])
def test_flops_match_the_flop_counter(name):
    # Prefill (T×T, SDPA's MATH backend counts the full matrix: analytic at context T) and one
    # decoded token over S = 17 keys (matmuls, exact): the decode formula follows the path.
    cfg = CONFIGS[name]
    model, B, T = seeded_model(cfg), 2, 16
    toks = tokens(cfg, B, T + 1)
    # SDPA gets V zero-padded to the query/key width (variants/attention.py); the counter sees the
    # padding's products, the model FLOPs do not: 2·H·(Dn + Dr − Dv) per key, token and layer.
    padding = 0
    if cfg.attention.kind.startswith("mla"):
        d = mla_dims(cfg)
        padding = 2 * d.H * max(0, d.Dn + d.Dr - d.Dv) * T * cfg.n_layers
    assert _counted(lambda: model(toks[:, :T])) == B * T * (forward_flops_per_token(cfg, T) + padding)
    caches = model.new_caches(B, T + 1, torch.float32, CPU)
    with torch.no_grad():
        model(toks[:, :T], 0, caches)
    decoded = _counted(lambda: model(toks[:, T:], T, caches))
    assert decoded == B * forward_flops_per_token(cfg, T + 1, decode=True)
    absorbed = cfg.attention.kind == "mla"
    assert (forward_flops_per_token(cfg, 100, decode=True) > forward_flops_per_token(cfg, 100)) == absorbed


def test_prefill_in_row_parts_fills_the_same_caches():
    # Max-batch decode cells prefill a few rows per forward into views of the batch's caches.
    from dsbench.workloads import prefill_caches

    for kind in ("mha", "mla", "mla-naive"):
        cfg = CONFIGS[kind]
        model, toks = seeded_model(cfg), tokens(cfg, 5, 12)
        whole, parts = (model.new_caches(5, 12, torch.float32, CPU) for _ in range(2))
        with torch.no_grad():
            a, b = prefill_caches(model, toks, whole, rows=5), prefill_caches(model, toks, parts, rows=2)
        assert rel_err(b, a) < 1e-6, kind
        for c_whole, c_parts in zip(whole, parts):
            assert all(rel_err(x, y) < 1e-6 for x, y in zip(c_parts.buffers(), c_whole.buffers())), kind


# -- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mla", "mla-odd"])
def test_every_mla_parameter_gets_a_gradient(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(cfg)
    toks = tokens(cfg, 2, 12)
    loss = torch.nn.functional.cross_entropy(model(toks[:, :-1]).flatten(0, 1), toks[:, 1:].flatten())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


# -- spec: the axis end to end -------------------------------------------------------------------


def _spec(**tables) -> dict:
    return {"name": "t", "device": "cpu", **tables}


def test_every_attention_value_expands_to_its_own_cell():
    spec = parse_spec(_spec(model={"size": "small"}, axes={"attention": list(KINDS), "workload": ["decode"]}))
    cells = expand(spec, "cpu")
    assert len({c.cell_id for c in cells}) == len(cells) == len(KINDS)
    rows = {c.axes["attention"]: static_row(c) for c in cells}
    assert [rows[k]["n_kv_heads"] for k in ("mha", "gqa", "mqa")] == [8, 2, 1]
    assert rows["mla"]["mla_impl"] == "absorbed" and rows["mla-naive"]["mla_impl"] == "naive"
    assert rows["mla"]["kv_lora_rank"] == 128 and rows["mla"]["qk_rope_head_dim"] == 16 and rows["mla"]["n_kv_heads"] is None
    assert "kv_lora_rank" not in rows["mha"] and "mla_impl" not in rows["gqa"]
    assert rows["mla"]["kv_cache_bytes_per_token"] / rows["mha"]["kv_cache_bytes_per_token"] == (128 + 16) / (2 * 8 * 32)


def test_mla_overrides_reach_mla_cells_only():
    raw = _spec(axes={"attention": ["mha", "mla"]}, attention={"kv_lora_rank": 48, "qk_rope_head_dim": 4})
    cells = {c.axes["attention"]: c for c in expand(parse_spec(raw), "cpu")}
    assert mla_dims(cells["mla"].model).Dc == 48
    plain = {c.axes["attention"]: c for c in expand(parse_spec(_spec(axes={"attention": ["mha", "mla"]})), "cpu")}
    assert cells["mha"].cell_id == plain["mha"].cell_id  # MLA settings do not split or rename MHA cells
    assert cells["mla"].cell_id != plain["mla"].cell_id


@pytest.mark.parametrize("raw, words", [
    (_spec(attention={"mla_impl": "naive"}), ["attention.mla_impl", "[axes] attention"]),
    (_spec(axes={"attention": ["mla"]}, attention={"qk_rope_head_dim": 5}), ["attention.qk_rope_head_dim", "5", "even"]),
    (_spec(attention={"q_lora_rank": -1}), ["attention.q_lora_rank", "-1"]),
    (_spec(axes={"attention": ["mha", "gqa"]}, attention={"n_kv_heads": 2}), ["attention.n_kv_heads", "2", "mha", "gqa"]),
    (_spec(axes={"workload": ["decode"]}, decode={"memory_budget_bytes": 1000}), ["decode.memory_budget_bytes", "1000", "raise"]),
    (_spec(axes={"workload": ["decode"]}, decode={"max_batch_context_lens": [128]}), ["decode.max_batch_context_lens", "budget"]),
    (_spec(axes={"workload": ["decode"]}, decode={"memory_budget_bytes": 10**8, "max_batch_context_lens": [64]}),
     ["decode.max_batch_context_lens", "64", "context_lens"]),
], ids=["mla-impl-axis-owned", "odd-rope", "q-lora-negative", "mha-gqa-kv-heads", "budget-too-small", "contexts-no-budget", "contexts-not-run"])
def test_bad_attention_input_is_one_clear_line(raw, words):
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_max_batch_cells_fit_the_budget():
    budget = 4 * 2**20
    raw = _spec(axes={"workload": ["decode"], "attention": ["mha", "mla"]},
                decode={"batch_size": 2, "context_lens": [64, 128], "new_tokens": 8, "memory_budget_bytes": budget,
                        "max_batch_context_lens": [128]})
    cells = expand(parse_spec(raw), "cpu")
    fit = [c for c in cells if "memory_budget_bytes" in c.workload]
    assert len(cells) == 6 and len(fit) == 2 and all(c.workload["context_len"] == 128 for c in fit)
    for c in fit:
        B, cfg = c.workload["batch_size"], c.model
        row = static_row(c)
        used = weight_bytes(cfg, 4) + kv_cache_bytes_per_token(cfg, 4) * B * 136
        assert used <= budget < used + kv_cache_bytes_per_token(cfg, 4) * 136  # the largest batch that fits
        assert B == max_batch(cfg, budget, 136) and row["kv_cache_bytes"] + row["weights_bytes"] == used
        assert "(max@4MiB)" in c.label()
    by_kind = {c.axes["attention"]: c.workload["batch_size"] for c in fit}
    assert by_kind["mla"] > by_kind["mha"]


@pytest.mark.parametrize("name", ["attention-cpu", "attention-gpu"])
def test_attention_presets_expand(name):
    spec = load_preset(name)
    # dsa is measured where it differs from MLA: contexts past index_topk (the long-context presets)
    assert set(spec.axes["attention"]) == set(KINDS) - {"dsa"} and set(spec.axes["workload"]) == {"prefill", "decode"}
    cells = expand(spec, "cpu" if name == "attention-cpu" else "cuda")
    fit = [c for c in cells if "memory_budget_bytes" in c.workload]
    assert fit and len(fit) % len(spec.axes["attention"]) == 0


# -- the workload measures the live cache --------------------------------------------------------


@pytest.mark.parametrize("kind", ["mla", "mla-naive", "gqa"])
def test_decode_workload_measures_the_analytic_cache(kind):
    from dsbench.data import load_dataset
    from dsbench.variants.precision import PRECISIONS
    from dsbench.workloads import Context, run_decode

    cfg = CONFIGS[kind]
    ctx = Context(seeded_model(cfg), load_dataset("synthetic", 0), CPU, PRECISIONS["fp32"], warmup=1, repeats=2)
    run = run_decode(ctx, {"batch_size": 2, "context_len": 16, "new_tokens": 2})
    assert run.summary["kv_cache_bytes_per_token_measured"] == kv_cache_bytes_per_token(cfg, 4)


# -- the ratio script ----------------------------------------------------------------------------


def test_ratio_script_builds_the_issue_table():
    path = Path(__file__).resolve().parents[1] / "scripts" / "attention_ratios.py"
    spec = importlib.util.spec_from_file_location("attention_ratios", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = []
    for kind, kv, tps in (("mha", 1024, 100.0), ("mla", 576, 150.0), ("mla-naive", 1280, 75.0)):
        common = dict(status="ok", attention=kind, context_len=64, kv_cache_bytes_per_token=kv, kv_cache_bytes_per_token_measured=kv)
        rows.append({**common, "workload": "decode", "batch_size": 4, "tokens_per_s_median": tps, "step_time_ms_median": 4e3 / tps})
        rows.append({**common, "workload": "decode", "batch_size": {"mha": 10, "mla": 20, "mla-naive": 8}[kind],
                     "memory_budget_bytes": 1e6, "tokens_per_s_median": 2 * tps, "step_time_ms_median": 1.0})
        rows.append({**common, "workload": "prefill", "context_len": None, "seq_len": 64, "batch_size": 4, "tokens_per_s_median": 1e3})
    table = module.ratio_table(pd.DataFrame(rows))
    row = table.set_index("context_len").loc[64]
    assert row["kv_bytes mla/mha"] == pytest.approx(576 / 1024)
    assert row["decode tok/s mla/mha"] == pytest.approx(1.5) and row["decode tok/s mla/mla-naive"] == pytest.approx(2.0)
    assert row["max-batch tok/s mla/mha"] == pytest.approx(1.5) and row["max batch mla/mha"] == pytest.approx(2.0)

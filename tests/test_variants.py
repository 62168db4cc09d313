"""The model in variants/: accounting against the instantiated modules, FLOPs against
FlopCounterMode, KV-cache bytes against the live tensors, cached decode against the full
forward, causality, RoPE, length limits, training, registry and gradient flow.

Everything runs on a CPU in fp32 with `debug` or smaller configs. Numerical comparisons use an
RMS-relative error ‖out − ref‖ / ‖ref‖ with a tolerance stated where it is used.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsbench.data import load_dataset
from dsbench.variants import registry
from dsbench.variants.attention import KVCache, MultiHeadAttention
from dsbench.variants.config import SIZES, config_from_size, with_parts
from dsbench.variants.decoder import (
    build_model,
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    param_counts,
)
from dsbench.variants.ffn import DenseFFN
from dsbench.variants.layers import RMSNorm, RotaryEmbedding
from dsbench.variants.precision import PRECISIONS, dtype_bytes, linear
from dsbench.workloads import Context, run_train

CPU = torch.device("cpu")

# Configs whose accounting is checked: named sizes, tied head, GQA/MQA, explicit head_dim, and
# odd widths (not powers of two) so no formula can pass by coincidence.
CONFIGS = {
    "debug": config_from_size("debug"),
    "small": config_from_size("small"),
    "tied": config_from_size("debug", tie_embeddings=True),
    "gqa": config_from_size("debug", n_kv_heads=2),
    "mqa": config_from_size("debug", n_kv_heads=1),
    "head_dim24": config_from_size("debug", head_dim=24),
    "gqa_head_dim24": config_from_size("debug", n_heads=6, n_kv_heads=3, head_dim=24),
    "odd": config_from_size("debug", d_model=96, n_heads=3, d_ff=200, vocab_size=250, n_layers=3),
}
# Configs that are run forward (kept to the cheap ones).
RUN_CONFIGS = ["debug", "gqa", "mqa", "head_dim24", "odd"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once


def seeded_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def random_tokens(cfg, B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -- parameter accounting ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_param_counts_match_the_instantiated_model(name):
    cfg = CONFIGS[name]
    model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts["params_total"] == numel(model)
    assert counts["params_active"] == counts["params_total"]  # dense FFN: every parameter is active
    assert counts["params_embedding"] == cfg.vocab_size * cfg.d_model == model.embed.weight.numel()


@pytest.mark.parametrize("name", CONFIGS)
def test_param_counts_match_each_part(name):
    cfg = CONFIGS[name]
    model = build_model(cfg)
    for i, block in enumerate(model.blocks):
        assert MultiHeadAttention.param_count(cfg) == numel(block.attn)
        assert DenseFFN.param_count(cfg, i) == numel(block.ffn)
        assert DenseFFN.active_param_count(cfg, i) == numel(block.ffn)
        assert RMSNorm.param_count(cfg.d_model) == numel(block.attn_norm) == numel(block.ffn_norm)
    assert RMSNorm.param_count(cfg.d_model) == numel(model.norm)


def test_tied_embeddings_share_one_tensor():
    cfg = CONFIGS["tied"]
    model = build_model(cfg)
    assert model.head.weight is model.embed.weight
    untied = param_counts(CONFIGS["debug"])["params_total"]
    assert untied - param_counts(cfg)["params_total"] == cfg.d_model * cfg.vocab_size


def test_param_counts_by_hand_for_debug():
    # debug: C=64, L=2, H=4, D=16, F=192, V=256, untied head.
    # per layer: attention 4·64·64 = 16384, FFN 3·64·192 = 36864, two norms 2·64 = 128
    # total: embedding 16384 + 2·(16384 + 36864 + 128) + final norm 64 + head 16384 = 139584
    assert param_counts(config_from_size("debug"))["params_total"] == 139_584


# -- FLOPs ---------------------------------------------------------------------------------------


def test_forward_flops_by_hand_for_debug():
    # debug: C=64, L=2, H=4, D=16, F=192, V=256; context 100 keys.
    # matmul params excluding the embedding: 2·(4·64·64 + 3·64·192) + 64·256 = 122880
    # projections + FFN + head: 2 · 122880 = 245760
    # attention scores and AV: 4·L·H·D·ctx = 4·2·4·16·100 = 51200
    assert forward_flops_per_token(config_from_size("debug"), 100) == 245_760 + 51_200
    # GQA only shrinks the K/V projections; scores and AV still run over all H query heads:
    # attention params 64·64 + 2·64·(2·16) + 64·64 = 12288 per layer.
    gqa = config_from_size("debug", n_kv_heads=2)
    assert forward_flops_per_token(gqa, 100) == 2 * (2 * (12288 + 36864) + 64 * 256) + 51_200


def _counted_flops(model, tokens, backend=None) -> dict[str, int]:
    """FlopCounterMode's forward FLOPs by op name (aten.mm, aten.bmm, …)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if backend is None:
            model(tokens)
        else:
            with sdpa_kernel(backend):
                model(tokens)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


# What FlopCounterMode counts for SDPA (torch 2.13):
# - Every formula it registers for SDPA (flash, efficient, cuDNN; `sdpa_flop_count`) counts the
#   full T×S score matrix, 4·B·H·T·S·D for QKᵀ and AV, whatever `is_causal` says.
# - The MATH backend decomposes into two bmm's over the full (T, T) matrix (with GQA the K/V
#   heads are expanded to H first), so it is counted as the same full matrix.
# - On a CPU the default backend dispatches to aten._scaled_dot_product_flash_attention_for_cpu,
#   which has no registered formula: FlopCounterMode counts 0 attention FLOPs there.
# So counted attention = analytic attention at context T (full), while the analytic convention
# for a causal forward uses the mean context (T + 1)/2 (a token at position p attends p + 1
# keys), i.e. counted · (T + 1)/(2T) — the causal halving, plus the diagonal.
@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_flop_counter_matches_the_analytic_flops(name):
    cfg, (B, T) = CONFIGS[name], (2, 24)
    model, tokens = seeded_model(cfg), random_tokens(cfg, B, T)
    n_tokens = B * T
    matmul = forward_flops_per_token(cfg, 0)  # projections + FFN + head: the context-free part
    attention_full = forward_flops_per_token(cfg, T) - matmul
    attention_causal = forward_flops_per_token(cfg, (T + 1) / 2) - matmul

    counted = _counted_flops(model, tokens, SDPBackend.MATH)
    assert set(counted) == {"aten.mm", "aten.bmm"}
    assert counted["aten.mm"] == matmul * n_tokens  # exact: every linear, LM head included
    assert counted["aten.bmm"] == attention_full * n_tokens  # SDPA counted over the full T×T
    assert attention_causal * n_tokens == counted["aten.bmm"] * (T + 1) / (2 * T)

    default = _counted_flops(model, tokens)
    assert default["aten.mm"] == matmul * n_tokens
    # The CPU kernel is unregistered (0); a registered one would count the full matrix.
    assert sum(default.values()) - default["aten.mm"] in (0, attention_full * n_tokens)


# -- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["debug", "gqa", "mqa", "gqa_head_dim24", "odd"])
def test_kv_cache_bytes_match_the_live_caches(name, dtype):
    cfg = CONFIGS[name]
    model = build_model(cfg)
    B, max_len = 3, 32
    caches = model.new_caches(B, max_len, dtype, CPU)
    expected = kv_cache_bytes_per_token(cfg, dtype_bytes(dtype))
    assert sum(c.live_bytes_per_token() for c in caches) == expected
    # Independently of live_bytes_per_token: the allocated bytes over B·max_len token slots.
    allocated = sum(c.k.nbytes + c.v.nbytes for c in caches)
    assert allocated == expected * B * max_len
    assert all(c.k.dtype == dtype and c.k.shape == (B, cfg.n_kv_heads(), max_len, cfg.head_dim()) for c in caches)


def test_kv_cache_bytes_by_hand():
    # debug MHA fp32: L·2·G·D·4 = 2·2·4·16·4 = 1024; GQA with G=2 halves it.
    assert kv_cache_bytes_per_token(config_from_size("debug"), 4) == 1024
    assert kv_cache_bytes_per_token(config_from_size("debug", n_kv_heads=2), 4) == 512
    assert kv_cache_bytes_per_token(config_from_size("debug", n_kv_heads=2), 2) == 256


# -- cached decode == full forward ---------------------------------------------------------------

# fp32: the cached path runs other SDPA kernels (explicit mask, no mask for T=1) over the same
# numbers, so only summation order differs: observed ~1e-7, bound 1e-5.
DECODE_TOL = 1e-5


def _decode_with_cache(model, tokens, chunks: list[int]) -> torch.Tensor:
    """Feed tokens through the caches in chunks of the given sizes; return all logits (B, T, V)."""
    B, T = tokens.shape
    caches = model.new_caches(B, T, torch.float32, CPU)
    out, pos = [], 0
    for size in chunks:
        out.append(model(tokens[:, pos:pos + size], pos, caches))
        pos += size
    assert pos == T
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", RUN_CONFIGS)
@pytest.mark.parametrize(
    "chunks",
    [[12, 1, 1, 1, 1, 1], [10, 7, 1, 1, 1, 1, 1]],
    ids=["prefill12+decode5", "prefill10+chunk7+decode5"],  # chunk 7 at start_pos 10: mask path
)
def test_cached_decode_matches_the_full_forward(name, chunks):
    cfg = CONFIGS[name]
    model = seeded_model(cfg)
    tokens = random_tokens(cfg, 2, sum(chunks))
    with torch.no_grad():
        full = model(tokens)  # (B, T, V), no cache
        cached = _decode_with_cache(model, tokens, chunks)
    pos = 0
    for size in chunks:  # every chunk, each decoded token on its own
        assert rel_err(cached[:, pos:pos + size], full[:, pos:pos + size]) < DECODE_TOL, (pos, size)
        pos += size


# -- causal masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["debug", "gqa"])
def test_future_tokens_do_not_change_earlier_logits(name):
    cfg = CONFIGS[name]
    model = seeded_model(cfg)
    tokens = random_tokens(cfg, 2, 20)
    j = 13
    changed = tokens.clone()
    changed[:, j:] = (changed[:, j:] + 1) % cfg.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert rel_err(after[:, :j], before[:, :j]) < 1e-6  # row-wise identical up to kernel order
    assert rel_err(after[:, j:], before[:, j:]) > 1e-3  # the change is visible where it may be


def test_forward_without_cache_at_an_offset_is_causal():
    cfg = CONFIGS["debug"]
    model = seeded_model(cfg)
    tokens = random_tokens(cfg, 1, 12)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        before, after = model(tokens, start_pos=5), model(changed, start_pos=5)
    assert rel_err(after[:, :-1], before[:, :-1]) < 1e-6


# -- RoPE ----------------------------------------------------------------------------------------


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(32)
    q, k = torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32)  # (B, H, T=1, D)

    def score(m: int, n: int) -> torch.Tensor:
        return (rope(q, m) * rope(k, n)).sum(-1)  # (B, H, 1)

    # angles up to 10 rad in fp32: the rotated products agree to ~1e-6 relative
    assert rel_err(score(10, 8), score(3, 1)) < 1e-5
    assert rel_err(score(100, 98), score(3, 1)) < 1e-5
    assert rel_err(score(3, 2), score(3, 1)) > 1e-2  # a different offset gives a different score


def test_rope_is_identity_at_position_zero_and_preserves_norms():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 4, 9, 16)  # (B, H, T, D)
    first = rope(x[:, :, :1], 0)
    assert torch.equal(first, x[:, :, :1])  # cos 0 = 1, sin 0 = 0 exactly
    rotated = rope(x, 37)
    pairs = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731 — each rotated pair's norm
    assert rel_err(pairs(rotated), pairs(x)) < 1e-6
    assert rel_err(rotated, x) > 1e-2


def test_rope_of_a_chunk_equals_rope_of_each_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    x = torch.randn(1, 2, 6, 16)
    whole = rope(x, 10)
    for t in range(6):
        assert torch.allclose(whole[:, :, t:t + 1], rope(x[:, :, t:t + 1], 10 + t), rtol=0, atol=1e-6)


def test_rope_rejects_an_odd_head_dim():
    with pytest.raises(ValueError, match="even head dim"):
        RotaryEmbedding(15)


# -- length limits -------------------------------------------------------------------------------


def test_context_longer_than_max_seq_len_raises():
    cfg = config_from_size("debug", max_seq_len=32)
    model = seeded_model(cfg)
    with pytest.raises(ValueError, match=r"positions up to 33 exceed max_seq_len 32"):
        model(random_tokens(cfg, 1, 33))
    caches = model.new_caches(1, 32, torch.float32, CPU)
    with pytest.raises(ValueError, match=r"positions up to 34 exceed max_seq_len 32"):
        model(random_tokens(cfg, 1, 4), start_pos=30, caches=caches)
    with pytest.raises(ValueError, match=r"cache length 33 exceeds max_seq_len 32"):
        model.new_caches(1, 33, torch.float32, CPU)
    with torch.no_grad():  # the limit itself is allowed
        assert model(random_tokens(cfg, 1, 2), start_pos=30, caches=caches).shape == (1, 2, cfg.vocab_size)


# -- training ------------------------------------------------------------------------------------


def test_debug_model_loss_falls():
    cfg = config_from_size("debug")
    torch.manual_seed(0)
    model = build_model(cfg)
    ctx = Context(model, load_dataset("synthetic", 0), CPU, PRECISIONS["fp32"], warmup=0, repeats=1)
    settings = dict(batch_size=8, seq_len=128, steps=40, lr=3e-3, weight_decay=0.0, beta1=0.9, beta2=0.95,
                    grad_clip=1.0, eval_batches=0)
    run = run_train(ctx, settings)
    losses = [value for _, metric, value, *_ in run.series if metric == "loss"]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(256), rel=0.05)  # init_std 0.02: near-uniform logits
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]  # observed ≈ 0.45 × initial


# -- registry and precision ----------------------------------------------------------------------


def test_axis_values_has_the_model_axes():
    axes = registry.axis_values()  # the workload axis is the workloads' registry's (tests/test_schema.py)
    assert set(axes) == {"ffn", "attention", "precision", "balance"}
    assert all(isinstance(values, tuple) and values for values in axes.values())
    assert "dense" in axes["ffn"] and "mha" in axes["attention"] and "fp32" in axes["precision"]


@pytest.mark.parametrize("kind", registry.ATTENTION)
def test_every_attention_variant_builds_runs_and_counts(kind):
    cfg = with_parts(config_from_size("debug"), attention={"kind": kind})
    torch.manual_seed(0)
    for layer in range(cfg.n_layers):  # a schedule's layers are other kinds (Attention.layer_config)
        module_cls, layer_cfg = registry.attention_layer(cfg, layer)
        module = module_cls.build(layer_cfg, layer)
        assert module_cls.param_count(layer_cfg) == numel(module)
        x = torch.randn(2, 7, cfg.d_model)
        assert module(x).shape == x.shape
    assert build_model(cfg)(random_tokens(cfg, 2, 7)).shape == (2, 7, cfg.vocab_size)


@pytest.mark.parametrize("kind", registry.FFN)
def test_every_ffn_variant_builds_runs_and_counts(kind):
    cfg = with_parts(config_from_size("debug"), ffn={"kind": kind})
    torch.manual_seed(0)
    module = registry.FFN[kind].module(cfg, 0)
    assert module.param_count(cfg, 0) == numel(module)
    x = torch.randn(2, 7, cfg.d_model)
    assert module(x).shape == x.shape
    assert build_model(cfg)(random_tokens(cfg, 2, 7)).shape == (2, 7, cfg.vocab_size)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_linear_is_bias_free(precision):
    layer = linear(precision, 7, 5)
    assert isinstance(layer, nn.Linear) and layer.bias is None and layer.weight.shape == (5, 7)


def test_model_has_no_biases():
    model = build_model(config_from_size("debug"))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_named_sizes_build_configs():
    for size, fields in SIZES.items():
        cfg = config_from_size(size)
        assert cfg.d_model == fields["d_model"] and cfg.ffn.d_ff == fields["d_ff"]
        assert cfg.head_dim() * cfg.attention.n_heads == cfg.d_model
        assert cfg.head_dim() % 2 == 0  # RoPE needs it


# -- gradient flow -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["debug", "tied", "gqa", "odd"])
def test_every_parameter_gets_a_finite_gradient(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = random_tokens(cfg, 2, 16)
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name_, p in model.named_parameters():
        assert p.grad is not None, name_
        assert torch.isfinite(p.grad).all(), name_
        assert p.grad.abs().sum() > 0, name_


def test_writing_past_the_cache_is_a_clear_error():
    cfg = CONFIGS["debug"]
    model = seeded_model(cfg)
    caches = model.new_caches(1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KV cache holds 8 positions"):
        model(random_tokens(cfg, 1, 9), 0, caches)

"""DeepSeek Sparse Attention (variants/dsa.py and lightning_indexer.py, DeepSeek-V3.2-Exp): the indexer's scores and RoPE
layout against direct computations, top-k selection (ties, k ≥ context: then DSA is MLA exactly),
sparse decode against the full sparse forward, causality, the KL by hand, the dense warm-up's
freezing, the FP8 indexer and its cache, accounting against the instance and FlopCounterMode, and
bad settings. CPU, fp32 unless stated, debug-sized models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsbench import spec
from dsbench.errors import SpecError
from dsbench.variants import dsa, lightning_indexer
from dsbench.variants.config import config_from_size
from dsbench.variants.decoder import build_model, kv_cache_bytes_per_token, param_counts
from dsbench.variants.layers import RotaryEmbedding
from dsbench.variants.mla import mla_dims

CPU = torch.device("cpu")


def dsa_config(topk=8, precision="fp32", **kw):
    cfg = config_from_size("debug", "dsa", "dense", index_topk=topk, **kw)
    return dataclasses.replace(cfg, precision=precision) if precision != "fp32" else cfg


def model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def tokens(B, T, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_non_interleaved_rope_is_deepseeks_layout():
    """DeepSeek's apply_rotary_emb(x, freqs, interleaved=False): channels i and i + D/2 form a pair."""
    D, T = 8, 5
    x = torch.randn(1, 1, T, D)
    rope = RotaryEmbedding(D, 10000.0, interleaved=False)
    freqs = torch.outer(torch.arange(T).float(), rope.inv_freq)
    pairs = torch.view_as_complex(x.view(1, 1, T, 2, D // 2).transpose(-1, -2).contiguous())  # (x_i, x_{i+D/2})
    y = torch.view_as_real(pairs * torch.polar(torch.ones_like(freqs), freqs)).flatten(3)
    expected = torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)
    torch.testing.assert_close(rope(x, 0), expected)


def test_indexer_scores_against_a_direct_computation():
    m = model(dsa_config(q_lora_rank=32))
    attn = m.blocks[0].attn
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        q_latent = attn.q_norm(attn.wq_a(x))
        ix = attn.indexer
        q, w = ix.queries(q_latent, x, 0)
        k = ix.key_values(ix.keys(x, 0))
        got = ix.score(q, w, k)
        n, D = ix.dims.n, ix.dims.D
        raw_w = ix.weights_proj(x)  # before the n^-½·d^-½ scaling
        for t in range(6):
            for s in range(6):
                direct = sum(raw_w[0, t, j] * n ** -0.5 * D ** -0.5 * torch.relu(q[0, j, t] @ k[0, s]) for j in range(n))
                assert got[0, t, s].item() == pytest.approx(direct.item(), rel=1e-5, abs=1e-7)
        # the key: LayerNorm(W^IK h), then RoPE on its first Dr channels only
        normed = torch.nn.functional.layer_norm(ix.wk(x), (D,), ix.k_norm.weight, ix.k_norm.bias, 1e-6)
        torch.testing.assert_close(k[..., ix.dims.Dr:], normed[..., ix.dims.Dr:])


def test_selection_is_a_causal_top_k_ties_to_the_lower_position_and_marks_masked_picks():
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [2.0, 5.0, 5.0, 0.0], [0.0, 3.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0]]])
    idx, valid = lightning_indexer.select(scores, 0, 2)
    picked = [sorted(zip(i.tolist(), v.tolist())) for i, v in zip(idx[0], valid[0])]
    assert [i for i, v in picked[0] if v] == [0]  # one causal key; the other pick is masked (invalid)
    assert [i for i, v in picked[1] if v] == [0, 1]  # position 2 (5.0) is in the future of query 1
    assert [i for i, v in picked[2] if v] == [1, 2]  # a tie for the second place: the lower position
    assert [i for i, v in picked[3] if v] == [2, 3]
    for t in range(4):  # every kept score ≥ every causal score left out
        kept = {i for i, v in picked[t] if v}
        left = [scores[0, t, s] for s in range(t + 1) if s not in kept]
        assert not left or min(scores[0, t, s] for s in kept) >= max(left)


def test_with_topk_covering_the_context_dsa_is_mla_exactly():
    mla = model(config_from_size("debug", "mla", "dense"))
    sparse = build_model(dsa_config(topk=64)).eval()
    missing, unexpected = sparse.load_state_dict(mla.state_dict(), strict=False)
    assert not unexpected and all(".indexer." in k for k in missing)
    x = tokens(2, 32)
    with torch.no_grad():
        assert torch.equal(sparse(x), mla(x))
        caches_a, caches_b = mla.new_caches(2, 40, torch.float32, CPU), sparse.new_caches(2, 40, torch.float32, CPU)
        mla(x, 0, caches_a), sparse(x, 0, caches_b)
        nxt = tokens(2, 1, seed=5)
        assert torch.equal(sparse(nxt, 32, caches_b), mla(nxt, 32, caches_a))


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_sparse_decode_equals_the_sparse_full_forward(precision):
    m = model(dsa_config(topk=8, precision=precision))
    B, L, N = 2, 20, 6
    x = tokens(B, L + N)
    with torch.no_grad():
        full = m(x)
        caches = m.new_caches(B, L + N, torch.float32, CPU)
        steps = [m(x[:, :L], 0, caches)[:, -1]]
        for i in range(N - 1):
            steps.append(m(x[:, L + i:L + i + 1], L + i, caches)[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, L - 1:L + N - 1], rtol=1e-4, atol=1e-5)


def test_no_future_token_reaches_an_earlier_position():
    m, i = model(dsa_config(topk=6)), 12
    x = tokens(2, 30)
    later = x.clone()
    later[:, i + 1:] = (later[:, i + 1:] + 11) % 256
    with torch.no_grad():
        torch.testing.assert_close(m(later)[:, :i + 1], m(x)[:, :i + 1], rtol=1e-6, atol=1e-6)


def test_kl_by_hand():
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    scores = torch.tensor([[[1.0, 0.0, 7.0], [0.0, 1.0, 2.0]]])
    valid = torch.tensor([[[True, True, False], [True, True, True]]])
    q0 = torch.tensor([1.0, 0.0]).softmax(0)
    q1 = torch.tensor([0.0, 1.0, 2.0]).softmax(0)
    kl0 = sum(pi * torch.log(pi / qi) for pi, qi in zip([0.5, 0.5], q0))
    kl1 = sum(pi * torch.log(pi / qi) for pi, qi in zip([0.2, 0.3, 0.5], q1))
    assert lightning_indexer.kl_to_indexer(p, scores, valid).item() == pytest.approx(((kl0 + kl1) / 2).item(), rel=1e-6)


@pytest.mark.parametrize("stage", ["sparse", "dense"])
def test_training_stages(stage):
    """sparse: the main model trains on the LM loss only, the indexer on its KL only (a detached
    input); dense warm-up: everything but the indexer is frozen."""
    m = model(dsa_config(topk=6, index_stage=stage)).train()
    m.freeze_for_training()
    batch = tokens(2, 24), tokens(2, 24, seed=2)
    out = m.forward_losses(*batch)
    assert set(out.losses) == {"lm", "indexer_kl"} and out.losses["indexer_kl"].item() >= 0
    indexer = {id(p) for blk in m.blocks for p in blk.attn.indexer.parameters()}
    if stage == "dense":  # frozen: the LM loss reaches no parameter at all
        assert all(p.requires_grad == (id(p) in indexer) for p in m.parameters())
        assert out.losses["lm"].grad_fn is None
    else:
        assert all(p.requires_grad for p in m.parameters())
        out.losses["lm"].backward(retain_graph=True)
        for p in m.parameters():  # the LM loss never reaches the indexer
            assert id(p) not in indexer or p.grad is None
    m.zero_grad()
    out.losses["indexer_kl"].backward()
    grads = {id(p) for p in m.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= indexer  # the KL trains the indexer alone


def test_staged_training_runs_mla_then_the_warm_up_then_sparse_in_one_optimizer():
    """index_stage = "staged": MLA steps (everything but the idle indexer trains, no KL), warm-up
    steps (the indexer alone, by KL), then sparse steps (everything). Each stage's gradients reach
    exactly its parameters, through the workload's own optimizer and step hook."""
    from dsbench.workloads.train import make_optimizer

    m = model(dsa_config(topk=6, index_stage="staged", index_dense_steps=2, index_warmup_steps=2)).train()
    optimizer = make_optimizer(m, {"weight_decay": 0.1, "lr": 1e-3, "beta1": 0.9, "beta2": 0.95})
    m.freeze_for_training()
    indexer = {id(p) for blk in m.blocks for p in blk.attn.indexer.parameters()}
    batch = tokens(2, 24), tokens(2, 24, seed=2)
    seen = []
    for step in range(6):
        m.begin_step(step)
        before = {id(p): p.detach().clone() for p in m.parameters()}
        out = m.forward_losses(*batch)
        out.total().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moved = {id(p) for p in m.parameters() if not torch.equal(before[id(p)], p.detach())}
        seen.append((m.blocks[0].attn.stage, set(out.losses), moved))
    assert [stage for stage, _, _ in seen] == ["base", "base", "dense", "dense", "sparse", "sparse"]
    everything = {id(p) for p in m.parameters()}
    for stage, losses, moved in seen:
        if stage == "base":
            assert losses == {"lm"} and moved == everything - indexer
        elif stage == "dense":
            assert losses == {"lm", "indexer_kl"} and moved == indexer
        else:
            assert losses == {"lm", "indexer_kl"} and moved == everything
    assert m.eval().blocks[0].attn.stage == "sparse"  # inference after training reads the last stage


def test_staged_fields_stay_out_of_identity_at_their_defaults():
    a = dsa_config().attention
    assert "index_dense_steps" not in a.identity() and "index_warmup_steps" not in a.identity()
    staged = dsa_config(index_stage="staged", index_warmup_steps=3).attention.identity()
    assert staged["index_warmup_steps"] == 3 and "index_dense_steps" not in staged  # 0 is its default


def test_fp8_indexer_keys_are_e4m3_with_power_of_two_scales_in_the_cache():
    cfg = dsa_config(topk=8, precision="fp8", index_head_dim=32)
    m = model(cfg)
    caches = m.new_caches(1, 16, torch.bfloat16, CPU)
    with torch.no_grad():
        m.to(torch.bfloat16)(tokens(1, 10), 0, caches)
    cache = caches[0]
    assert cache.index_k.dtype == torch.float8_e4m3fn
    scales = cache.index_k_scale[:, :10]
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # ue8m0
    assert sum(c.live_bytes_per_token() for c in caches) == kv_cache_bytes_per_token(cfg, 2)


def test_hadamard_is_orthogonal_in_sylvester_order():
    h = lightning_indexer.hadamard(8)
    torch.testing.assert_close(h @ h.T, torch.eye(8))
    assert torch.equal(torch.sign(h[1]), torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1]))


@pytest.mark.parametrize("kw", [dict(topk=8), dict(topk=8, q_lora_rank=32), dict(topk=8, index_n_heads=3, index_head_dim=24)])
def test_params_and_kv_bytes_match_the_instance(kw):
    cfg = dsa_config(**kw)
    m = model(cfg)
    assert param_counts(cfg)["params_total"] == sum(p.numel() for p in m.parameters())
    caches = m.new_caches(2, 16, torch.float32, CPU)
    assert sum(c.live_bytes_per_token() for c in caches) == kv_cache_bytes_per_token(cfg, 4)


@pytest.mark.parametrize("context", [24, 40, 100])
def test_decode_flops_match_the_flop_counter(context):
    """One decoded token over `context` keys, K = 8 selected: projections, the indexer over every
    key, the main attention over K gathered latent rows — exactly the analytic count."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dsa_config(topk=8)
    attn = model(cfg).blocks[0].attn
    cache = attn.new_cache(1, context, torch.float32, CPU)
    with torch.no_grad():
        attn(torch.randn(1, context - 1, 64), 0, cache)
        with FlopCounterMode(display=False) as counter:
            attn(torch.randn(1, 1, 64), context - 1, cache)
    assert counter.get_total_flops() == dsa.DeepSeekSparseAttention.flops_per_token(cfg, context, decode=True)
    indexer = dsa.DeepSeekSparseAttention.indexer_flops_per_token(cfg, context)
    d = mla_dims(cfg)
    assert counter.get_total_flops() - indexer == 2 * attn._matmul_params(cfg) + 2 * d.H * (2 * d.Dc + d.Dr) * 8


def _prefill_flops(cfg, T):
    from torch.utils.flop_counter import FlopCounterMode

    attn = model(cfg).blocks[0].attn
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        attn(torch.randn(1, T, 64), 0, None)
    return counter.get_total_flops()


@pytest.mark.parametrize("T", [41, 75])
def test_prefill_flops_are_the_causal_count_and_chunks_add_only_their_own_keys(T, monkeypatch):
    """The analytic prefill count is the causal one (each query scores its own earlier keys). The
    module runs exactly that with one query per chunk; with QUERY_CHUNK queries a chunk scores the
    keys up to its last query, and FlopCounterMode sees exactly those extra keys."""
    cfg, d, K = dsa_config(topk=8), mla_dims(dsa_config(topk=8)), 8
    monkeypatch.setattr(dsa, "QUERY_CHUNK", 1)
    per_token = dsa.DeepSeekSparseAttention.flops_per_token(cfg, (T + 1) / 2)
    assert _prefill_flops(cfg, T) == pytest.approx(T * per_token, rel=1e-12)
    monkeypatch.setattr(dsa, "QUERY_CHUNK", 16)
    proj = 2 * dsa.DeepSeekSparseAttention._matmul_params(cfg)
    chunked = sum(min(16, T - t0) * (dsa.DeepSeekSparseAttention.indexer_flops_per_token(cfg, min(t0 + 16, T)) + proj
                                     + 2 * d.H * (2 * d.Dc + d.Dr) * min(K, t0 + 16, T))
                  for t0 in range(0, T, 16))
    assert _prefill_flops(cfg, T) == chunked > T * per_token


def test_query_chunks_change_no_output(monkeypatch):
    """Chunking the queries (and truncating each chunk's keys) computes the same attention, in both
    whole-sequence forms, in training (the KL too) and at inference."""
    batch = tokens(2, 40), tokens(2, 40, seed=2)
    for form in dsa.PREFILL_FORMS:
        results = []
        for chunk in (256, 7):
            monkeypatch.setattr(dsa, "QUERY_CHUNK", chunk)
            m = model(dsa_config(topk=6, dsa_prefill=form)).train()
            out = m.forward_losses(*batch)
            with torch.no_grad():
                results.append((out.logits, out.losses["indexer_kl"], m.eval()(batch[0])))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_token_cost_flattens_against_mla():
    mla, sparse = config_from_size("debug", "mla", "dense"), dsa_config(topk=8)
    f = dsa.DeepSeekSparseAttention.flops_per_token
    g = type(build_model(mla).blocks[0].attn).flops_per_token
    main = [f(sparse, c, True) - dsa.DeepSeekSparseAttention.indexer_flops_per_token(sparse, c) for c in (100, 1000, 10000)]
    assert main[0] == main[1] == main[2]  # the main attention reads K keys whatever the context
    assert g(mla, 10000, True) > f(sparse, 10000, True)


@pytest.mark.parametrize("attention, needle", [
    ({"index_topk": 0}, "attention.index_topk: expected a positive integer, got 0"),
    ({"index_head_dim": 8}, "attention.index_head_dim: 8 does not fit the indexer's RoPE channels (qk_rope_head_dim 8)"),
    ({"index_stage": "warm"}, "attention.index_stage: 'warm'"),
    ({"index_warmup_steps": 5}, "attention.index_warmup_steps: 5 is read only with index_stage = 'staged'"),
    ({"index_stage": "staged", "index_dense_steps": 3}, "attention.index_warmup_steps: 0 with index_stage = 'staged'"),
    ({"index_stage": "staged", "index_dense_steps": 50, "index_warmup_steps": 50},
     "attention.index_warmup_steps: index_dense_steps 50 + index_warmup_steps 50 leave no sparse step of train.steps 50"),
])
def test_bad_settings_are_one_line(attention, needle):
    raw = {"name": "d", "device": "cpu", "axes": {"attention": "dsa"}, "attention": attention}
    with pytest.raises(SpecError) as e:
        spec.parse_spec(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fp8_indexer_needs_a_power_of_two_head_dim():
    raw = {"name": "d", "device": "cpu", "axes": {"attention": "dsa", "precision": "fp8"}, "attention": {"index_head_dim": 24}}
    with pytest.raises(SpecError, match="index_head_dim: 24 is not a power of two"):
        spec.parse_spec(raw)


@pytest.mark.parametrize("workload", ["train", "decode"])
def test_roofline_parts_sum_to_the_cells_flops(workload):
    from dsbench import accounting, roofline

    raw = {"name": "d", "device": "cpu", "axes": {"attention": "dsa", "workload": workload}, "attention": {"index_topk": 16},
           "train": {"seq_len": 64, "batch_size": 2, "steps": 4}, "decode": {"context_lens": [100], "new_tokens": 4},
           "measure": {"warmup": 1}}
    [cell] = spec.expand(spec.parse_spec(raw), "cpu")
    costs = roofline.part_costs(cell)
    assert sum(c.flops for c in costs.values()) == pytest.approx(accounting.flops_per_token(cell) * accounting.tokens_per_step(cell), rel=1e-12)
    assert costs["indexer"].flops > 0 and costs["indexer"].bytes > 0


def test_masked_prefill_equals_the_gathered_one():
    """The two forms of a whole sequence compute the same attention (to fp32 rounding), and the
    KL target is the same."""
    gather, masked = model(dsa_config(topk=6)).train(), model(dsa_config(topk=6, dsa_prefill="masked")).train()
    batch = tokens(2, 30), tokens(2, 30, seed=2)
    a, b = gather.forward_losses(*batch), masked.forward_losses(*batch)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.losses["indexer_kl"], b.losses["indexer_kl"], rtol=1e-5, atol=1e-7)


# --- YaRN (mla and dsa) ---


def deepseek_yarn_freqs(dim, seqlen, original, theta, factor, beta_fast, beta_slow):
    """DeepSeek-V3 inference/model.py precompute_freqs_cis, restated."""
    import math

    def corr(rot):
        return dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if seqlen > original:
        hi = high + 0.001 if low == high else high
        smooth = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (hi - low), 0, 1)
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


@pytest.mark.parametrize("kind", ["mla", "dsa"])
def test_yarn_frequencies_and_softmax_scale_are_deepseeks(kind):
    from dsbench.variants import mla

    cfg = config_from_size("debug", kind, "dense", max_seq_len=1024, rope_factor=40.0, original_seq_len=128, mscale=1.0,
                           qk_rope_head_dim=16)
    attn = build_model(cfg).blocks[0].attn
    expected = deepseek_yarn_freqs(16, 1024, 128, 10000.0, 40.0, 32, 1)
    torch.testing.assert_close(attn.rope.inv_freq, expected)
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert attn.scale == pytest.approx((mla_dims(cfg).Dn + 16) ** -0.5 * m * m)
    if kind == "dsa":  # the indexer rotates with the same frequencies (DeepSeek passes one freqs_cis)
        torch.testing.assert_close(attn.indexer.rope.inv_freq, expected)
    # max_seq_len within original_seq_len: YaRN stays off, the plain frequencies and scale
    off = config_from_size("debug", kind, "dense", max_seq_len=1024, rope_factor=40.0, original_seq_len=4096, qk_rope_head_dim=16)
    plain = build_model(off).blocks[0].attn
    assert not mla.yarn_active(off) and torch.equal(plain.rope.inv_freq, RotaryEmbedding(16).inv_freq)
    assert plain.scale == (mla_dims(off).Dn + 16) ** -0.5


def test_yarn_fields_stay_out_of_identity_at_their_defaults():
    plain = config_from_size("debug", "mla", "dense")
    assert "rope_factor" not in plain.to_dict()["attention"]
    scaled = config_from_size("debug", "mla", "dense", rope_factor=4.0)
    assert scaled.to_dict()["attention"]["rope_factor"] == 4.0


def test_kept_mass_is_measured_only_while_observing_and_is_the_selected_share():
    m = model(dsa_config(topk=4))
    x = tokens(2, 24)
    with torch.no_grad():
        m(x)
        assert m.collect_metrics()[1] == {}  # an unobserved (timed) forward measures nothing
        with m.observing():
            m(x)
    columns = m.collect_metrics()[1]
    assert 0 < columns["indexer_kept_mass"] < 1
    attn = m.blocks[0].attn
    with torch.no_grad():  # by hand for layer 0: the dense mass on the indexer's top-4
        h = m.embed(x)
        h = m.blocks[0].attn_norm(h)
        q_latent = h  # debug MLA has no query compression
        p = dsa.dense_attention_mass(attn, h, q_latent)
        q, w = attn.indexer.queries(q_latent, h, 0)
        idx, valid = lightning_indexer.select(attn.indexer.score(q, w, attn.indexer.key_values(attn.indexer.keys(h, 0))), 0, 4)
        by_hand = (torch.gather(p, -1, idx) * valid).sum(-1).mean().item()
    assert attn.kept_mass[0] == pytest.approx(by_hand, rel=1e-6)


def test_fp8_constants_are_the_kernels_and_importing_dsa_leaves_triton_unloaded():
    import subprocess
    import sys

    from dsbench.kernels import fp8_quant

    assert (lightning_indexer.FP8_DTYPE, lightning_indexer.FP8_MAX, lightning_indexer.GROUP) == (fp8_quant.FP8_DTYPE, fp8_quant.FP8_MAX, fp8_quant.GROUP)
    code = "import sys, dsbench.variants.registry; print('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_sparse_part_costs_are_the_traffic_that_runs():
    """Decoding past index_topk: the main attention moves each selected latent row three times
    (read by the gather, written, read back by the two matmuls), whatever the context; the indexer
    reads every cached key once and writes and reads each fp32 score once."""
    from dsbench.variants.base import PassShape

    cfg = dsa_config(topk=8)
    d, i = mla_dims(cfg), lightning_indexer.indexer_dims(cfg)
    row, qo = (d.Dc + d.Dr) * 4, d.H * (2 * d.Dc + d.Dr) * 4
    params = dsa.DeepSeekSparseAttention._indexer_params(cfg) * 4
    for context in (100, 1000):
        costs = dsa.DeepSeekSparseAttention.part_costs(cfg, PassShape(tokens=2, mean_context_len=context, decode=True, batch=2,
                                                                      act_bytes=4, weight_bytes=4))
        assert costs["attn.core"].bytes == 2 * (3 * 8 * row + qo + row)
        assert costs["indexer"].bytes == 2 * context * (i.D * 4 + 8) + params
    dense = dsa.DeepSeekSparseAttention.part_costs(cfg, PassShape(tokens=2, mean_context_len=6, decode=True, batch=2, act_bytes=4, weight_bytes=4))
    mla_costs = dsa.MultiHeadLatentAttention.part_costs(cfg, PassShape(tokens=2, mean_context_len=6, decode=True, batch=2, act_bytes=4,
                                                                       weight_bytes=4))
    assert dense["attn.core"].bytes == mla_costs["attn.core"].bytes  # every key selected: MLA's own path and traffic

"""DeepSeek-V4's compressed attention against Hugging Face's deepseek_v4 with the same weights.

Covered so far (fp32, max abs <= 1e-5; measured: 0.0, the same ops in the same order):
- the KV compressor HCA and CSA share (variants/v4_compressor.py) vs HF's
  DeepseekV4HCACompressor, DeepseekV4CSACompressor and the CSA indexer's own compressor;
- a whole attention layer (variants/v4_attention_core.py) vs HF's DeepseekV4Attention for
  sliding_attention, heavily_compressed_attention and compressed_sparse_attention, prefill;
- the CSA indexer's selected entries vs HF's DeepseekV4Indexer (equal as sets; a tie in the
  index scores could legitimately pick another entry, random weights give none here).

- decode over the cache (variants/v4_attention_core.py V4Cache) vs HF's DeepseekV4HCACache /
  DeepseekV4CSACache: a prefill then one token at a time, windows closing mid-decode.

Intended differences from HF:
- The indexer's ties go to the earliest entry (a stable sort), so a decode step picks what the
  whole-sequence forward picks; HF's topk leaves ties unspecified. The cases here use 8 indexer
  heads, so that no entry scores exactly 0 in every head (with 2, a quarter of them would tie).
- The indexer returns a (B, T, E) bool selection; HF returns indices with -1 for picks that
  are not yet closed. The same set.
- Compress-layer RoPE is "default" here and in the HF config used: V4 ships YaRN (factor 16)
  on compress layers, which only acts beyond 65,536 positions; not built.
- HF applies CSA's selection (its block bias) only onto a tensor attention mask; the decode
  test passes one, as generate() does.
"""

from __future__ import annotations

import pytest
import torch

from hf_deepseek_v4 import configuration, modeling
from dsbench.variants.v4_compressor import KVCompressor

C, HEAD_DIM, ROPE_DIM, INDEX_DIM = 32, 16, 8, 12
INDEX_HEADS = 8  # enough that no entry scores exactly 0 in every head (a tie HF breaks arbitrarily)
RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}


def hf_config():
    return configuration().DeepseekV4Config(
        hidden_size=C, head_dim=HEAD_DIM, partial_rotary_factor=ROPE_DIM / HEAD_DIM, num_attention_heads=2,
        q_lora_rank=24, index_head_dim=INDEX_DIM, index_n_heads=INDEX_HEADS, index_topk=3, compress_rates=dict(RATES),
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


def hf_attention_case(layer_type: str, T: int):
    """HF's DeepseekV4Attention of `layer_type` with random weights, ours with the same, and x."""
    from dsbench.variants.v4_attention_core import V4AttentionCore, V4Indexer
    mod = modeling()
    cfg = hf_config()
    cfg.layer_types = [layer_type, layer_type]
    cfg.sliding_window, cfg.o_groups, cfg.o_lora_rank = 6, 2, 10
    hf = mod.DeepseekV4Attention(cfg, 0).float().eval()
    randomize(hf, seed=T)
    compressor = None
    if layer_type != "sliding_attention":
        ratio = RATES[layer_type]
        compressor = KVCompressor(C, HEAD_DIM, ratio, layer_type == "compressed_sparse_attention", ROPE_DIM, 160000.0)
    theta = 10000.0 if layer_type == "sliding_attention" else 160000.0
    indexer = None
    if layer_type == "compressed_sparse_attention":
        indexer = V4Indexer(C, 24, INDEX_HEADS, INDEX_DIM, 3, RATES[layer_type], ROPE_DIM, 160000.0)
    ours = V4AttentionCore(C, 2, HEAD_DIM, ROPE_DIM, 24, 2, 10, 6, theta, compressor, indexer)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(hf.get_parameter(name.replace("indexer.", "compressor.indexer.").replace(
                "compressor.indexer.compressor.", "compressor.indexer.").replace("indexer.weights_proj", "indexer.scorer.weights_proj")).float())
    return mod, cfg, hf, ours, torch.randn(2, T, C)


def hf_attention_forward(mod, cfg, hf, x):
    T = x.shape[1]
    rope = mod.DeepseekV4RotaryEmbedding(cfg)
    positions = torch.arange(T)[None].expand(x.shape[0], -1)
    embeddings = {kind: rope(x, positions, layer_type=kind) for kind in ("main", "compress")}
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (j > i - cfg.sliding_window)
    mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))[None, None].expand(x.shape[0], 1, T, T)
    return hf(x, embeddings, positions, mask, None)[0]


@pytest.mark.parametrize("layer_type", ["sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention"])
@pytest.mark.parametrize("T", [9, 20])
def test_attention_prefill_matches_hf(layer_type, T):
    torch.manual_seed(2)
    mod, cfg, hf, ours, x = hf_attention_case(layer_type, T)
    with torch.no_grad():
        expected, got = hf_attention_forward(mod, cfg, hf, x), ours(x)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("T", [13, 33])
def test_indexer_selects_what_hf_selects(T):
    """Same entries per query as HF's DeepseekV4Indexer (as sets; ties would be the exception,
    random fp32 weights give none here)."""
    torch.manual_seed(3)
    mod, cfg, hf, ours, x = hf_attention_case("compressed_sparse_attention", T)
    q_latent = torch.randn(2, T, 24)
    with torch.no_grad():
        picked = ours.indexer(x, q_latent)
        hf_indices = hf.compressor.indexer(x, q_latent, torch.arange(T)[None].expand(2, -1), None, 0)
    expected = torch.zeros_like(picked)
    for b, t, k in (hf_indices >= 0).nonzero().tolist():
        expected[b, t, hf_indices[b, t, k]] = True
    assert picked.sum() > 0
    assert torch.equal(picked, expected)


@pytest.mark.parametrize("layer_type", ["sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention"])
def test_attention_is_causal(layer_type):
    """Changing tokens from position 12 on leaves every output before 12 bit-identical."""
    torch.manual_seed(4)
    _, _, _, ours, x = hf_attention_case(layer_type, 20)
    later = x.clone()
    later[:, 12:] = torch.randn_like(later[:, 12:])
    with torch.no_grad():
        a, b = ours(x), ours(later)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def hf_cache(mod, cfg):
    """HF's cache for the case's two layers (its layer 0 is the one under test)."""
    from transformers.cache_utils import DynamicCache
    return DynamicCache(config=cfg)


@pytest.mark.parametrize("layer_type", ["sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention"])
def test_attention_decode_matches_hf(layer_type):
    """A prefill of 11 tokens, then one token at a time to 30, each over the cache (ours:
    V4Cache; HF: DeepseekV4HCACache / DeepseekV4CSACache): every step's output equal within
    1e-5, entries closing mid-decode included (HCA m' = 8, CSA m = 4)."""
    torch.manual_seed(5)
    mod, cfg, hf, ours, x = hf_attention_case(layer_type, 30)
    rope = mod.DeepseekV4RotaryEmbedding(cfg)
    cache, theirs, prefix = ours.new_cache(2, 30, torch.float32, "cpu"), hf_cache(mod, cfg), 11

    def hf_step(start: int, stop: int):
        positions = torch.arange(start, stop)[None].expand(2, -1)
        chunk = x[:, start:stop]
        embeddings = {kind: rope(chunk, positions, layer_type=kind) for kind in ("main", "compress")}
        if start == 0:  # the prefill's window mask
            i, j = torch.arange(stop)[:, None], torch.arange(stop)[None, :]
            allowed = (j <= i) & (j > i - cfg.sliding_window)
            mask = torch.zeros(stop, stop).masked_fill(~allowed, float("-inf"))[None, None].expand(2, 1, stop, stop)
        else:  # a one-token step sees every window key the cache hands back; a tensor mask, as generate()
            # passes one: HF adds the CSA indexer's block bias only onto a tensor mask
            mask = torch.zeros(2, 1, 1, min(start, cfg.sliding_window - 1) + 1)
        return hf(chunk, embeddings, positions, mask, theirs)[0]

    with torch.no_grad():
        pairs = [(ours(x[:, :prefix], 0, cache), hf_step(0, prefix))]
        pairs += [(ours(x[:, t:t + 1], t, cache), hf_step(t, t + 1)) for t in range(prefix, 30)]
    worst = max((a - b).abs().max().item() for a, b in pairs)
    assert worst <= 1e-5
    if layer_type != "sliding_attention":
        assert cache.state("compressor", 30).first_entry == theirs.layers[0].entry_count["compressor"] == 30 // RATES[layer_type]

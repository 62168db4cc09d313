"""Exact analytic accounting of DeepSeek-V4 (Pro, Flash) and of DeepSeek-V3.2, the model the V4
report measures its 1M-context savings against.

V4 is not a LLaMA-style decoder with MLA (dsbench/official.py's counter): every layer has a single
shared KV head of dimension `head_dim`, a low-rank query, a grouped output projection, attention
sinks, a sliding window and, per `compress_ratios`, a compressor (CSA: ratio 4, with a lightning
indexer; HCA: ratio 128; 0: the window only), mHC residual streams around attention and FFN, and an
MoE FFN in every layer (the first `num_hash_layers` routed by a frozen token → expert table). The
counts follow Hugging Face's `transformers.models.deepseek_v4` module tree parameter for parameter
(tests/test_official_v4.py builds that model on the meta device and compares); buffers (the hash
table `tid2eid`, the routers' score-correction bias, rotary tables) are not parameters there, and
not here. The MTP layer (the last `compress_ratios` entry) is not part of the main model and is
not counted, as dsbench counts V3's.

    arch = load_v4("deepseek-v4-pro")
    param_counts(arch)                      # total, activated (input embedding not counted, V3's convention)
    kv_cache_bytes(arch, 1_048_576)         # one sequence's cache at 1M tokens, V4's storage formats
    decode_flops_per_token(arch, 1_048_576) # the forward of one new token at that context

    v32 = load_v32()                        # DeepSeek-V3.2: V3 + DSA's lightning indexer
    v32_kv_cache_bytes(v32, 1_048_576); v32_decode_flops_per_token(v32, 1_048_576)

FLOPs follow dsbench's convention (variants/decoder.py FLOP_CONVENTION): 2 per multiply-add,
matmuls only (norms, softmax, Sinkhorn and the compressor's gated pooling are elementwise and not
counted). A decode token's attention reads what V4 reads: the window's `min(L, sliding_window)`
entries plus, in an HCA layer, every one of the `L // 128` compressed entries, and in a CSA layer
`min(index_topk, L // 4)` of them, chosen by an indexer that scores all `L // 4`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from importlib import resources

from dsbench import official
from dsbench.errors import OfficialConfigError

V4_MODELS = ("deepseek-v4-pro", "deepseek-v4-flash")
CSA, HCA, WINDOW_ONLY = 4, 128, 0  # compress_ratios' values (HF configuration_deepseek_v4 _COMPRESS_RATIO_TO_LAYER_TYPE)

# Storage, bytes per element, as the V4 report states its KV cache: compressed and window entries
# keep the RoPE dimensions in BF16 and the rest in FP8; the CSA indexer's QK path runs in FP4.
# V3.2 (FlashMLA's FP8 cache, DeepGEMM's FP8 indexer keys): the latent in FP8, its RoPE part in
# BF16, indexer keys in FP8. Per-block quantisation scales are left out on both sides.
BF16, FP8, FP4 = 2.0, 1.0, 0.5


@dataclass(frozen=True)
class V4Arch:
    """A V4 config.json's architecture fields (Hugging Face names)."""

    name: str
    source: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    n_shared_experts: int
    moe_intermediate_size: int
    num_experts_per_tok: int
    num_hash_layers: int
    hc_mult: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    tie_word_embeddings: bool = False

    def ratio(self, i: int) -> int:
        return self.compress_ratios[i]

    @property
    def layers(self) -> range:
        return range(self.num_hidden_layers)


@dataclass(frozen=True)
class V32Arch:
    """DeepSeek-V3.2: DeepSeek-V3's architecture (official.Arch) and its lightning indexer."""

    base: official.Arch
    index_n_heads: int
    index_head_dim: int
    index_topk: int


def _raw(name: str) -> dict:
    return json.loads(resources.files("dsbench").joinpath("official_configs", f"{name}.json").read_text())


def load_v4(name: str) -> V4Arch:
    if name not in V4_MODELS:
        raise OfficialConfigError(f"official config: unknown V4 model {name!r}; allowed: {', '.join(V4_MODELS)}")
    raw = _raw(name)
    known = {f.name for f in fields(V4Arch)} - {"name", "source", "compress_ratios"}
    ratios = tuple(raw["compress_ratios"][: raw["num_hidden_layers"]])  # the trailing entries are the MTP layers'
    return V4Arch(name=name, source=raw["_source"], compress_ratios=ratios, **{k: v for k, v in raw.items() if k in known})


def load_v32() -> V32Arch:
    raw = _raw("deepseek-v3.2")
    known = {f.name for f in fields(official.Arch)}
    base = official.Arch(name="deepseek-v3.2", source=raw["_source"], **{k: v for k, v in raw.items() if k in known})
    return V32Arch(base, raw["index_n_heads"], raw["index_head_dim"], raw["index_topk"])


# --- V4 parameters, per part (HF DeepseekV4* modules) ---


def attention_matmul_params(a: V4Arch) -> int:
    """q_a, q_b, kv, the grouped o_a (each of o_groups groups maps H·head_dim/g to o_lora_rank) and o_b."""
    D, H, hd = a.hidden_size, a.num_attention_heads, a.head_dim
    return D * a.q_lora_rank + a.q_lora_rank * H * hd + D * hd + H * hd * a.o_lora_rank + a.o_groups * a.o_lora_rank * D


def compressor_matmul_params(a: V4Arch, i: int) -> int:
    """The compressor's kv and gate projections; CSA's overlapping windows project 2·head_dim
    (V4 report §2.3.1; HF DeepseekV4CSACompressor), HCA's one head_dim."""
    r = a.ratio(i)
    if r == WINDOW_ONLY:
        return 0
    width = 2 * a.head_dim if r == CSA else a.head_dim
    return 2 * a.hidden_size * width


def indexer_matmul_params(a: V4Arch, i: int) -> int:
    """CSA's lightning indexer: its own compressor (kv, gate at 2·index_head_dim), its query from
    the low-rank q (q_b) and the per-head weights (HF DeepseekV4Indexer, DeepseekV4IndexerScorer)."""
    if a.ratio(i) != CSA:
        return 0
    D, ih, ihd = a.hidden_size, a.index_n_heads, a.index_head_dim
    return 2 * D * 2 * ihd + a.q_lora_rank * ih * ihd + D * ih


def attention_params(a: V4Arch, i: int) -> int:
    """Layer i's attention: matmuls, q_a and kv norms, sinks, compressor (+ indexer) position
    biases and norms."""
    hd, r = a.head_dim, a.ratio(i)
    n = attention_matmul_params(a) + compressor_matmul_params(a, i) + indexer_matmul_params(a, i)
    n += a.q_lora_rank + hd + a.num_attention_heads  # q_a_norm, kv_norm, sinks
    if r != WINDOW_ONLY:
        width = 2 * hd if r == CSA else hd
        n += r * width + hd  # position_bias, kv_norm
    if r == CSA:
        n += CSA * 2 * a.index_head_dim + a.index_head_dim
    return n


def swiglu_params(a: V4Arch) -> int:
    return 3 * a.hidden_size * a.moe_intermediate_size


def ffn_params(a: V4Arch, active: bool) -> int:
    """Router weight (a hash layer keeps one too: it weights the experts the table picks) and the
    routed (top-k when active) and shared experts."""
    routed = a.num_experts_per_tok if active else a.n_routed_experts
    return a.n_routed_experts * a.hidden_size + (routed + a.n_shared_experts) * swiglu_params(a)


def hyper_connection_params(a: V4Arch) -> int:
    """One mHC module (mHC 2512.24880; HF DeepseekV4HyperConnection): fn maps the n flattened
    streams to pre (n), post (n) and comb (n·n) logits, plus their base and 3 scales."""
    n = a.hc_mult
    mixes = (2 + n) * n
    return mixes * n * a.hidden_size + mixes + 3


def hyper_head_params(a: V4Arch) -> int:
    """The head that folds the n streams into one before the final norm (HF DeepseekV4HyperHead)."""
    n = a.hc_mult
    return n * n * a.hidden_size + n + 1


def layer_params(a: V4Arch, i: int, active: bool) -> int:
    return attention_params(a, i) + ffn_params(a, active) + 2 * a.hidden_size + 2 * hyper_connection_params(a)


@dataclass(frozen=True)
class V4ParamCounts:
    total: int
    activated: int  # the input embedding table not counted (V2/V3's convention)
    activated_with_embedding: int
    embedding: int
    head: int
    routed_experts: int  # all layers' routed experts: what total has and activated mostly does not


def param_counts(a: V4Arch) -> V4ParamCounts:
    D = a.hidden_size
    embedding = a.vocab_size * D
    head = 0 if a.tie_word_embeddings else a.vocab_size * D
    outside = D + hyper_head_params(a) + head  # final norm, the streams' head, output head
    total = embedding + sum(layer_params(a, i, active=False) for i in a.layers) + outside
    activated = sum(layer_params(a, i, active=True) for i in a.layers) + outside
    return V4ParamCounts(total=total, activated=activated, activated_with_embedding=activated + embedding,
                         embedding=embedding, head=head,
                         routed_experts=a.num_hidden_layers * a.n_routed_experts * swiglu_params(a))


# --- KV cache of one sequence at context L ---


def compressed_entries(a: V4Arch, i: int, context: int) -> int:
    r = a.ratio(i)
    return 0 if r == WINDOW_ONLY else context // r


def kv_cache_elements(a: V4Arch, context: int) -> int:
    """Every layer: its window (min(L, sliding_window) entries of head_dim), its compressed
    entries (L // ratio of head_dim), and in CSA layers the indexer's L // 4 keys."""
    out = 0
    for i in a.layers:
        out += (min(context, a.sliding_window) + compressed_entries(a, i, context)) * a.head_dim
        if a.ratio(i) == CSA:
            out += compressed_entries(a, i, context) * a.index_head_dim
    return out


def kv_cache_bytes(a: V4Arch, context: int) -> float:
    """kv_cache_elements at V4's storage formats (BF16, FP8, FP4 above)."""
    entry = (a.head_dim - a.qk_rope_head_dim) * FP8 + a.qk_rope_head_dim * BF16
    out = 0.0
    for i in a.layers:
        out += (min(context, a.sliding_window) + compressed_entries(a, i, context)) * entry
        if a.ratio(i) == CSA:
            out += compressed_entries(a, i, context) * a.index_head_dim * FP4
    return out


def v32_kv_cache_elements(v: V32Arch, context: int) -> int:
    """Every layer caches each token's latent and RoPE key (d_c + d_h^R, V2 §2.1) and its indexer key."""
    b = v.base
    return context * b.num_hidden_layers * (b.kv_lora_rank + b.qk_rope_head_dim + v.index_head_dim)


def v32_kv_cache_bytes(v: V32Arch, context: int) -> float:
    b = v.base
    per_token = b.kv_lora_rank * FP8 + b.qk_rope_head_dim * BF16 + v.index_head_dim * FP8
    return context * b.num_hidden_layers * per_token


# --- FLOPs of one decode token at context L ---


def matmul_params_per_token(a: V4Arch) -> int:
    """What one token multiplies with: every layer's projections (attention, compressor, indexer,
    both mHC modules' fn), router, top-k and shared experts; the streams' head and output head."""
    D = a.hidden_size
    mhc = 2 * ((2 + a.hc_mult) * a.hc_mult * a.hc_mult * D)
    layers = sum(attention_matmul_params(a) + compressor_matmul_params(a, i) + indexer_matmul_params(a, i) + mhc
                 + a.n_routed_experts * D + (a.num_experts_per_tok + a.n_shared_experts) * swiglu_params(a)
                 for i in a.layers)
    return layers + a.hc_mult * a.hc_mult * D + a.vocab_size * D


def attended_entries(a: V4Arch, i: int, context: int) -> int:
    """Entries a new token's core attention reads in layer i (V4 report §2.3)."""
    window = min(context, a.sliding_window)
    r = a.ratio(i)
    if r == CSA:
        return window + min(a.index_topk, compressed_entries(a, i, context))
    return window + compressed_entries(a, i, context)


def decode_flops_per_token(a: V4Arch, context: int) -> float:
    """2 × matmul params + per layer: scores and AV over the attended entries (one shared KV head
    of head_dim, its values the same entries) and, in CSA layers, the indexer's scores over every
    compressed entry."""
    attention = 0.0
    for i in a.layers:
        attention += 2 * 2 * a.num_attention_heads * a.head_dim * attended_entries(a, i, context)
        if a.ratio(i) == CSA:
            attention += 2 * a.index_n_heads * a.index_head_dim * compressed_entries(a, i, context)
    return 2 * matmul_params_per_token(a) + attention


def v32_indexer_matmul_params(v: V32Arch) -> int:
    """V3.2's indexer per layer: wq_b (q_lora → heads × dim), wk (d → dim), weights_proj (d → heads)."""
    b = v.base
    return b.q_lora_rank * v.index_n_heads * v.index_head_dim + b.hidden_size * v.index_head_dim + b.hidden_size * v.index_n_heads


def v32_decode_flops_per_token(v: V32Arch, context: int) -> float:
    """V3's activated matmuls (absorbed MLA multiplies a query with W^UK and W^UV as many times
    as the expanded form multiplies a key: the same count), the indexer's projections, and per
    layer absorbed attention over min(L, index_topk) selected tokens, scores over d_c + d_h^R and
    AV over d_c (V2 §2.1.1), plus the indexer's scores over all L tokens."""
    b = v.base
    L = b.num_hidden_layers
    keys = min(context, v.index_topk)
    attention = 2 * b.num_attention_heads * ((b.kv_lora_rank + b.qk_rope_head_dim) + b.kv_lora_rank) * keys
    indexer = 2 * v.index_n_heads * v.index_head_dim * context
    return 2 * (official.activated_matmul_params(b) + L * v32_indexer_matmul_params(v)) + L * (attention + indexer)

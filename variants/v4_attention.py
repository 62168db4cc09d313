"""DeepSeek-V4's compressed attention as axis values (DeepSeek-V4 report §2.3; HF deepseek_v4
DeepseekV4Attention): the variant contract around variants/v4_attention_core.py.

- `csa`: compressed sparse attention. Every m = csa_ratio tokens fold into one entry (two
  overlapping series, window 2m stride m), a lightning indexer (its own heads and dims) picks the
  index_topk entries a query reads, plus the sliding window (report §2.3.1).
- `hca`: heavily compressed attention. Every m' = hca_ratio tokens fold into one entry, read
  densely, plus the sliding window (report §2.3.2).
- `v4-window`: the sliding window alone (HF "sliding_attention", V4-Flash's first two layers).
- `v4-hybrid`: a per-layer schedule of the above (V4's `compress_ratios`); see `schedule`.

All share one config: V4's single K=V head of head_dim, query LoRA, grouped low-rank output
projection (o_groups × o_lora_rank), per-head attention sinks, partial interleaved RoPE on the
last qk_rope_head_dim channels, base rope_theta on window-only layers and compress_rope_theta
on compressed ones (HF: the "main" and "compress" rotaries).

Legend as v4_attention_core.py; Lq q_lora_rank, Lo o_lora_rank, Hi index_n_heads, Di
index_head_dim, k index_topk, n_win window.

Differences from HF on purpose: YaRN on compressed layers (V4: factor 16 beyond 65,536
positions) is not applied; the indexer's ties go to the earliest entry (HF's topk leaves them
unspecified); the cache is preallocated and keeps the carried gate logits in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsbench.metrics import Metric, variant_column

from .attention import check_heads
from .base import Activations, Attention, PartConfig, PartCost, PassShape, add_cost, at_least, choices
from .v4_attention_core import QUERY_BLOCK, V4AttentionCore, V4Indexer
from .v4_compressor import KVCompressor

if TYPE_CHECKING:
    from .config import ModelConfig

COMPRESSOR_OF = {"v4-window": "none", "csa": "csa", "hca": "hca"}  # each layer kind's `compressor` (its axis value sets it)
LAYER_KINDS = tuple(COMPRESSOR_OF)
COMPRESSORS = ("csa", "hca", "none")
FP32_BYTES = 4


@dataclass(frozen=True)
class V4AttentionConfig(PartConfig):
    """V4's attention dims; None = derived from the model width with V4-Flash's ratios
    (d_model 4096: head_dim 512 at 64 heads is its own choice, here d_model // n_heads)."""

    kind: str = "csa"
    n_heads: int = 4
    head_dim: int | None = None  # None = d_model // n_heads
    qk_rope_head_dim: int | None = None  # the RoPE'd trailing channels; None = head_dim // 8 (V4: 64 of 512), even
    q_lora_rank: int | None = None  # None = d_model // 4 (V4-Flash: 1024 of 4096)
    o_groups: int = at_least(2, 1)  # V4-Flash 8, V4-Pro 16
    o_lora_rank: int | None = None  # per group; None = d_model // 4 (V4: 1024)
    window: int = at_least(128, 1)  # n_win, keys a token sees in the window branch, itself included (V4: 128)
    csa_ratio: int = at_least(4, 1)  # m (V4: 4)
    hca_ratio: int = at_least(128, 1)  # m' (V4: 128)
    index_topk: int = at_least(512, 1)  # CSA entries a query reads (V4-Flash 512, V4-Pro 1024)
    index_n_heads: int = at_least(4, 1)  # V4: 64
    index_head_dim: int = at_least(32, 2)  # V4: 128
    rope_theta: float = 10000.0  # window-only layers (HF rope "main")
    compress_rope_theta: float = 160000.0  # CSA and HCA layers, their queries, keys and entries (HF rope "compress")
    compressor: str = choices("csa", *COMPRESSORS)  # set by the axis value: csa, hca, or none (v4-window)


@dataclass(frozen=True)
class V4HybridConfig(V4AttentionConfig):
    kind: str = "v4-hybrid"
    # Layer i's attention kind: "first,...|cycle,..." lists the leading layers, then a cycle that
    # fills the rest. V4-Pro's compress_ratios (128, 128, then 4 and 128 in turn) is the default;
    # V4-Flash's (0, 0, then 4, 128): "v4-window,v4-window|csa,hca".
    schedule: str = "hca,hca|csa,hca"


@dataclass(frozen=True)
class V4Dims:
    C: int
    H: int
    D: int
    R: int
    Lq: int
    G: int
    Lo: int
    window: int


def v4_dims(cfg: ModelConfig) -> V4Dims:
    a, D = cfg.attention, cfg.head_dim()
    return V4Dims(C=cfg.d_model, H=a.n_heads, D=D, R=a.qk_rope_head_dim or max(2, D // 8 // 2 * 2),
                  Lq=a.q_lora_rank or max(1, cfg.d_model // 4), G=a.o_groups, Lo=a.o_lora_rank or max(1, cfg.d_model // 4),
                  window=a.window)


def ratio(cfg: ModelConfig) -> int:
    """m of this layer's compressor; 0: none (window only)."""
    return {"csa": cfg.attention.csa_ratio, "hca": cfg.attention.hca_ratio}.get(cfg.attention.compressor, 0)


def compressors(cfg: ModelConfig) -> list[tuple[int, int, bool]]:
    """(entry width, ratio, overlapping windows) of each compressor a layer runs: the main one,
    and CSA's indexer's own."""
    a, m = cfg.attention, ratio(cfg)
    if not m:
        return []
    return [(cfg.head_dim(), m, a.compressor == "csa")] + ([(a.index_head_dim, m, True)] if a.compressor == "csa" else [])


class CompressedAttention(V4AttentionCore):
    Config = V4AttentionConfig
    cache_rewinds = False  # a rejected draft may have closed a window: its entry and the open window are gone

    def __init__(self, cfg: ModelConfig):
        d, a, m = v4_dims(cfg), cfg.attention, ratio(cfg)
        theta = a.compress_rope_theta if m else a.rope_theta
        compressor = KVCompressor(d.C, d.D, m, a.compressor == "csa", d.R, theta, cfg.norm_eps) if m else None
        indexer = (V4Indexer(d.C, d.Lq, a.index_n_heads, a.index_head_dim, a.index_topk, m, d.R, theta, cfg.norm_eps)
                   if a.compressor == "csa" else None)
        super().__init__(d.C, d.H, d.D, d.R, d.Lq, d.G, d.Lo, d.window, theta, compressor, indexer, cfg.norm_eps)

    # --- accounting: exact counts for this module, checked against the instance by the tests ---
    @staticmethod
    def _main_matmul_params(cfg: ModelConfig) -> int:
        """q_a, q_b, kv, o_a (G blocks of H·D/G → Lo) and o_b."""
        d = v4_dims(cfg)
        return d.C * d.Lq + d.Lq * d.H * d.D + d.C * d.D + d.H * d.D * d.Lo + d.G * d.Lo * d.C

    @staticmethod
    def _compressor_matmul_params(cfg: ModelConfig) -> int:
        """Each compressor's kv and gate projections; the indexer's query and head weights."""
        a, d = cfg.attention, v4_dims(cfg)
        n = sum(2 * d.C * (2 if overlap else 1) * width for width, _, overlap in compressors(cfg))
        return n + (d.Lq * a.index_n_heads * a.index_head_dim + d.C * a.index_n_heads if a.compressor == "csa" else 0)

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        d = v4_dims(cfg)
        n = CompressedAttention._main_matmul_params(cfg) + d.Lq + d.D + d.H  # + q_a_norm, kv_norm, sinks
        n += sum(KVCompressor.param_count(d.C, w, m, overlap) for w, m, overlap in compressors(cfg))
        a = cfg.attention
        return n + (d.Lq * a.index_n_heads * a.index_head_dim + d.C * a.index_n_heads if a.compressor == "csa" else 0)

    @staticmethod
    def entries_seen(cfg: ModelConfig, context_len: float, decode: bool) -> float:
        """Closed entries a token at this context can read: ⌊L/m⌋ for a decode token (L keys
        with itself), their mean L/m over a whole sequence."""
        m = ratio(cfg)
        if not m:
            return 0.0
        return math.floor(context_len / m) if decode else context_len / m

    @staticmethod
    def keys_attended(cfg: ModelConfig, context_len: float, decode: bool) -> float:
        """The window's min(L, n_win) keys plus the entries read: every closed one (HCA), the
        index_topk the indexer picks of them (CSA)."""
        entries = CompressedAttention.entries_seen(cfg, context_len, decode)
        if cfg.attention.compressor == "csa":
            entries = min(cfg.attention.index_topk, entries)
        return min(context_len, cfg.attention.window) + entries

    @staticmethod
    def _flops(cfg: ModelConfig, context_len: float, decode: bool) -> dict[str, float]:
        """Per token by part, 2 FLOPs per multiply-add: the projections, the compressors'
        projections (their pooling is elementwise, not counted, as norms are not), the indexer's
        scores over every closed entry (Hi·Di for q·k and Hi for the weighted sum), and scores
        plus AV over the keys attended (2·H·D each)."""
        a, d = cfg.attention, v4_dims(cfg)
        out = {"attn.proj": 2.0 * CompressedAttention._main_matmul_params(cfg),
               "attn.core": 4.0 * d.H * d.D * CompressedAttention.keys_attended(cfg, context_len, decode)}
        widths = compressors(cfg)
        if widths:
            out["attn.compress"] = 2.0 * 2 * d.C * (2 if widths[0][2] else 1) * widths[0][0]
        if a.compressor == "csa":
            Hi, Di = a.index_n_heads, a.index_head_dim
            scored = CompressedAttention.entries_seen(cfg, context_len, decode)
            out["indexer"] = 2.0 * (2 * d.C * 2 * Di + d.Lq * Hi * Di + d.C * Hi) + 2.0 * (Hi * Di + Hi) * scored
        return out

    @staticmethod
    def flops_per_token(cfg: ModelConfig, context_len: float, decode: bool = False) -> float:
        return sum(CompressedAttention._flops(cfg, context_len, decode).values())

    @staticmethod
    def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> float:
        """What a token adds to the cache once its window closes: each compressor's entry of its
        width every m tokens (report §2.3.4; the window's n_win - 1 tokens are a constant)."""
        return sum(width * dtype_bytes / m for width, m, _ in compressors(cfg))

    @staticmethod
    def kv_cache_bytes(cfg: ModelConfig, dtype_bytes: int, context_len: int) -> int:
        """One row's cache after context_len tokens, as V4Cache holds it: the last n_win - 1
        tokens' KV, the entries, each compressor's open window (its projected kv and gate,
        L mod m tokens of its width) and, for overlapping windows, the last closed window's Ca
        half with its fp32 gate logits."""
        L, D = context_len, cfg.head_dim()
        total = min(L, cfg.attention.window - 1) * D * dtype_bytes
        for width, m, overlap in compressors(cfg):
            projected = (2 if overlap else 1) * width
            total += (L // m) * width * dtype_bytes + (L % m) * 2 * projected * dtype_bytes
            if overlap and L >= m:
                total += m * width * (dtype_bytes + FP32_BYTES)
        return total

    @staticmethod
    def part_costs(cfg: ModelConfig, shape: PassShape) -> dict[str, PartCost]:
        """FLOPs as _flops; bytes: weights read once, each projection's input and output, the
        entries and window written once; a decode step reads every row's window and entries
        (and, CSA, all indexer keys) from the cache."""
        a, d = cfg.attention, v4_dims(cfg)
        N, act, wb = shape.tokens, shape.act_bytes, shape.weight_bytes
        flops = CompressedAttention._flops(cfg, shape.mean_context_len, shape.decode)
        costs: dict[str, PartCost] = {}
        main_io = (d.C + d.Lq) + (d.Lq + d.H * d.D) + (d.C + d.D) + (d.H * d.D + d.G * d.Lo) + (d.G * d.Lo + d.C)
        add_cost(costs, "attn.proj", N * flops["attn.proj"], CompressedAttention._main_matmul_params(cfg) * wb + N * main_io * act)
        keys = CompressedAttention.keys_attended(cfg, shape.mean_context_len, shape.decode)
        if shape.decode:
            core_bytes = shape.batch * keys * d.D * act + N * (2 * d.H * d.D + d.D) * act
        else:
            core_bytes = N * (2 * d.H * d.D + 2 * d.D) * act
        add_cost(costs, "attn.core", N * flops["attn.core"], core_bytes)
        widths = compressors(cfg)
        if widths:
            w, m, overlap = widths[0]
            projected = (2 if overlap else 1) * w
            add_cost(costs, "attn.compress", N * flops["attn.compress"], 2 * d.C * projected * wb + N * (d.C + 2 * projected + w / m) * act)
        if a.compressor == "csa":
            Hi, Di, m = a.index_n_heads, a.index_head_dim, a.csa_ratio
            weights = 2 * d.C * 2 * Di + d.Lq * Hi * Di + d.C * Hi
            scored = CompressedAttention.entries_seen(cfg, shape.mean_context_len, shape.decode)
            reads = shape.batch * scored * Di * act if shape.decode else N * Di / m * act  # read every key, or write each once
            add_cost(costs, "indexer", N * flops["indexer"], weights * wb + N * (d.C + d.Lq + Hi * Di + 4 * Di) * act + reads)
        return costs

    @staticmethod
    def _scores_per_token(cfg: ModelConfig, seq_len: int) -> int:
        """Scores one query holds in the eager path: its block's window keys and every entry
        (masked, not gathered), H of each."""
        m = ratio(cfg)
        keys = min(seq_len, QUERY_BLOCK + cfg.attention.window - 1) + (seq_len // m if m else 0)
        return cfg.attention.n_heads * keys

    @staticmethod
    def train_activations(cfg: ModelConfig, seq_len: int) -> Activations:
        """The projections' tensors (q latent and its norm, q through its norm and RoPE, kv the
        same, o and its RoPE, the grouped output), the scores and probabilities, and each
        compressor's kv and gate with their fp32 softmax."""
        a, d = cfg.attention, v4_dims(cfg)
        narrow = 2 * d.Lq + 3 * d.H * d.D + 3 * d.D + 2 * d.H * d.D + d.G * d.Lo
        narrow += 2 * CompressedAttention._scores_per_token(cfg, seq_len)
        fp32 = 0
        for width, _, overlap in compressors(cfg):
            projected = (2 if overlap else 1) * width
            narrow += 3 * projected
            fp32 += projected
        if a.compressor == "csa":
            fp32 += a.index_n_heads * (seq_len // a.csa_ratio + 1)  # the indexer's scores
        return Activations(narrow=narrow, fp32=fp32)

    @staticmethod
    def inference_activations(cfg: ModelConfig, seq_len: int) -> int:
        d = v4_dims(cfg)
        live = d.Lq + 2 * d.H * d.D + d.D + CompressedAttention._scores_per_token(cfg, seq_len)
        return live + sum(2 * (2 if overlap else 1) * width for width, _, overlap in compressors(cfg))

    @staticmethod
    def row_columns(cfg: ModelConfig) -> dict:
        return {"compress_ratio": ratio(cfg), "v4_window": cfg.attention.window}

    @staticmethod
    def metric_columns() -> tuple[Metric, ...]:
        return (variant_column("compress_ratio", "attention", "tokens", "tokens a V4 compressed entry folds (CSA m, HCA m'; 0: window only; a schedule's mean)", "g"),
                variant_column("v4_window", "attention", "tokens", "V4 sliding-window keys a token sees, itself included", "int"))

    @staticmethod
    def check_config(cfg: ModelConfig) -> str | None:
        if problem := check_heads(cfg):
            return problem
        a, d = cfg.attention, v4_dims(cfg)
        if d.R % 2 or d.R > d.D:
            return f"attention.qk_rope_head_dim: {d.R} must be even and at most head_dim {d.D}"
        if a.compressor == "csa" and d.R > a.index_head_dim:
            return f"attention.index_head_dim: {a.index_head_dim} is below qk_rope_head_dim {d.R}; the indexer RoPEs that many channels"
        if (d.H * d.D) % d.G:
            return f"attention.o_groups: {d.G} does not divide n_heads·head_dim {d.H * d.D}"
        return None


def parse_schedule(schedule: str, n_layers: int) -> list[str] | str:
    """Layer kinds for n_layers from "first,...|cycle,..." (no "|": the list is the cycle), or
    the first problem as one line."""
    head, _, cycle = schedule.rpartition("|") if "|" in schedule else ("", "", schedule)
    first = [k.strip() for k in head.split(",") if k.strip()]
    repeat = [k.strip() for k in cycle.split(",") if k.strip()]
    bad = [k for k in first + repeat if k not in LAYER_KINDS]
    if bad or not repeat:
        return (f"attention.schedule: {schedule!r} must be 'kind,...|kind,...' (leading layers, then a cycle) with kinds "
                f"from {', '.join(LAYER_KINDS)}" + (f"; {', '.join(bad)} is not one" if bad else ""))
    return [first[i] if i < len(first) else repeat[(i - len(first)) % len(repeat)] for i in range(n_layers)]


class V4HybridAttention(Attention):
    """A per-layer schedule of V4's attention kinds (V4's compress_ratios). Each layer is built
    and priced as the kind the schedule names (Attention.layer_config), with this config's fields."""

    Config = V4HybridConfig

    @staticmethod
    def layer_config(cfg: ModelConfig, layer_idx: int) -> ModelConfig:
        kinds = parse_schedule(cfg.attention.schedule, layer_idx + 1)
        if isinstance(kinds, str):
            raise ValueError(kinds)
        kind = kinds[layer_idx]
        fields = {f.name: getattr(cfg.attention, f.name) for f in dataclasses.fields(V4AttentionConfig)}
        layer = V4AttentionConfig(**{**fields, "kind": kind, "compressor": COMPRESSOR_OF[kind]})
        return dataclasses.replace(cfg, attention=layer)

    @staticmethod
    def check_config(cfg: ModelConfig) -> str | None:
        kinds = parse_schedule(cfg.attention.schedule, cfg.n_layers)
        if isinstance(kinds, str):
            return kinds
        return CompressedAttention.check_config(V4HybridAttention.layer_config(cfg, 0))

    @staticmethod
    def row_columns(cfg: ModelConfig) -> dict:
        kinds = parse_schedule(cfg.attention.schedule, cfg.n_layers)
        layers = [V4HybridAttention.layer_config(cfg, i) for i in range(cfg.n_layers)]
        return {"attention_schedule": ",".join(kinds), "compress_ratio": sum(ratio(c) for c in layers) / len(layers),
                "v4_window": cfg.attention.window}

    @staticmethod
    def metric_columns() -> tuple[Metric, ...]:
        return (*CompressedAttention.metric_columns(),
                variant_column("attention_schedule", "attention", "kinds", "each layer's attention kind, in order (a per-layer schedule)", "text"))

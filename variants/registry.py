"""Which module and config each axis value builds: one line per variant. The harness validates
specs against these tables and asks the variant (variants/base.py's contract) for everything
else, so a new variant is its own file plus one `register` call, here or in a plugin.

Plugins: a module named in a spec's `plugins = [...]`, or any module an installed distribution
lists under the `dsbench.variants` entry-point group, calls `register(...)` when imported.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from dsbench import metrics

from .attention import MHAConfig, MultiHeadAttention
from .base import Attention, FeedForward, PartConfig
from .dsa import DeepSeekSparseAttention, DSAConfig
from .ffn import DenseFFN, DenseFFNConfig
from .mla import MLAConfig, MultiHeadLatentAttention
from .moe import DeepSeekMoEConfig, MoEFeedForward, RoutedFFNConfig
from .precision import PRECISIONS
from .residual import HyperConnection, HyperEnds, PlainConnection, PlainEnds
from .v4_attention import COMPRESSOR_OF, CompressedAttention, V4AttentionConfig, V4HybridAttention, V4HybridConfig

ENTRY_POINT_GROUP = "dsbench.variants"


@dataclass(frozen=True)
class Variant:
    name: str
    module: type  # an Attention or FeedForward subclass
    config: type[PartConfig]  # the fields this variant reads; its asdict is the part's identity
    paper: str
    # Fields the axis value itself sets, from the part's other settings (gqa's KV heads, mla's
    # decode path): applied when the config is built, so the cell's config shows what is built.
    overrides: Callable[[PartConfig], dict] | None = None

    @property
    def routed(self) -> bool:
        """Routed FFNs take the `balance` axis; every other part collapses it to "n/a"."""
        return getattr(self.module, "routed", False)

    def build(self, cfg, layer_idx: int):
        """The module for one layer (a routed FFN may keep leading layers dense)."""
        return self.module.build(cfg, layer_idx)


def gqa_kv_heads(n_heads: int) -> int:
    """gqa's default KV heads: the largest divisor of n_heads that is at most n_heads/4."""
    return max(g for g in range(1, max(1, n_heads // 4) + 1) if n_heads % g == 0)


ATTENTION: dict[str, Variant] = {}
FFN: dict[str, Variant] = {}
TABLES = {"attention": ATTENTION, "ffn": FFN}
BASES = {"attention": Attention, "ffn": FeedForward}


def register(section: str, variant: Variant) -> Variant:
    """Add a variant to the attention or ffn axis (a plugin calls this when imported)."""
    base = BASES[section]
    if not (isinstance(variant.module, type) and issubclass(variant.module, base)):
        raise TypeError(f"{section} variant {variant.name!r}: its module must subclass dsbench.variants.base.{base.__name__}")
    if not (dataclasses.is_dataclass(variant.config) and issubclass(variant.config, PartConfig)):
        raise TypeError(f"{section} variant {variant.name!r}: its config must be a dataclass subclassing PartConfig")
    existing = TABLES[section].get(variant.name)
    if existing is not None and existing != variant:
        raise ValueError(f"{section} variant {variant.name!r} is registered twice ({existing.module.__module__} and {variant.module.__module__})")
    TABLES[section][variant.name] = variant
    for column in variant.module.metric_columns():
        metrics.declare(column)
    return variant


register("attention", Variant("mha", MultiHeadAttention, MHAConfig, "Vaswani et al. 1706.03762"))
register("attention", Variant("gqa", MultiHeadAttention, MHAConfig, "Ainslie et al. 2305.13245",
                              overrides=lambda a: {"n_kv_heads": a.n_kv_heads or gqa_kv_heads(a.n_heads)}))
register("attention", Variant("mqa", MultiHeadAttention, MHAConfig, "Shazeer 1911.02150", overrides=lambda a: {"n_kv_heads": 1}))
register("attention", Variant("mla", MultiHeadLatentAttention, MLAConfig, "DeepSeek-V2 2405.04434 §2.1 (absorbed decode)",
                              overrides=lambda a: {"mla_impl": "absorbed"}))
register("attention", Variant("mla-naive", MultiHeadLatentAttention, MLAConfig, "DeepSeek-V2 2405.04434 §2.1 (naive decode)",
                              overrides=lambda a: {"mla_impl": "naive"}))
register("attention", Variant("dsa", DeepSeekSparseAttention, DSAConfig, "DeepSeek-V3.2-Exp (2025): MLA + lightning indexer, top-k",
                              overrides=lambda a: {"mla_impl": "absorbed"}))
V4 = "DeepSeek-V4 report (2026) §2.3"
register("attention", Variant("csa", CompressedAttention, V4AttentionConfig, f"{V4}.1: compressed sparse attention (m = 4, lightning indexer)",
                              overrides=lambda a: {"compressor": COMPRESSOR_OF["csa"]}))
register("attention", Variant("hca", CompressedAttention, V4AttentionConfig, f"{V4}.2: heavily compressed attention (m' = 128)",
                              overrides=lambda a: {"compressor": COMPRESSOR_OF["hca"]}))
register("attention", Variant("v4-window", CompressedAttention, V4AttentionConfig, f"{V4}: the sliding-window branch alone",
                              overrides=lambda a: {"compressor": COMPRESSOR_OF["v4-window"]}))
register("attention", Variant("v4-hybrid", V4HybridAttention, V4HybridConfig, f"{V4}: a per-layer schedule of csa, hca and v4-window",
                              overrides=lambda a: {"compressor": "none"}))  # each layer's is its kind's (layer_config)
register("ffn", Variant("dense", DenseFFN, DenseFFNConfig, "Shazeer 2002.05202 (SwiGLU)"))
register("ffn", Variant("moe", MoEFeedForward, RoutedFFNConfig, "GShard, Lepikhin et al. 2006.16668"))
register("ffn", Variant("deepseekmoe", MoEFeedForward, DeepSeekMoEConfig, "DeepSeekMoE, Dai et al. 2401.06066 §3"))

# Load-balancing strategies for routed FFNs; `none` is always available.
BALANCE: dict[str, str] = {
    "none": "no balancing term",
    "aux": "auxiliary balance loss: expert-level (DeepSeekMoE §3.3), device-level and V3 sequence-wise as options",
    "bias": "auxiliary-loss-free: per-expert routing bias updated by γ·sign(mean load − load) (V3 §2.1.2, 2408.15664)",
}



@dataclass(frozen=True)
class Residual:
    """A residual-stream choice (model field `residual`): the module around each sublayer and
    the pair at the model's ends (variants/residual.py)."""

    name: str
    connection: type
    ends: type
    paper: str


RESIDUAL: dict[str, Residual] = {}


def register_residual(residual: Residual) -> Residual:
    """Add a value of the `residual` model field (a plugin calls this when imported)."""
    RESIDUAL[residual.name] = residual
    return residual


register_residual(Residual("plain", PlainConnection, PlainEnds, "He et al. 1512.03385 (pre-norm residual)"))
register_residual(Residual("mhc", HyperConnection, HyperEnds, "mHC, Xie et al. 2512.24880; DeepSeek-V4 §2.2"))


def axis_values() -> dict[str, tuple[str, ...]]:
    """Every model axis and the values that are built today (the workloads: dsbench.spec.available_axis_values)."""
    return {
        "ffn": tuple(FFN),
        "attention": tuple(ATTENTION),
        "precision": tuple(PRECISIONS),
        "balance": tuple(BALANCE),
    }


def attention_layer(cfg, layer_idx: int) -> tuple[type, object]:
    """Layer `layer_idx`'s attention class and the config it is built and priced from (a
    schedule's layers are other kinds: Attention.layer_config)."""
    layer_cfg = ATTENTION[cfg.attention.kind].module.layer_config(cfg, layer_idx)
    return ATTENTION[layer_cfg.attention.kind].module, layer_cfg


def attention_layers(cfg) -> list[tuple[type, object]]:
    return [attention_layer(cfg, i) for i in range(cfg.n_layers)]


def module_of(section: str, cfg) -> type:
    """The module class of a model config's attention or ffn part."""
    return TABLES[section][getattr(cfg, section).kind].module


def config_fields(section: str, kind: str) -> dict[str, dataclasses.Field]:
    """The fields a variant's config reads, `kind` excluded."""
    return {f.name: f for f in dataclasses.fields(TABLES[section][kind].config) if f.name != "kind"}


def readers(section: str, key: str, kinds=None) -> list[str]:
    """The variants (of `kinds`, default all) whose config reads `key`."""
    return [k for k in (kinds or TABLES[section]) if key in config_fields(section, k)]


def part_config(section: str, kind: str, values: dict) -> tuple[PartConfig, set[str]]:
    """The part as axis value `kind` builds it from `values` (the keys its config does not read
    are left alone), and the keys it read. The variant's own overrides are applied."""
    variant = TABLES[section][kind]
    used = set(config_fields(section, kind)) & set(values)
    cfg = variant.config(kind=kind, **{k: values[k] for k in used})
    if variant.overrides is not None:
        cfg = dataclasses.replace(cfg, **variant.overrides(cfg))
    return cfg, used


def import_plugins(modules) -> None:
    """Import each plugin module (it registers its variants); ImportError propagates to the caller."""
    for name in modules:
        importlib.import_module(name)


def _load_entry_points() -> None:
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


_load_entry_points()

"""The variant contract (variants/base.py), checked on every registered variant, the example
plug-in included: it is built, counted against its analytic numbers, priced, and run once.

- the module and config subclass the contract's bases; the config's fields are what the cell
  identity holds;
- analytic parameters equal the instantiated module's, per layer (a routed FFN's leading dense
  layers too);
- the per-part FLOPs of the roofline sum to the variant's own flops_per_token × tokens;
- the analytic KV bytes per token equal the live cache's, and decoding token by token from the
  cache equals the full forward (attention);
- the default config passes the variant's own check, and its row columns are plain values.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from dsbench import metrics
from dsbench.variants import registry
from dsbench.variants.base import Attention, FeedForward, PartConfig, PassShape
from dsbench.variants.config import config_from_size

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PLUGIN = "swa"  # examples/sliding_window.py, registered only while its tests run
ROUTED_PLUGIN = "switch"  # tests/switch_plugin.py: a routed FFN owing nothing to variants/moe.py
PLUGIN_MODULES = ("sliding_window", "switch_plugin")
ATTENTION = (*registry.ATTENTION, PLUGIN)
FFN = (*registry.FFN, ROUTED_PLUGIN)
SHAPES = [PassShape(tokens=64, mean_context_len=16.5, decode=False, batch=2, act_bytes=4, weight_bytes=4),
          PassShape(tokens=2, mean_context_len=40.5, decode=True, batch=2, act_bytes=2, weight_bytes=2)]


@pytest.fixture(autouse=True)
def example_plugin(monkeypatch):
    """The example plug-in registered for one test, then removed, so other test modules see the
    built-in registry only."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    saved = [(table, dict(table)) for table in (registry.ATTENTION, registry.FFN, metrics.METRICS)]
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)
    registry.import_plugins(PLUGIN_MODULES)
    yield
    for table, before in saved:
        table.clear()
        table.update(before)
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_cfg(kind: str):
    fields = registry.config_fields("attention", kind)
    extra = {"window": 8} if "window" in fields else {}
    if "hca_ratio" in fields:  # V4: windows that close within the 13 tokens decode runs, every kind in a schedule
        extra |= {"hca_ratio": 4, "csa_ratio": 2, "index_topk": 2, "schedule": "hca|csa,v4-window"} if "schedule" in fields else {"hca_ratio": 4, "csa_ratio": 2, "index_topk": 2}
        extra |= {"n_layers": 3, "index_n_heads": 8}
    return config_from_size("debug", attention=kind, n_heads=8, **extra)


def ffn_cfg(kind: str):
    return config_from_size("debug", ffn=kind, n_layers=3, **({"first_k_dense": 1} if registry.FFN[kind].routed else {}))


def test_the_example_plugin_is_registered():
    assert PLUGIN in registry.ATTENTION and registry.ATTENTION[PLUGIN].module.__module__ == "sliding_window"
    assert metrics.metric_of("window").owner == "attention"  # its own column, registered by the plug-in


def check_variant(section: str, kind: str, cfg) -> None:
    """The module and config subclass the contract's bases; the config is the variant's; the
    config passes the variant's own check; row columns are plain values."""
    variant = registry.TABLES[section][kind]
    assert issubclass(variant.module, Attention if section == "attention" else FeedForward)
    assert dataclasses.is_dataclass(variant.config) and issubclass(variant.config, PartConfig)
    part = getattr(cfg, section)
    assert type(part) is variant.config and part.kind == kind
    assert variant.module.check_config(cfg) is None
    columns = variant.module.row_columns(cfg)
    assert all(isinstance(k, str) and (v is None or isinstance(v, (int, float, str, bool))) for k, v in columns.items())


def check_attention_counts_price_and_decode(kind: str, cfg) -> None:
    """Every layer, as the kind its config builds it (a schedule's layers are other kinds)."""
    for layer in range(cfg.n_layers):
        module_cls, layer_cfg = registry.attention_layer(cfg, layer)
        check_attention_layer(module_cls, layer_cfg, layer)


def check_attention_layer(module_cls, cfg, layer: int) -> None:
    torch.manual_seed(0)
    module = module_cls.build(cfg, layer).eval()
    assert module_cls.param_count(cfg) == module_cls.active_param_count(cfg, layer) == numel(module)
    for shape in SHAPES:
        costs = module_cls.part_costs(cfg, shape)
        total = shape.tokens * module_cls.flops_per_token(cfg, shape.mean_context_len, shape.decode)
        assert sum(c.flops for c in costs.values()) == pytest.approx(total, rel=1e-12)
        assert all(c.bytes is None or c.bytes > 0 for c in costs.values())
    B, T, prefix = 2, 13, 9
    cache = module.new_cache(B, T, torch.float32, "cpu")
    assert cache.live_bytes_per_token() == module_cls.kv_cache_bytes_per_token(cfg, 4)
    x = torch.randn(B, T, cfg.d_model)
    with torch.no_grad():
        full = module(x)
        steps = [module(x[:, :prefix], 0, cache)] + [module(x[:, t:t + 1], t, cache) for t in range(prefix, T)]
    decoded = torch.cat(steps, dim=1)
    # fp32, the same arithmetic in another order: RMS-relative error at rounding level
    assert float((decoded - full).norm() / full.norm()) < 1e-5
    if hasattr(cache, "filled_bytes"):  # a cache with a constant part states what it holds at each context
        assert cache.filled_bytes(T) == module_cls.kv_cache_bytes(cfg, 4, T)


def check_ffn_counts_and_price_every_layer(kind: str, cfg) -> None:
    variant = registry.FFN[kind]
    torch.manual_seed(0)
    for layer in range(cfg.n_layers):
        module = variant.build(cfg, layer)
        assert variant.module.param_count(cfg, layer) == numel(module)
        assert variant.module.active_param_count(cfg, layer) <= numel(module)
        for shape in SHAPES:
            costs = variant.module.part_costs(cfg, layer, shape)
            total = shape.tokens * variant.module.flops_per_token(cfg, layer)
            assert sum(c.flops for c in costs.values()) == pytest.approx(total, rel=1e-12)
            assert all(c.bytes is None or c.bytes > 0 for c in costs.values())
        x = torch.randn(2, 5, cfg.d_model)
        assert module(x).shape == x.shape


def check_memory_and_columns(section: str, kind: str, cfg) -> None:
    """The memory estimate's members are non-negative ints; every row column is a declared metric."""
    module = registry.TABLES[section][kind].module
    layers = registry.attention_layers(cfg) if section == "attention" else [(module, cfg)]
    for T in (1, 16, 4096):
        for layer_module, layer_cfg in layers:
            kept = layer_module.train_activations(layer_cfg, T)
            assert all(isinstance(v, int) and v >= 0 for v in (kept.wide, kept.narrow, kept.fp32)), kept
            live = layer_module.inference_activations(layer_cfg, T)
            assert isinstance(live, int) and live >= 0
    declared = {m.name: m for m in module.metric_columns()}
    assert all(isinstance(m, metrics.Metric) and metrics.METRICS[name] == m for name, m in declared.items())
    assert set(module.row_columns(cfg)) <= set(declared), "row columns must be declared in metric_columns()"


def check_routed_layout_balance_and_parallel(kind: str, cfg) -> None:
    module = registry.FFN[kind].module
    lay, C, layer = module.layout(cfg), cfg.d_model, cfg.n_layers - 1  # the last layer is routed
    # the experts the layout names are the parameters the FFN counts: all of them, or the top_k a token uses
    experts = 3 * C * lay.n_routed * lay.expert_d_ff
    active = 3 * C * (lay.top_k * lay.expert_d_ff + lay.shared_d_ff)
    assert experts <= module.param_count(cfg, layer) and active <= module.active_param_count(cfg, layer)
    assert module.param_count(cfg, layer) - module.active_param_count(cfg, layer) == 3 * C * (lay.n_routed - lay.top_k) * lay.expert_d_ff
    assert "none" in module.balances and set(module.balances) <= set(registry.BALANCE)
    assert 0 < lay.top_k <= lay.n_routed and lay.n_routed % lay.expert_groups == 0
    problem = module.check_parallel(cfg, lay.n_routed + 1, 0)
    assert isinstance(problem, str) and "\n" not in problem
    assert module.rank_param_count(cfg, layer, 1, 0) == module.param_count(cfg, layer)


def check_contract(section: str, kind: str, cfg) -> None:
    """Every check above that applies to this variant, on this config: what tests/test_docs.py
    holds the docs' worked plug-ins to."""
    check_variant(section, kind, cfg)
    if section == "attention":
        check_attention_counts_price_and_decode(kind, cfg)
    else:
        check_ffn_counts_and_price_every_layer(kind, cfg)
        if registry.FFN[kind].routed:
            check_routed_layout_balance_and_parallel(kind, cfg)
    check_memory_and_columns(section, kind, cfg)


def cfg_of(section: str, kind: str):
    return attention_cfg(kind) if section == "attention" else ffn_cfg(kind)


@pytest.mark.parametrize("section, kind", [("attention", k) for k in ATTENTION] + [("ffn", k) for k in FFN])
def test_variant_meets_the_contract(section, kind):
    check_variant(section, kind, cfg_of(section, kind))


@pytest.mark.parametrize("kind", ATTENTION)
def test_attention_counts_price_and_decode(kind):
    check_attention_counts_price_and_decode(kind, attention_cfg(kind))


@pytest.mark.parametrize("kind", FFN)
def test_ffn_counts_and_price_every_layer(kind):
    check_ffn_counts_and_price_every_layer(kind, ffn_cfg(kind))


def test_register_refuses_what_breaks_the_contract():
    with pytest.raises(TypeError, match="must subclass"):
        registry.register("attention", registry.Variant("bad", torch.nn.Linear, registry.ATTENTION["mha"].config, "-"))
    clash = dataclasses.replace(registry.ATTENTION["swa"], paper="another")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("attention", clash)


@pytest.mark.parametrize("section, kind", [("attention", k) for k in ATTENTION] + [("ffn", k) for k in FFN])
def test_variant_states_its_memory_and_columns(section, kind):
    check_memory_and_columns(section, kind, cfg_of(section, kind))


@pytest.mark.parametrize("kind", [*(k for k, v in registry.FFN.items() if v.routed), ROUTED_PLUGIN])
def test_routed_ffn_states_its_layout_balance_and_parallel_checks(kind):
    check_routed_layout_balance_and_parallel(kind, ffn_cfg(kind))

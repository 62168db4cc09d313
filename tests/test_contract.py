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
ATTENTION = (*registry.ATTENTION, PLUGIN)
FFN = tuple(registry.FFN)
SHAPES = [PassShape(tokens=64, mean_context_len=16.5, decode=False, batch=2, act_bytes=4, weight_bytes=4),
          PassShape(tokens=2, mean_context_len=40.5, decode=True, batch=2, act_bytes=2, weight_bytes=2)]


@pytest.fixture(autouse=True)
def example_plugin(monkeypatch):
    """The example plug-in registered for one test, then removed, so other test modules see the
    built-in registry only."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    built_in, columns = dict(registry.ATTENTION), dict(metrics.METRICS)
    sys.modules.pop("sliding_window", None)
    registry.import_plugins(["sliding_window"])
    yield
    for table, saved in ((registry.ATTENTION, built_in), (metrics.METRICS, columns)):
        table.clear()
        table.update(saved)
    sys.modules.pop("sliding_window", None)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_cfg(kind: str):
    return config_from_size("debug", attention=kind, n_heads=8, window=8) if "window" in registry.config_fields(
        "attention", kind) else config_from_size("debug", attention=kind, n_heads=8)


def ffn_cfg(kind: str):
    return config_from_size("debug", ffn=kind, n_layers=3, **({"first_k_dense": 1} if registry.FFN[kind].routed else {}))


def test_the_example_plugin_is_registered():
    assert PLUGIN in registry.ATTENTION and registry.ATTENTION[PLUGIN].module.__module__ == "sliding_window"
    assert metrics.metric_of("window").owner == "attention"  # its own column, registered by the plug-in


@pytest.mark.parametrize("section, kind", [("attention", k) for k in ATTENTION] + [("ffn", k) for k in FFN])
def test_variant_meets_the_contract(section, kind):
    variant = registry.TABLES[section][kind]
    assert issubclass(variant.module, Attention if section == "attention" else FeedForward)
    assert dataclasses.is_dataclass(variant.config) and issubclass(variant.config, PartConfig)
    cfg = attention_cfg(kind) if section == "attention" else ffn_cfg(kind)
    part = getattr(cfg, section)
    assert type(part) is variant.config and part.kind == kind
    assert variant.module.check_config(cfg) is None
    columns = variant.module.row_columns(cfg)
    assert all(isinstance(k, str) and (v is None or isinstance(v, (int, float, str, bool))) for k, v in columns.items())


@pytest.mark.parametrize("kind", ATTENTION)
def test_attention_counts_price_and_decode(kind):
    cfg, module_cls = attention_cfg(kind), registry.ATTENTION[kind].module
    torch.manual_seed(0)
    module = registry.ATTENTION[kind].build(cfg, 0).eval()
    assert module_cls.param_count(cfg) == module_cls.active_param_count(cfg, 0) == numel(module)
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


@pytest.mark.parametrize("kind", FFN)
def test_ffn_counts_and_price_every_layer(kind):
    cfg, variant = ffn_cfg(kind), registry.FFN[kind]
    torch.manual_seed(0)
    for layer in range(cfg.n_layers):
        module = variant.build(cfg, layer)
        assert variant.module.param_count(cfg, layer) == numel(module)
        assert variant.module.active_param_count(cfg, layer) <= numel(module)
        for shape in SHAPES:
            costs = variant.module.part_costs(cfg, layer, shape)
            total = shape.tokens * variant.module.flops_per_token(cfg, layer)
            assert sum(c.flops for c in costs.values()) == pytest.approx(total, rel=1e-12)
        x = torch.randn(2, 5, cfg.d_model)
        assert module(x).shape == x.shape


def test_register_refuses_what_breaks_the_contract():
    with pytest.raises(TypeError, match="must subclass"):
        registry.register("attention", registry.Variant("bad", torch.nn.Linear, registry.ATTENTION["mha"].config, "-"))
    clash = dataclasses.replace(registry.ATTENTION["swa"], paper="another")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("attention", clash)

"""A routed FFN plug-in (tests/switch_plugin.py) that does not subclass RoutedFFNConfig: sized by
what it states, and refused in one line where it cannot go (a balance it does not implement,
expert parallelism), as is a plug-in hook that raises or returns the wrong thing."""

from __future__ import annotations

import sys

import pytest

from dsbench import metrics
from dsbench import spec as spec_lib
from dsbench.errors import SpecError
from dsbench.memory_estimate import estimate
from dsbench.variants import registry


@pytest.fixture(autouse=True)
def switch_plugin():
    saved = [(table, dict(table)) for table in (registry.FFN, metrics.METRICS)]
    sys.modules.pop("switch_plugin", None)
    registry.import_plugins(["switch_plugin"])
    yield sys.modules["switch_plugin"]
    for table, before in saved:
        table.clear()
        table.update(before)
    sys.modules.pop("switch_plugin", None)


def raw(**extra) -> dict:
    return {"name": "t", "model": {"size": "debug", "n_layers": 2},
            "axes": {"ffn": ["switch"], "workload": ["train"], **extra.pop("axes", {})}, **extra}


def test_a_routed_plugin_is_sized_by_what_it_states():
    dense = estimate(spec_lib.expand(spec_lib.parse_spec(raw(axes={"ffn": ["dense"]})), "cpu")[0])
    switch = estimate(spec_lib.expand(spec_lib.parse_spec(raw()), "cpu")[0])
    assert switch.weights_bytes > dense.weights_bytes  # its four experts, not the dense FFN's width
    assert switch.activations_bytes != dense.activations_bytes


def test_a_balance_the_plugin_does_not_implement_is_one_line():
    with pytest.raises(SpecError, match=r"axes.balance: 'aux' is not implemented by ffn = switch; it implements: none"):
        spec_lib.parse_spec(raw(axes={"balance": ["aux"]}))


def test_expert_parallelism_the_plugin_does_not_implement_is_one_line():
    with pytest.raises(SpecError, match=r"ffn = switch: parallel.ep = 2 needs expert parallelism") as e:
        spec_lib.parse_spec(raw(parallel={"ep": 2}))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("hook, behaviour, words", [
    ("check_config", lambda cfg: cfg.width, "raised AttributeError"),
    ("check_config", lambda cfg: 3, "returned 3; it must return None or a str"),
    ("param_count", lambda cfg, layer_idx=0: 1 / 0, "raised ZeroDivisionError"),
])
def test_a_plugin_hook_that_fails_is_one_line_naming_it(switch_plugin, monkeypatch, hook, behaviour, words):
    monkeypatch.setattr(switch_plugin.SwitchFFN, hook, staticmethod(behaviour))
    with pytest.raises(SpecError, match=rf"ffn = switch \(switch_plugin.SwitchFFN.{hook}\) {words}") as e:
        spec_lib.parse_spec(raw())
    assert "\n" not in str(e.value)

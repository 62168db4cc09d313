"""The metric registry: every column a worker writes has an entry, the docs' schema table (docs/metrics.md) is the
registry's, and the check policy's defaults and the baseline's stripped columns come from it."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_spec_text
from typer.testing import CliRunner

from dsbench import metrics
from dsbench.check import HOST_DEPENDENT
from dsbench.policy import PolicyError, load_policy
from dsbench.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(ROOT.glob("results/*/cells.parquet"))


def unregistered(columns) -> list[str]:
    return sorted(c for c in columns if metrics.metric_of(c) is None)


def test_dotted_axis_columns_are_registered_by_their_form():
    from dsbench.spec import DOTTED_MEASURE_KEYS, dotted_sections

    # One list (dsbench/schema.py): every section a spec sweeps by dotted key names an axis column.
    for section in dotted_sections():
        field = DOTTED_MEASURE_KEYS[0] if section == "measure" else "some_field"
        assert metrics.metric_of(f"{section}.{field}").group == "axis", section
    assert metrics.DOTTED_MEASURE_KEYS == DOTTED_MEASURE_KEYS
    assert metrics.metric_of("nosuchsection.field") is None
    assert metrics.metric_of("model.size").group == "axis" and metrics.metric_of("ffn.n_experts").group == "axis"
    assert metrics.metric_of("measure.warmup") is None and metrics.metric_of("window") is None


def test_committed_results_have_only_registered_columns():
    assert len(COMMITTED) >= 5  # the samples and the CI baseline are there to be read
    for path in COMMITTED:
        assert unregistered(pd.read_parquet(path).columns) == [], path


@pytest.mark.slow
def test_every_column_a_sweep_writes_is_registered(tmp_path):
    """A routed MLA FP8 cell of each workload: the widest rows a worker writes (routing balance,
    MLA dims, SQNR, live KV bytes, contention), so a new column without an entry fails here."""
    text = tiny_spec_text(name="columns").replace("[axes]", textwrap.dedent("""\
        [axes]
        ffn = ["deepseekmoe"]
        attention = ["mla"]
        precision = ["fp8"]
        balance = ["bias"]"""))
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    done = CliRunner().invoke(app, ["run", "sweep", str(spec), "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    cells = pd.read_parquet(tmp_path / "run" / "cells.parquet")
    assert (cells["status"] == "ok").all(), cells[["label", "error"]]
    assert {"kv_lora_rank", "n_routed_experts", "sqnr_act_db", "maxvio_global", "cpu_share"} <= set(cells.columns)
    assert unregistered(cells.columns) == []


def test_docs_schema_table_is_the_registry():
    page = (ROOT / "docs" / "metrics.md").read_text()
    found = re.search(r"<!-- metrics-table:begin -->\n(.*?)<!-- metrics-table:end -->", page, re.S)
    assert found, "docs/metrics.md lost its metrics-table markers"
    assert found.group(1).strip() == metrics.markdown_table().strip(), "regenerate: python -m dsbench.metrics --markdown"


def test_check_policy_defaults_come_from_the_registry():
    policy = load_policy()
    assert set(policy.metrics) == set(metrics.default_check_rules())
    loss, memory = policy.metrics["final_loss"], policy.metrics["peak_mem_bytes"]
    assert (loss.rule, loss.tolerance, loss.worse) == ("relative", 0.005, "both")
    assert (memory.rule, memory.tolerance, memory.worse) == ("relative", 0.15, "higher")
    assert all(policy.metrics[m.name].rule == "exact" for m in metrics.METRICS.values() if m.check == "exact")
    # the timing rules name registered timing columns
    assert {policy.timing.metric, policy.timing.samples_metric} <= set(metrics.timing_columns())


def test_a_user_policy_still_overrides_a_registry_default(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('version = 1\n[metrics]\nfinal_loss = { rule = "relative", tolerance = 0.02 }\nparams_total = { rule = "ignore" }\n')
    policy = load_policy(path)
    assert policy.metrics["final_loss"].tolerance == 0.02
    assert "params_total" not in policy.metrics and "params_active" in policy.metrics
    path.write_text('version = 1\n[metrics]\nfinal_loss = { rule = "loose" }\n')
    with pytest.raises(PolicyError, match="metrics.final_loss.rule"):
        load_policy(path)


def test_host_dependent_columns_are_the_speed_sensitive_groups():
    assert set(HOST_DEPENDENT) == set(metrics.host_dependent_columns())
    for name in ("tokens_per_s_median", "step_time_ms_p10", "peak_mem_bytes", "mfu", "energy_j_per_token", "cpu_share",
                 "cell_wall_s", "torch_num_threads"):
        assert metrics.METRICS[name].host_dependent, name
    for name in ("params_active", "final_loss", "maxvio_global", "kv_cache_bytes_per_token_measured", "d_model"):
        assert not metrics.METRICS[name].host_dependent, name
    # a host-dependent column never has an exact or tolerance rule: it would fail across machines
    assert not [m.name for m in metrics.METRICS.values() if m.host_dependent and m.check in ("exact", "absolute")]


def test_variant_columns_name_their_axis_and_identity_excludes_outcomes():
    assert "n_kv_heads" in metrics.owned_by("attention") and "n_shared" in metrics.owned_by("ffn")
    assert metrics.owned_by("precision") == ()
    identity = set(metrics.describing_columns())
    assert {"workload", "d_model", "batch_size", "replicate", "n_experts"} <= identity
    assert not identity & {"cell_id", "label", "status", "final_loss", "params_total", "tokens_per_s_median"}


def test_register_rejects_a_bad_entry_in_one_line():
    with pytest.raises(metrics.MetricError, match="better = 'faster'"):
        metrics.register(metrics.Metric("x_per_s", "speed", "1/s", "x", better="faster"))
    with pytest.raises(metrics.MetricError, match="registered twice"):
        metrics.register(metrics.METRICS["final_loss"])
    assert metrics.main(["--bogus"]) == 2

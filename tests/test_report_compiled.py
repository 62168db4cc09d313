"""The report's Compiled measurement section: compiled ÷ eager per variant, and whether an
architecture axis's B ÷ A changes once both sides compile (dsbench/report/compiled.py)."""

from __future__ import annotations

import hashlib

import pytest
from fixture_results import make_cell, write_results

from dsbench.report import build_report, prepare
from dsbench.report.compiled import choice_by_mode, compiled_section, per_variant
from dsbench.results import load_results

# tokens/s factor of compiling, per (workload, attention): MLA gains more than MHA when compiled
SPEEDUP = {("decode", "mha"): 2.0, ("decode", "mla"): 3.0}


def cell(attention: str, mode: str, index: int) -> dict:
    row = make_cell("decode", attention=attention, batch_size=4, context_len=64, new_tokens=8, index=index)
    factor = SPEEDUP[("decode", attention)] if mode != "eager" else 1.0
    row.update({"measure.compile": mode, "label": row["label"] + f" {mode}",
                "cell_id": hashlib.sha256(f"{row['label']}{mode}".encode()).hexdigest()[:12],
                "tokens_per_s_median": row["tokens_per_s_median"] * factor,
                "step_time_ms_median": row["step_time_ms_median"] / factor})
    if mode != "eager":
        row.update({"compile_mode": mode, "compile_s": 12.5, "compiles": 3, "compile_steps": 3, "timed_compile_steps": 1,
                    "compile_settled": True, "graph_breaks": 2, "graph_break_reasons": "2× Dynamic shape operator",
                    "cudagraph_recordings": None})
    return row


@pytest.fixture
def compiled_run(tmp_path):
    cells = [cell(a, m, i) for i, (a, m) in enumerate((a, m) for m in ("eager", "compile") for a in ("mha", "mla"))]
    path = tmp_path / "run"
    write_results(path, cells, name="compiled", axes={"workload": ["decode"], "attention": ["mha", "mla"],
                                                          "measure.compile": ["eager", "compile"]})
    return path


def test_compiled_over_eager_per_variant(compiled_run):
    table = per_variant(prepare([load_results(compiled_run)]))
    assert len(table) == 2
    by_attention = {r["cell"].split("/")[1]: r for _, r in table.iterrows()}
    assert by_attention["mha"]["compiled ÷ eager"] == pytest.approx(2.0)
    assert by_attention["mla"]["compiled ÷ eager"] == pytest.approx(3.0)
    assert by_attention["mla"]["compile_s"] == 12.5 and by_attention["mla"]["steps that compiled (timed)"] == "3 (1)"


def test_a_choice_measured_eager_and_compiled(compiled_run):
    table = choice_by_mode(prepare([load_results(compiled_run)]))
    [row] = table.to_dict("records")
    assert row["axis"] == "attention" and row["B ÷ A"] == "mla ÷ mha"
    # make_cell's mla and mha decode alike in eager; compiled, mla gains 3× to mha's 2×
    assert row["eager"] == pytest.approx(1.0) and row["compile"] == pytest.approx(1.5)


def test_the_section_is_in_the_report_only_when_something_compiled(compiled_run, tmp_path):
    out = build_report([compiled_run], tmp_path / "report")
    text = (out / "index.md").read_text()
    assert "## Compiled measurement" in text and "| mla ÷ mha | decode | ×1.000 | ×1.500 |" in text
    eager_only = tmp_path / "eager"
    write_results(eager_only, [cell("mha", "eager", 0), cell("mla", "eager", 1)], name="eager")
    assert compiled_section(prepare([load_results(eager_only)]), tmp_path) is None

"""dsbench.pairing: two cells are a pair when equal in everything but the axis under test — and
the report's ablation, the claims and the loss-gap comparison all pair by that one rule."""

from __future__ import annotations

import pandas as pd
from fixture_results import make_cell, write_results

from dsbench import claims
from dsbench.claims.empirical import fp8_gaps
from dsbench.pairing import norm, pairs
from dsbench.report import ablation, prepare
from dsbench.results import load_results


def frame(*cells: dict) -> pd.DataFrame:
    return pd.DataFrame(list(cells))


def labels(found) -> list[tuple[str, str]]:
    return [(a["label"], b["label"]) for a, b in found]


def test_cells_differing_in_a_second_axis_are_not_paired():
    cells = frame(make_cell(attention="mha", precision="fp32"), make_cell(attention="mla", precision="bf16"),
                  make_cell(attention="mla", precision="fp32"))
    assert labels(pairs(cells, "attention", "mha", "mla")) == [("train/dense/mha/fp32 b8×t128", "train/dense/mla/fp32 b8×t128")]


def test_cells_of_two_model_sizes_are_not_paired():
    small, large = make_cell(attention="mha"), make_cell(attention="mla", d_model=128, n_layers=4)
    assert pairs(frame(small, large), "attention", "mha", "mla") == []
    assert len(pairs(frame(small, large, make_cell(attention="mla")), "attention", "mha")) == 1


def test_replicates_pair_replicate_to_replicate():
    cells = frame(*(make_cell(precision=p, replicate=r) for p in ("bf16", "fp8") for r in (0, 1, 2)))
    found = pairs(cells, "precision", "bf16", "fp8")
    assert [(a["replicate"], b["replicate"]) for a, b in found] == [(0, 0), (1, 1), (2, 2)]


def test_an_axis_that_does_not_apply_matches_every_value():
    dense = make_cell(ffn="dense")
    aux, bias = make_cell(ffn="moe", balance="aux"), make_cell(ffn="moe", balance="bias")
    ds_aux = make_cell(ffn="deepseekmoe", balance="aux")
    cells = frame(dense, aux, bias, ds_aux)
    assert {b["balance"] for _, b in pairs(cells, "ffn", "dense")} == {"aux", "bias"}  # and deepseekmoe/aux
    assert len(pairs(cells, "ffn", "dense")) == 3
    assert labels(pairs(cells, "ffn", "moe", "deepseekmoe")) == [(aux["label"], ds_aux["label"])]  # routed: balance to balance
    assert labels(pairs(cells, "balance", "aux", "bias")) == [(aux["label"], bias["label"])]  # the dense cell has no balance


def test_config_owned_by_the_axis_follows_it_and_nothing_else_does():
    mha, gqa = make_cell(attention="mha", n_kv_heads=8), make_cell(attention="gqa", n_kv_heads=2)
    assert len(pairs(frame(mha, gqa), "attention", "mha", "gqa")) == 1  # n_kv_heads follows the attention
    fp8_gqa = make_cell(attention="mha", precision="fp8", n_kv_heads=2)
    assert pairs(frame(mha, fp8_gqa), "precision", "fp32", "fp8") == []  # along precision it must be equal
    dense, moe = make_cell(ffn="dense"), make_cell(ffn="moe", balance="aux", n_experts=16, n_shared=0)
    assert len(pairs(frame(dense, moe), "ffn", "dense", "moe")) == 1


def test_values_compare_normalised():
    assert norm(8.0) == 8 and norm(float("nan")) is None and norm(pd.NA) is None and norm("n/a") is None
    a = make_cell(precision="bf16", context_len=None)
    b = make_cell(precision="fp8", context_len=float("nan"), batch_size=8.0)
    assert len(pairs(frame(a, b), "precision", "bf16", "fp8")) == 1
    assert pairs(frame(a, make_cell(precision="fp8", seed=1)), "precision", "bf16", "fp8") == []
    assert pairs(frame(a, make_cell(precision="fp8", lr=3e-4)), "precision", "bf16", "fp8") == []  # missing ≠ a value


def test_runs_do_not_mix_unless_the_caller_says_so():
    a, b = make_cell(precision="bf16"), make_cell(precision="fp8")
    cells = frame({**a, "run": "x"}, {**b, "run": "y"})
    assert pairs(cells, "precision", "bf16", "fp8") == []
    assert len(pairs(cells, "precision", "bf16", "fp8", differ=("run",))) == 1


def test_under_a_memory_budget_the_batch_is_the_outcome():
    budget = 2**30
    mha = make_cell("decode", attention="mha", batch_size=8, context_len=512, new_tokens=32, memory_budget_bytes=budget)
    mla = make_cell("decode", attention="mla", batch_size=40, context_len=512, new_tokens=32, memory_budget_bytes=budget)
    assert len(pairs(frame(mha, mla), "attention", "mha", "mla")) == 1
    other = {**mla, "memory_budget_bytes": 2 * budget}
    assert pairs(frame(mha, other), "attention", "mha", "mla") == []
    fixed = make_cell("decode", attention="mla", batch_size=40, context_len=512, new_tokens=32)
    assert pairs(frame({**mha, "memory_budget_bytes": None}, fixed), "attention", "mha", "mla") == []


def test_report_claims_and_compare_find_the_same_pairs(tmp_path):
    cells = [make_cell(precision=p, attention=att, n_kv_heads=kv, index=i)
             for i, (p, att, kv) in enumerate((p, att, kv) for p in ("bf16", "fp8") for att, kv in (("mha", 8), ("gqa", 2)))]
    cells.append(make_cell(precision="fp8", attention="mha", n_kv_heads=8, d_model=128, index=9))  # another size: no pair
    res = load_results(write_results(tmp_path / "r", cells))
    expected = {("train/dense/mha/bf16 b8×t128", "train/dense/mha/fp8 b8×t128"),
                ("train/dense/gqa/bf16 b8×t128", "train/dense/gqa/fp8 b8×t128")}
    long = ablation(prepare([res]))
    precision = long[(long.axis == "precision") & (long.metric == "final_loss")]
    assert len(precision) == 2 and set(precision.context) == {"train/dense/mha b8×t128", "train/dense/gqa b8×t128"}
    assert set(labels(pairs(claims.ok_cells([res]), "precision", "bf16", "fp8"))) == expected  # claims' cells (with `run`)
    gaps, _ = fp8_gaps([res], "fp8")  # the FP8 claims' pairs (through dsbench.compare)
    assert set(gaps["label"]) == {"train/dense/mha b8×t128", "train/dense/gqa b8×t128"}
    attention = long[(long.axis == "attention") & (long.metric == "final_loss")]
    assert set(attention.comparison) == {"gqa ÷ mha"} and len(attention) == 2

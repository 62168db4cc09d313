"""The DSA claims (dsbench/claims/dsa.py) on synthetic rows: the decode-slope verdict both ways,
the quality verdict both ways, and missing evidence."""

from __future__ import annotations

import hashlib

import pytest
from fixture_results import make_cell, write_results

from dsbench import claims
from dsbench.claims.dsa import slope_per_1k
from dsbench.results import load_results


def decode(attention: str, context: int, ms: float, flops: float) -> dict:
    cell = make_cell("decode", attention=attention, batch_size=1, context_len=context, new_tokens=16,
                     step_time_ms_median=ms, flops_per_token=flops, index_topk=2048 if attention == "dsa" else None)
    return cell


def train(attention: str, eval_loss: float, kept: float | None = None) -> dict:
    extra = {"index_topk": 64, "indexer_kept_mass": kept} if attention == "dsa" else {}
    cell = make_cell("train", attention=attention, seq_len=256, eval_loss=eval_loss, final_loss=eval_loss, **extra)
    return cell | {"cell_id": hashlib.sha256(cell["label"].encode()).hexdigest()[:12]}


def verdicts(tmp_path, cells) -> dict:
    for i, c in enumerate(cells):
        c["cell_index"] = i
    folder = write_results(tmp_path / "r", cells)
    return {r.claim.id: r.evidence for r in claims.evaluate([load_results(folder)])}


def test_slope_per_1k_context():
    import pandas as pd

    assert slope_per_1k(pd.Series([4096, 8192, 16384]), pd.Series([1.0, 2.0, 4.0])) == pytest.approx(1 / 4.096)


@pytest.mark.parametrize("dsa_ms, verdict", [((3.0, 3.1, 3.2), claims.DIRECTION), ((3.0, 5.0, 9.0), claims.NOT_REPRODUCED)])
def test_flat_decode_cost_both_ways(tmp_path, dsa_ms, verdict):
    contexts = (4096, 8192, 16384)
    cells = [decode("mla", c, ms, 9e6 * c / 4096) for c, ms in zip(contexts, (2.0, 3.0, 5.0))]
    cells += [decode("dsa", c, ms, 6e6 + 1e3 * c) for c, ms in zip(contexts, dsa_ms)]
    cells.append(decode("dsa", 512, 1.0, 1e6))  # below index_topk: not in the slope
    got = verdicts(tmp_path, cells)["v32-flat-decode-cost"]
    assert got.verdict == verdict, got
    assert "contexts 4096–16384 (index_topk 2048)" in got.detail and "analytic FLOP/token per 1K context" in got.detail


@pytest.mark.parametrize("dsa_loss, verdict", [(2.005, claims.DIRECTION), (2.2, claims.NOT_REPRODUCED)])
def test_sparse_quality_both_ways(tmp_path, dsa_loss, verdict):
    got = verdicts(tmp_path, [train("mla", 2.0), train("dsa", dsa_loss, kept=0.8)])["v32-sparse-quality"]
    assert got.verdict == verdict, got
    assert "keeps 80.0% of the attention mass" in got.detail and "index_topk 64 of 256-token rows" in got.detail


def test_sparse_quality_names_each_dsa_cells_training(tmp_path):
    """A staged cell (V3.2's recipe) and a sparse one pair with the same mla cell; the detail says
    which trained how."""
    sparse = train("dsa", 2.01, kept=0.8) | {"index_stage": "sparse", "steps": 150}
    staged = train("dsa", 2.3, kept=0.9) | {"index_stage": "staged", "index_dense_steps": 100, "index_warmup_steps": 20,
                                            "steps": 150, "label": "train/dense/dsa/fp32/attention.index_stage=staged b8×t256"}
    staged["cell_id"] = hashlib.sha256(staged["label"].encode()).hexdigest()[:12]
    got = verdicts(tmp_path, [train("mla", 2.0) | {"steps": 150}, sparse, staged])["v32-sparse-quality"]
    assert "sparse, index_topk 64" in got.detail and "staged (100 MLA + 20 warm-up + 30 sparse steps)" in got.detail
    assert got.measured.startswith("1/2 pairs"), got


def test_without_dsa_cells_the_claims_say_what_to_run(tmp_path):
    got = verdicts(tmp_path, [train("mla", 2.0), decode("mla", 4096, 2.0, 1e6)])
    for claim in ("v32-flat-decode-cost", "v32-sparse-quality"):
        assert got[claim].verdict == claims.NOT_CHECKABLE and "long-context-cpu" in got[claim].detail

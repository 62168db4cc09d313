"""One verdict rule for cards and claims (issue 28): B ÷ A with a 90% interval over pairs, a
difference only where the interval clears ×1 by more than the metric's noise band; and the cards
and the claims never contradict each other on any committed results folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsbench.claims.empirical import check_mla_decode
from dsbench.claims.evidence import DIRECTION, NOT_CHECKABLE, NOT_REPRODUCED
from dsbench.report import prepare
from dsbench.report.cards import Headline, cards
from dsbench.results import load_results
from dsbench.stats import ratio_interval

RESULTS = sorted(p for p in (Path(__file__).parent.parent / "results").iterdir() if (p / "run.json").exists())


def test_a_single_noisy_pair_is_no_clear_difference():
    h = Headline("tokens_per_s_median", "tokens/s (prefill)", ratios=[23975 / 30040])  # one pair, ×0.798
    assert h.judgement() == "same"
    assert ratio_interval(h.ratios).confidence < 0.9  # one pair has no 90% interval at all


def test_a_consistent_halving_with_one_outlier_is_lower():
    ratios = [0.5 * (1 + 0.01 * i) for i in range(9)] + [1.3]  # 1 of 10 pairs points the other way
    h = Headline("peak_mem_bytes", "peak memory (train)", ratios=ratios)
    iv = h.interval()
    assert iv.high < 1 and iv.confidence >= 0.9
    assert h.judgement() == "better"  # lower memory is better


def test_an_interval_inside_the_noise_band_is_no_clear_difference():
    ratios = [1.02 + 0.001 * i for i in range(10)]  # consistently +2%, but speed's band is ±5%
    assert ratio_interval(ratios).low > 1
    assert Headline("tokens_per_s_median", "tokens/s", ratios=ratios).judgement() == "same"


def decode_speed_headline(folder: Path) -> Headline | None:
    """The 'attention: mla vs mha' card's decode tokens/s line, or None where there is none."""
    for c in cards(prepare([load_results(folder)])):
        if c.title == "attention: mla vs mha":
            return next((h for h in c.headlines if h.label == "tokens/s (decode)"), None)
    return None


@pytest.mark.parametrize("folder", RESULTS, ids=[p.name for p in RESULTS])
def test_cards_and_claims_agree_on_decode_speed(folder):
    """The same results fed to the cards and to `dsbench claims`: a claim that judges MLA's decode
    speed says what the card says, and says nothing where the card claims nothing."""
    claim = check_mla_decode([load_results(folder)])
    h = decode_speed_headline(folder)
    card = h.judgement() if h is not None else ""
    expected = {"": NOT_CHECKABLE, "better": DIRECTION, "worse": NOT_REPRODUCED, "same": NOT_REPRODUCED}[card]
    assert claim.verdict == expected, (folder.name, card, claim)


def test_the_first_screen_states_the_run_health(tmp_path):
    from fixture_results import make_cell, write_results

    from dsbench.report.first_screen import health_line

    cells = [make_cell("train", index=0, contended=True), make_cell("train", index=1, attention="mla")]
    cells[1]["status"], cells[1]["cell_id"] = "failed", "c1"
    line = health_line(prepare([load_results(write_results(tmp_path / "r", cells))]))
    assert "1 cell(s) contended" in line and "see Environment and spec" in line
    assert "1 failed cell(s), see Failures" in line

"""The report's first screen: one card per comparison (numbers, what is left out of speed claims,
the verdict), two runs side by side, details collapsed, and the cards on screen at 1400×900 in a
real headless browser."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from fixture_results import make_cell, rich_cells, write_results
from test_report import CHROMIUM, FLAGS, rich, rich_report  # noqa: F401 (fixtures)

from dsbench.report import build_report, prepare
from dsbench.report.cards import by_comparison, cards
from dsbench.results import load_results


@pytest.fixture(scope="module")
def report(rich_report) -> Path:
    return rich_report


def card_of(found, title: str):
    matches = [c for c in found if c.title == title]
    assert len(matches) == 1, [c.title for c in found]
    return matches[0]


def headline(card, label: str):
    return next(h for h in card.headlines if h.label == label)


def test_one_card_per_comparison_with_its_numbers(rich):
    found = cards(prepare([load_results(rich)]))
    assert [c.title for c in found] == ["ffn: deepseekmoe vs dense", "attention: mla vs mha", "precision: fp8 vs bf16",
                                        "balance: bias vs aux"]
    mla = card_of(found, "attention: mla vs mha")
    kv = headline(mla, "KV bytes/token")
    assert kv.n == 8 and kv.median == 0.25 and kv.spread() == "×0.250"  # exact: no spread shown
    assert "KV bytes/token 75.0% lower [×0.250, ×0.250] (8 pairs)" in mla.verdict()
    bias = card_of(found, "balance: bias vs aux")
    assert headline(bias, "MaxVio").median == pytest.approx(0.2)
    assert "no clear difference: MaxVio ×0.200 [×0.200, ×0.200] (4 pairs: too few for a 90% interval)" in bias.verdict()
    moe = card_of(found, "ffn: deepseekmoe vs dense")
    loss = headline(moe, "final loss")
    assert loss.n == 8 and loss.median == pytest.approx(0.95, rel=1e-3) and loss.judgement() == "better"
    assert headline(moe, "peak memory (train)").judgement() == "worse"  # 500 vs 300 MiB


def test_speed_claims_leave_out_emulated_and_numerics_only_pairs(rich):
    found = cards(prepare([load_results(rich)]))
    fp8 = card_of(found, "precision: fp8 vs bf16")
    speed = headline(fp8, "tokens/s (train)")
    assert speed.ratios == [] and len(speed.flagged["emulated"]) == 6 and speed.judgement() == ""
    assert "every pair has an emulated or numerics-only side (6 emulated pairs)" in fp8.verdict()
    assert "tokens/s" not in fp8.verdict().split("Not supported")[0]  # never claimed before the caveat
    # memory is not a speed: FP8's pairs count there
    assert headline(fp8, "peak memory (train)").n == 6


def test_a_dotted_axis_pairs_along_its_config_column(tmp_path):
    cells = []
    for depth in (0, 1):
        extra = {"mtp_lambda": 0.3} if depth else {}
        cell = make_cell("train", index=depth, mtp=depth, **{"model.mtp": depth}, **extra,
                         final_loss=2.0 - 0.1 * depth, tokens_per_s_median=1000.0 - 200 * depth)
        cell["label"] += f" mtp{depth}"
        cell["cell_id"] = f"mtp{depth}"
        cells.append(cell)
    res = write_results(tmp_path / "mtp", cells, axes={"workload": ["train"], "model.mtp": [0, 1]})
    found = cards(prepare([load_results(res)]))
    mtp = card_of(found, "model.mtp: 1 vs 0")
    assert mtp.n_pairs == 1 and headline(mtp, "final loss").median == pytest.approx(0.95)
    # one pair: no 90% interval, so no verdict however large the change (issue 28: ×0.798 from one noisy pair)
    assert mtp.verdict().startswith("model.mtp = 1 vs 0, 1 pair on cpu: no clear difference: ")
    assert "final loss ×0.950 [×0.950, ×0.950] (1 pair: too few for a 90% interval)" in mtp.verdict()
    assert "tokens/s (train) ×0.800 [×0.800, ×0.800] (1 pair: too few for a 90% interval)" in mtp.verdict()
    assert "better" not in mtp.verdict() and "worse" not in mtp.verdict()


def slower_moe(cells: list[dict]) -> list[dict]:
    """The rich cells with DeepSeekMoE's final loss back at dense's: the ffn verdict must move."""
    for c in cells:
        if c["ffn"] == "deepseekmoe" and c.get("final_loss") is not None:
            c["final_loss"] = 2.0 + (0.01 if c["precision"] == "fp8" else 0)
    return cells


def test_two_runs_side_by_side_with_the_change(tmp_path):
    a = write_results(tmp_path / "a", rich_cells(), run_id="before")
    b = write_results(tmp_path / "b", slower_moe(rich_cells()), run_id="after")
    data = prepare([load_results(a), load_results(b)])
    groups = by_comparison(cards(data))
    assert all([c.run for c in g] == ["before", "after"] for g in groups.values())
    out = build_report([a, b], out=tmp_path / "rep")
    md = (out / "index.md").read_text()
    assert "| metric | before | after | change after |" in md
    assert re.search(r"\| final loss \| ×0\.950 n=8 \| ×1\.000 n=8 \| \+5\.0 pp \|", md)
    assert "Verdict moved: final loss: better → same (after)." in md
    assert "Verdict unchanged across the runs." in md  # attention: nothing moved


def test_first_screen_then_collapsed_details(report):
    text = (report / "index.html").read_text()
    first_details = text.index('<details class="section">')
    assert text.index('<div class="cards">') < first_details
    assert text.count('<div class="card">') == 4
    for title in ("Cells", "Ablation", "Failures", "Environment and spec"):
        assert re.search(rf'<details class="section"><summary><h2>{title}', text), title
    assert '<table class="sortable">' in text[first_details:]
    assert (report / "tables" / "cards.csv").read_text().startswith("comparison,run,pairs,device,metric")


PROBE = """<script>
window.addEventListener('load', function () {
  var cards = Array.from(document.querySelectorAll('.card')).map(function (c) {
    var r = c.getBoundingClientRect(); return [r.top, r.bottom, r.width]; });
  var table = document.querySelector("table.sortable"), col = 0;
  var cells = function () { return Array.from(table.querySelectorAll('tr')).slice(1).map(function (r) {
    return r.children[col].textContent; }); };
  table.querySelectorAll('th')[col].click();
  var sorted = cells(); table.querySelectorAll('th')[col].click();
  var out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({cards: cards, open: document.querySelectorAll('details[open]').length,
                                    viewport: [innerWidth, innerHeight], asc: sorted, desc: cells()});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs Debian's chromium; `apt-get install -y chromium`)")
def test_cards_on_the_first_screen_at_1400_by_900(report, tmp_path):
    page = tmp_path / "probed.html"
    page.write_text((report / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
                           "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(probe["cards"]) == 4 and probe["open"] == 0  # every details section collapsed
    height = probe["viewport"][1]
    assert all(top >= 0 and bottom <= height and width > 300 for top, bottom, width in probe["cards"]), probe
    # the cells table sorts by a clicked column (the cell names), both ways
    assert probe["asc"] == sorted(probe["asc"]) and probe["desc"] == sorted(probe["asc"], reverse=True)
    assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []


def test_a_side_far_from_its_light_makes_the_speed_ratio_implementation_bound(tmp_path):
    """mla decode at 5% of its speed of light: its tokens/s ratio is about our code, not MLA."""
    def decode(attention, sol, ctx):
        return make_cell("decode", "dense", attention, "fp32", batch_size=4, context_len=ctx, new_tokens=32,
                         sol_fraction=sol, sol_bound="memory")
    clean = [decode("mha", 0.6, 128), decode("mla", 0.5, 128)]
    bound = [decode("mha", 0.6, 512), decode("mla", 0.05, 512)]
    found = cards(prepare([load_results(write_results(tmp_path / "r", clean + bound))]))
    mla = card_of(found, "attention: mla vs mha")
    speed = headline(mla, "tokens/s (decode)")
    assert speed.n == 1 and len(speed.flagged["implementation-bound"]) == 1
    assert "tokens/s (decode) beyond its clean pairs (1 implementation-bound left out)" in mla.verdict()
    found = cards(prepare([load_results(write_results(tmp_path / "s", bound))]))
    verdict = card_of(found, "attention: mla vs mha").verdict()
    assert "every pair has an emulated, numerics-only or implementation-bound side (1 implementation-bound pairs; " \
           "implementation-bound: under 20% of its speed of light, or launch-bound)" in verdict

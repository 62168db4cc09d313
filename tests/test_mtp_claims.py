"""Multi-token prediction (DeepSeek-V3 §2.2): the three MTP claims' verdicts both ways and when
their evidence is missing, the equal-FLOPs step arithmetic, and the report's MTP section (present
only with MTP cells; results from before MTP, without its columns, still render). The cells are
synthetic rows with the columns of /work/notes/mtp_contract.md."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
from fixture_results import ci_cells, make_cell, rich_cells, write_results

from dsbench import claims
from dsbench.claims.mtp import FlopsMatch, equal_flops_steps, loss_at_equal_flops
from dsbench.report import build_report
from dsbench.results import load_results

MTP_IDS = ("v3-mtp-acceptance", "v3-mtp-speedup", "v3-mtp-main-loss")
STEPS = 20


def renamed(cell: dict, suffix: str) -> dict:
    """make_cell names a cell by its axes and shape; MTP cells differ in neither."""
    label = f"{cell['label']} {suffix}"
    return cell | {"label": label, "cell_id": hashlib.sha256(label.encode()).hexdigest()[:12]}


def train(mtp: int, eval_loss: float, flops_mtp: float = 1.5e5, **kw) -> dict:
    """A train cell of depth `mtp`: flops_per_token 6e5 without MTP, + flops_mtp per module."""
    cell = make_cell("train", eval_loss=eval_loss, final_loss=eval_loss - 0.05, mtp=mtp, mtp_lambda=0.3 if mtp else None,
                     params_mtp=20_000 * mtp, flops_per_token=6e5 + flops_mtp * mtp, flops_per_token_mtp=flops_mtp * mtp,
                     eval_loss_mtp=eval_loss + 0.5 if mtp else None, **{"model.mtp": mtp}, **kw)
    return renamed(cell, f"mtp{mtp}")


def speculative(accept=(0.87,), speedup=1.8, mtp=1, train_steps=400, context_len=128, **kw) -> dict:
    rates = {f"accept_rate_pos{k}": accept[k - 1] if k <= len(accept) else None for k in range(1, 9)}
    chained = [1.0]
    for rate in accept:
        chained.append(chained[-1] * rate)  # pos k is conditional on 1 … k−1 accepted
    columns = dict(mtp=mtp, train_steps=train_steps, **rates, accepted_len_mean=sum(chained), spec_speedup=speedup,
                   verify_cost_ratio=1.05, spec_tokens_per_s=speedup * 100.0, plain_tokens_per_s=100.0,
                   spec_matches_greedy=True, pretrain_final_loss=2.2, data="synthetic", **{"model.mtp": mtp})
    cell = make_cell("decode", batch_size=1, context_len=context_len, new_tokens=64, **(columns | kw))
    cell |= {"workload": "speculative", "label": cell["label"].replace("decode/", "speculative/", 1)}  # decode's shape
    return renamed(cell, f"D{mtp} s{train_steps}")


def curve(cell: dict, scale: float = 1.0) -> list[dict]:
    return [dict(step=s, metric="loss", value=(5.5 * 0.9**s + 2.0) * scale) for s in range(STEPS)]


def write(path: Path, cells: list[dict], scales: dict | None = None) -> Path:
    """Train cells get a loss curve (× scales[cell label], default 1); the rest no series."""
    for i, c in enumerate(cells):
        c["cell_index"] = i
    series = [(c, curve(c, (scales or {}).get(c["label"], 1.0))) for c in cells if c["workload"] == "train"]
    return write_results(path, cells, series=series)


def verdicts(*folders: Path) -> dict[str, claims.Evidence]:
    return {r.claim.id: r.evidence for r in claims.evaluate([load_results(f) for f in folders])}


# --- acceptance ---


def test_acceptance_reproduced_on_the_d1_cells_trained_longest(tmp_path):
    cells = [speculative((0.87,), context_len=128), speculative((0.88,), context_len=512),
             speculative((0.50,), train_steps=100), speculative((0.95, 0.8), mtp=2, train_steps=800)]
    got = verdicts(write(tmp_path / "r", cells))["v3-mtp-acceptance"]
    assert got.verdict == claims.REPRODUCED, got
    assert got.measured.startswith("87.5% during greedy generation (median of 2 D1 cells at 400 train steps; "
                                   "generation: 50.0%–95.0% over 4 cells)")
    assert "100 train steps: 50.0% (1 cells)" in got.detail and "d64" in got.detail
    assert "real text" not in got.detail  # the caveat is for a miss


def test_acceptance_of_a_looping_greedy_output_is_judged_on_held_out_text(tmp_path):
    """A small model's greedy output can repeat one byte, which drafts match trivially: where
    every judged cell loops, the verdict reads the teacher-forced agreement on held-out text."""
    loop = dict(greedy_distinct_fraction=0.02, eval_agreement_pos1=0.70)
    got = verdicts(write(tmp_path / "r", [speculative((1.0,), **loop), speculative((1.0,), context_len=512, **loop)]))
    acceptance = got["v3-mtp-acceptance"]
    assert acceptance.verdict == claims.NOT_REPRODUCED
    assert acceptance.measured.startswith("70.0% teacher-forced on held-out text")
    assert "loops (2.0% of its tokens distinct)" in acceptance.detail and "accepted trivially (100.0%)" in acceptance.detail
    assert "upper bound" in got["v3-mtp-speedup"].detail
    varied = dict(greedy_distinct_fraction=0.6, eval_agreement_pos1=0.70)  # not a loop: generation's acceptance stands
    got = verdicts(write(tmp_path / "v", [speculative((0.88,), **varied)]))["v3-mtp-acceptance"]
    assert got.verdict == claims.REPRODUCED and got.measured.startswith("88.0% during greedy generation")


@pytest.mark.parametrize("rate", [0.60, 0.95])
def test_acceptance_outside_85_90_is_not_reproduced_and_says_why(tmp_path, rate):
    got = verdicts(write(tmp_path / "r", [speculative((rate,)), speculative((0.3,), train_steps=50)]))["v3-mtp-acceptance"]
    assert got.verdict == claims.NOT_REPRODUCED, got
    assert "train_steps here: 50, 400" in got.detail and "671B" in got.detail and "real text" in got.detail
    assert "data: synthetic" in got.detail


def test_acceptance_prefers_one_mtp_module_as_v3_does(tmp_path):
    cells = [speculative((0.87,), mtp=2, train_steps=800), speculative((0.6,), mtp=1, train_steps=400)]
    got = verdicts(write(tmp_path / "r", cells))["v3-mtp-acceptance"]
    assert got.verdict == claims.NOT_REPRODUCED and "D1 cells at 400 train steps" in got.measured
    only_d2 = verdicts(write(tmp_path / "d2", [speculative((0.87, 0.7), mtp=2)]))["v3-mtp-acceptance"]
    assert only_d2.verdict == claims.REPRODUCED and "D2 cells" in only_d2.measured  # pos 1 means the same at D = 2


# --- speed-up ---


@pytest.mark.parametrize("speedup, verdict", [(1.8, claims.REPRODUCED), (1.65, claims.REPRODUCED),
                                              (1.3, claims.DIRECTION), (2.1, claims.DIRECTION), (0.9, claims.NOT_REPRODUCED)])
def test_speedup_verdicts(tmp_path, speedup, verdict):
    cells = [speculative(speedup=speedup), speculative(speedup=speedup, context_len=512), speculative(speedup=0.5, train_steps=10)]
    got = verdicts(write(tmp_path / "r", cells))["v3-mtp-speedup"]
    assert got.verdict == verdict, got
    assert got.measured.startswith(f"×{speedup:.2f} (median of 2 D1 cells at 400 train steps")
    assert "verify ×1.05 a plain token" in got.detail and "1.87 tokens per verify" in got.detail
    assert "Device: cpu." in got.detail and "per-forward overhead" in got.detail
    assert "decoded differently" not in got.detail


def test_speedup_flags_output_that_is_not_greedys(tmp_path):
    cells = [speculative(speedup=1.8, spec_matches_greedy=False), speculative(speedup=1.8, context_len=512)]
    got = verdicts(write(tmp_path / "r", cells))["v3-mtp-speedup"]
    assert "1 cell(s) decoded differently from plain greedy" in got.detail


def test_speedup_on_a_gpu_has_no_cpu_note(tmp_path):
    got = verdicts(write(tmp_path / "r", [speculative(speedup=1.8, device="cuda")]))["v3-mtp-speedup"]
    assert "Device: cuda." in got.detail and "per-forward overhead" not in got.detail


# --- the main model ---


def test_equal_flops_step_arithmetic():
    assert equal_flops_steps(20, 6e5, 7.5e5) == 16  # one MTP module costs 25% more: 20 × 0.8
    assert equal_flops_steps(100, 6e5, 7.5e5) == 80  # 0.8 is not exact in binary: not 79
    assert equal_flops_steps(20, 6e5, 6.6e5) == 18  # 18.18 steps: the 19th would exceed the budget
    assert equal_flops_steps(3, 1.0, 10.0) == 1  # never zero steps
    base, mtp = pd.Series({"flops_per_token": 6e5}), pd.Series({"flops_per_token": 7.5e5})
    steps = pd.Series(range(STEPS), index=range(STEPS), dtype=float)  # loss = the step number, to read the window
    match = loss_at_equal_flops(base, mtp, steps, steps + 100)
    # window = 20 // 10 = 2 steps, as final_loss: the baseline's steps 18, 19; the MTP cell's 14, 15
    assert match == FlopsMatch(steps=20, mtp_steps=16, width=2, base_loss=18.5, mtp_loss=114.5)
    assert loss_at_equal_flops(base, pd.Series({"flops_per_token": None}), steps, steps) is None
    assert loss_at_equal_flops(base, mtp, steps, pd.Series(dtype=float)) is None


def test_main_loss_lower_at_equal_steps_is_direction_and_shows_equal_flops(tmp_path):
    cells = [train(0, 2.10), train(1, 2.08), train(2, 2.09)]
    # 0.98 × the baseline's curve: lower step for step, but at step 16 (mtp 1) and 13 (mtp 2) still above its end
    scales = {cells[1]["label"]: 0.98, cells[2]["label"]: 0.98}
    got = verdicts(write(tmp_path / "r", cells, scales))["v3-mtp-main-loss"]
    assert got.verdict == claims.DIRECTION, got
    assert got.measured == "equal steps 2/2 pairs lower; equal FLOPs 0/2 lower"
    assert "2 of 2 pairs agree" in got.detail and "eval loss 2.0800 vs 2.1000 (-0.95%)" in got.detail
    assert "equal FLOPs (step 16 of 20, F ×1.250)" in got.detail and "(step 13 of 20, F ×1.500)" in got.detail


def test_main_loss_higher_is_not_reproduced(tmp_path):
    got = verdicts(write(tmp_path / "r", [train(0, 2.10), train(1, 2.12)]))["v3-mtp-main-loss"]
    assert got.verdict == claims.NOT_REPRODUCED and got.measured.startswith("equal steps 0/1 pairs lower")


def test_main_loss_pairs_only_cells_equal_but_for_mtp(tmp_path):
    cells = [train(0, 2.10), train(1, 2.08, d_model=128)]  # another size: no pair
    got = verdicts(write(tmp_path / "r", cells))["v3-mtp-main-loss"]
    assert got.verdict == claims.NOT_CHECKABLE and "differ only in mtp" in got.detail and "mtp-cpu" in got.detail
    dotted_only = [{k: v for k, v in c.items() if k != "mtp"} for c in (train(0, 2.10), train(1, 2.08))]
    got = verdicts(write(tmp_path / "dotted", dotted_only))["v3-mtp-main-loss"]  # the depth from model.mtp alone
    assert got.verdict == claims.DIRECTION and got.measured == "equal steps 1/1 pairs lower; equal FLOPs 0/1 lower"


# --- missing evidence ---


def test_without_mtp_cells_each_claim_says_to_run_mtp_cpu(tmp_path):
    got = verdicts(write_results(tmp_path / "ci", ci_cells()))
    for cid in MTP_IDS:
        assert got[cid].verdict == claims.NOT_CHECKABLE and got[cid].measured == "–", cid
        assert got[cid].detail.startswith("no ") and "--preset mtp-cpu" in got[cid].detail, cid
    for r in claims.evaluate():
        if r.claim.id in MTP_IDS:
            assert "--preset mtp-cpu" in r.evidence.detail and "paper-cpu" not in r.evidence.detail


def test_speculative_cells_without_a_column_are_not_checkable(tmp_path):
    cell = {k: v for k, v in speculative().items() if k != "train_steps"}
    got = verdicts(write(tmp_path / "r", [cell]))
    for cid in ("v3-mtp-acceptance", "v3-mtp-speedup"):
        assert got[cid].verdict == claims.NOT_CHECKABLE and "'train_steps'" in got[cid].detail, cid
    no_draft = verdicts(write(tmp_path / "d0", [speculative(mtp=0, accept=())]))  # speculative without an MTP draft
    assert no_draft["v3-mtp-acceptance"].detail.startswith("no speculative cells with mtp ≥ 1")


# --- the report's MTP section ---

SECTION = "## Multi-token prediction (DeepSeek-V3 §2.2)"


def mtp_cells() -> tuple[list[dict], dict]:
    cells = [train(0, 2.10), train(1, 2.08), train(2, 2.09, d_model=128)]  # the d_model 128 cell has no pair
    cells += [speculative((a, b), mtp=2, train_steps=s, context_len=ctx, speedup=sp)
              for s, a, b in ((100, 0.5, 0.3), (400, 0.8, 0.6)) for ctx, sp in ((128, 1.2), (512, 1.4))]
    return cells, {cells[1]["label"]: 0.98}


def test_report_has_the_mtp_section_with_both_tables_and_the_figure(tmp_path):
    cells, scales = mtp_cells()
    out = build_report([write(tmp_path / "r", cells, scales)], out=tmp_path / "rep")
    md = (out / "index.md").read_text()
    assert SECTION in md
    assert "| vs mtp = 0, equal steps | vs mtp = 0, equal FLOPs (train loss) |" in md
    assert "2.0800 vs 2.1000 (-0.95%)" in md and "step 16/20: " in md
    row = next(line for line in md.splitlines() if line.startswith("| train/dense/mha/fp32 b8×t128 mtp2 | 2 |"))
    assert row.endswith("| – | – |")  # unpaired: its own losses only
    assert "| accept pos 1 | accept pos 2 |" in md and "80.00%" in md and "×1.400" in md
    assert (out / "figures" / "mtp_speculative.png").exists()
    loss = pd.read_csv(out / "tables" / "mtp_loss.csv")
    assert loss["mtp"].tolist() == [1, 2] and loss["flops_mtp_steps"].iloc[0] == 16
    spec = pd.read_csv(out / "tables" / "mtp_speculative.csv")
    assert len(spec) == 4 and {"accept_rate_pos1", "accept_rate_pos2", "spec_speedup"} <= set(spec.columns)
    assert "v3-mtp-speedup" in md  # the claims section: the speculative cells are evidence


def test_report_without_mtp_cells_has_no_mtp_section(tmp_path):
    for name, cells in (("ci", ci_cells()), ("rich", rich_cells())):  # results from before MTP: none of its columns
        out = build_report([write_results(tmp_path / name, cells)], out=tmp_path / f"rep-{name}")
        md = (out / "index.md").read_text()
        assert SECTION not in md and "mtp_speculative" not in {p.stem for p in (out / "figures").glob("*.png")}, name
        assert not (out / "tables" / "mtp_loss.csv").exists()
    only_zero = [train(0, 2.10), train(0, 2.12, d_model=128)]  # the column, but every cell without MTP
    assert SECTION not in (build_report([write(tmp_path / "zero", only_zero)], out=tmp_path / "rep-zero") / "index.md").read_text()


def test_report_mtp_section_with_only_some_columns(tmp_path):
    """Train cells alone (no speculative table, no figure); speculative cells without timings."""
    out = build_report([write(tmp_path / "train", [train(0, 2.10), train(1, 2.08)])], out=tmp_path / "rep-train")
    md = (out / "index.md").read_text()
    assert SECTION in md and "accept pos 1" not in md and not (out / "figures" / "mtp_speculative.png").exists()
    bare = [{k: v for k, v in speculative().items() if k not in ("spec_speedup", "verify_cost_ratio", "train_steps")}]
    out = build_report([write(tmp_path / "bare", bare)], out=tmp_path / "rep-bare")
    md = (out / "index.md").read_text()
    assert SECTION in md and "| accept pos 1 |" in md and "87.00%" in md

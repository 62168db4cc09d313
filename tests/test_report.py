"""`dsbench report`: sections, figures chosen by the data present, escaping, the ablation view,
bad inputs, and the HTML opened in a real headless browser."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_results import ci_cells, make_cell, rich_cells, write_results
from typer.testing import CliRunner

from dsbench.cli import app
from dsbench.report import FIGURES, ablation, build_report, prepare
from dsbench.report.comparisons import scaling_points
from dsbench.report.render import SORT_JS
from dsbench.results import load_results

EVIL = "<script>alert('x')</script>&run"


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> Path:
    return write_results(tmp_path_factory.mktemp("res") / "rich", rich_cells(), name=EVIL)


@pytest.fixture(scope="module")
def rich_report(rich, tmp_path_factory) -> Path:
    return build_report([rich], out=tmp_path_factory.mktemp("rep") / "rich")


def figures(out: Path) -> set[str]:
    return {p.stem for p in (out / "figures").glob("*.png")}


def test_many_cells_every_status_and_every_figure(rich_report):
    out = rich_report
    assert (out / "index.html").exists() and (out / "index.md").exists()
    names = figures(out)
    for expected in ("throughput", "peak_memory", "mfu", "loss_curves", "maxvio", "kv_context", "fp8_loss_gap"):
        assert expected in names
    assert any(n.startswith("expert_load_") for n in names) and any(n.startswith("routing_by_domain_") for n in names)
    for table in ("cells", "failures", "ablation", "ablation_summary", "environment", "spec"):
        assert (out / "tables" / f"{table}.csv").exists()
    md = (out / "index.md").read_text()
    for status, message in (("oom", "CUDA out of memory"), ("timeout", "timeout_s = 60"), ("diverged", "loss is NaN")):
        assert re.search(rf"\| {status} \| [^\n]*{re.escape(message)}", md), status
    assert "(emulated)" in md and "(numerics only)" in md
    for png in (out / "figures").glob("*.png"):
        assert f"]({'figures/' + png.name})" in md


def test_html_is_self_contained_and_escapes_user_text(rich_report):
    text = (rich_report / "index.html").read_text()
    assert EVIL not in text and text.count("<script") == 1  # the sortable table's own few lines, nothing else
    assert f"<script>{SORT_JS}</script>" in text
    assert html.escape(EVIL) in text or "&lt;script&gt;" in text
    assert "RuntimeError: &lt;b&gt;boom&lt;/b&gt; &amp; friends" in text  # an error message, escaped
    sources = re.findall(r'<img[^>]*src="([^"]*)"', text)
    assert len(sources) == len(list((rich_report / "figures").glob("*.png")))
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert 'class="emulated"' in text and 'class="failed"' in text
    md = (rich_report / "index.md").read_text()
    assert "<script" not in md


def test_ablation_ratios_hold_everything_else_fixed(rich):
    long = ablation(prepare([load_results(rich)]))
    pick = lambda axis, comparison, metric: long[(long.axis == axis) & (long.comparison == comparison) & (long.metric == metric)]  # noqa: E731
    kv = pick("attention", "mla ÷ mha", "kv_cache_bytes_per_token")
    assert len(kv) == 8 and (kv.ratio == 0.25).all()  # 6 train pairs (dense ×2 precisions, moe ×2 ×2 balances) + 2 decode contexts
    fp8 = pick("precision", "fp8 ÷ bf16", "tokens_per_s_median")
    assert len(fp8) == 6 and fp8.speed_caveat.eq("emulated").all() and fp8.ratio.round(3).eq(0.625).all()
    maxvio = pick("balance", "bias ÷ aux", "maxvio_global")
    assert len(maxvio) == 4 and maxvio.ratio.round(6).eq(0.2).all()
    # along ffn, a dense cell (balance n/a) pairs with each balance of the routed cell
    moe = pick("ffn", "deepseekmoe/aux ÷ dense", "final_loss")
    assert len(moe) == 4 and moe.ratio.round(2).eq(0.95).all()
    assert set(long.comparison) >= {"deepseekmoe/bias ÷ dense", "mla ÷ mha", "fp8 ÷ bf16", "bias ÷ aux"}


def test_one_cell_missing_metrics_and_figures_skipped(tmp_path):
    cell = make_cell("train")
    for key in ("mfu", "peak_mem_bytes", "maxvio_global", "kv_cache_bytes_per_token", "tokens_per_s_p10", "tokens_per_s_p90"):
        cell.pop(key, None)
    res = write_results(tmp_path / "one", [cell])
    out = build_report([res], out=tmp_path / "rep")
    assert figures(out) == {"throughput", "loss_curves"}
    md = (out / "index.md").read_text()
    assert "Every cell finished ok." in md and "nothing to compare" in md
    assert "MaxVio over steps" in md  # listed as not drawn


def test_series_without_layer_column_and_no_series(tmp_path):
    cells = ci_cells()
    res = write_results(tmp_path / "plain", cells)
    series = load_results(res).series.drop(columns=["layer"])  # results written before the layer column
    series.to_parquet(res / "series.parquet", index=False)
    build_report([res], out=tmp_path / "rep")
    res2 = write_results(tmp_path / "noseries", cells, series=[])
    out = build_report([res2], out=tmp_path / "rep2")
    assert "loss_curves" not in figures(out) and "throughput" in figures(out)


def test_two_runs_and_default_out(tmp_path, monkeypatch, rich):
    a = write_results(tmp_path / "a", ci_cells(), run_id="ci")
    b = write_results(tmp_path / "b", ci_cells(), run_id="ci")  # same run id: told apart
    monkeypatch.chdir(tmp_path)
    out = build_report([a, b])
    assert out == Path("reports") / "ci+ci_2"
    md = (out / "index.md").read_text()
    assert "ci: train/dense/mha/fp32 b8×t128" in md and "ci#2: train/dense/mha/fp32 b8×t128" in md
    ablation_csv = (out / "tables" / "ablation.csv").read_text()
    assert "ci#2" in ablation_csv  # pairs never cross runs


def test_baseline_section(tmp_path):
    base = write_results(tmp_path / "base", ci_cells())
    slow = ci_cells()
    for c in slow:
        if c["label"].startswith("decode/dense/mha/fp32"):
            for k in ("step_time_ms_median", "step_time_ms_p10", "step_time_ms_p90"):
                c[k] *= 1.5
    cur = write_results(tmp_path / "cur", slow)
    out = build_report([cur], out=tmp_path / "rep", baseline=base)
    md = (out / "index.md").read_text()
    assert "Against the baseline" in md and "FAIL" in md and "regression" in md
    assert (out / "tables" / "check_cur.csv").exists()


SIZES = ((64, 2, 100_000), (128, 4, 800_000), (256, 8, 6_400_000))  # d_model, n_layers, params_active of dense/mha


def scaling_cells() -> list[dict]:
    """dense vs deepseekmoe (train) and mha vs mla (decode) at three sizes; B ÷ A set per size."""
    cells = []
    for i, (d_model, n_layers, active) in enumerate(SIZES):
        size = dict(d_model=d_model, n_layers=n_layers, params_active=active)
        dense = make_cell("train", "dense", **size, tokens_per_s_median=1000.0, final_loss=3.0)
        moe = make_cell("train", "deepseekmoe", balance="bias", **size, tokens_per_s_median=1000.0 * (0.5 + 0.1 * i),
                        final_loss=3.0 * (0.98 - 0.01 * i))
        shape = dict(batch_size=4, context_len=256, new_tokens=16)
        mha = make_cell("decode", attention="mha", **shape, **size, tokens_per_s_median=500.0)
        mla = make_cell("decode", attention="mla", **shape, **size, tokens_per_s_median=500.0 * (1.0 + 0.5 * i))
        cells += [dense, moe, mha, mla]
    for i, c in enumerate(cells):
        c["cell_index"] = i
    return cells


def test_scaling_figure_plots_each_comparison_against_model_size(tmp_path):
    res = write_results(tmp_path / "scaling", scaling_cells())
    points = scaling_points(prepare([load_results(res)]))
    moe = points[points.line == "deepseekmoe/bias ÷ dense: train/mha/fp32 b8×t128"]
    assert moe["size"].tolist() == [s[2] for s in SIZES]  # one point per size, x = A's activated parameters
    assert moe.throughput_ratio.round(6).tolist() == [0.5, 0.6, 0.7]
    assert moe.loss_ratio.round(6).tolist() == [0.98, 0.97, 0.96]
    mla = points[points.line == "mla ÷ mha: decode/dense/fp32 b4×ctx256+16"]
    assert mla.throughput_ratio.round(6).tolist() == [1.0, 1.5, 2.0] and mla.loss_ratio.isna().all()
    assert set(points.line) == {moe.line.iloc[0], mla.line.iloc[0]}  # no pair across sizes
    out = build_report([res], out=tmp_path / "rep")
    assert "scaling" in figures(out)
    single = write_results(tmp_path / "one-size", [c for c in scaling_cells() if c["d_model"] == 64])
    assert "scaling" not in figures(build_report([single], out=tmp_path / "rep1"))  # one size: nothing to plot


def test_figure_registry_names_its_needs():
    for f in FIGURES:
        assert f.columns or f.series, f.name
        assert f.caption and f.title


# --- bad inputs: one line, exit 2 ---


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_exit_2(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_report_bad_inputs(tmp_path):
    one_line_exit_2(run_cli("report", str(tmp_path / "nope")), "does not exist")
    newer = write_results(tmp_path / "newer", ci_cells(), schema_version=99)
    one_line_exit_2(run_cli("report", str(newer)), "schema_version 99")
    empty = write_results(tmp_path / "empty", [], axes={})
    one_line_exit_2(run_cli("report", str(empty)), "no cells")
    (tmp_path / "plain").mkdir()
    one_line_exit_2(run_cli("report", str(tmp_path / "plain")), "no run.json")


def test_report_cli(tmp_path):
    res = write_results(tmp_path / "r", ci_cells())
    result = run_cli("report", str(res), "--out", str(tmp_path / "rep"))
    assert result.exit_code == 0, result.output
    assert "index.html" in result.stdout


# --- a real headless browser ---

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]


def screenshot(page: Path, png: Path, profile: Path, height: int = 2000) -> list[str]:
    """Open the page, save a screenshot; returns the page's console messages."""
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size=1280,{height}",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert png.exists(), done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def pixel_spread(png: Path) -> tuple[float, float]:
    """(std of the pixels, fraction of pixels that are not near-white)."""
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]
    return float(rgb.std()), float((rgb.mean(axis=-1) < 0.9).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs Debian's chromium; `apt-get install -y chromium`)")
def test_html_in_headless_browser(rich_report, tmp_path):
    # The probe first: a page that does log to the console must be caught, or the check means nothing.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>console.error('planted'); undefinedFn();</script></body></html>")
    assert any("planted" in line for line in screenshot(bad, tmp_path / "bad.png", tmp_path / "profile-bad", 400))
    png = tmp_path / "report.png"
    console = screenshot(rich_report / "index.html", png, tmp_path / "profile")
    assert console == []
    std, inked = pixel_spread(png)
    assert std > 0.05 and inked > 0.02, (std, inked)


def test_cli_report_in_a_subprocess(tmp_path):
    """The installed command as a user runs it (one subprocess: imports take seconds)."""
    res = write_results(tmp_path / "r", ci_cells())
    done = subprocess.run([sys.executable, "-m", "dsbench", "report", str(res), "--out", str(tmp_path / "rep")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "label" in (tmp_path / "rep" / "tables" / "cells.csv").read_text().splitlines()[0]

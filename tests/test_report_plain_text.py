"""The report's leftovers of issue 19, class 3: a bad --baseline writes nothing; user text reaches
matplotlib as plain text (no mathtext, no half-written or empty report folder)."""

from __future__ import annotations

import pytest

from dsbench.errors import UserError
from dsbench.report import build_report
from dsbench.report.plain_text import escape
from tests.fixture_results import ci_cells, make_cell, write_results
from tests.test_cli import assert_usage_error, dsbench_in_process

HOSTILE = ["$x$", "$\\foo$", "$^_$", "$", "$$", "a$b$c$", "\\", "\\$x$", "{}", "^_", "$^_$", "$\\frac{1}{0}$", "[/x]", "[bold]x[/bold]",
           "%s %d {0}", "x" * 300, "ü∑≈ 中文 🙂", "<script>", "$\\$", "\n$x$\n"]


CHUNKS = [HOSTILE[i:i + 6] for i in range(0, len(HOSTILE), 6)]


@pytest.mark.parametrize("texts", CHUNKS, ids=[f"chunk{i}" for i in range(len(CHUNKS))])
def test_hostile_run_ids_and_labels_draw_as_text(tmp_path, texts):
    """Each text as the run id (titles, legends) and as cell labels (tick labels, legends)."""
    import html

    cells = ci_cells()
    for i, c in enumerate(cells):
        c["label"] = f"{c['label']} {texts[i % len(texts)]}"
    run = write_results(tmp_path / "run", cells, run_id=texts[0])
    other = write_results(tmp_path / "other", ci_cells(), run_id=texts[1])  # two runs: run ids in legends and titles
    out = build_report([run, other], out=tmp_path / "rep")
    assert list((out / "figures").glob("*.png"))
    page = (out / "index.html").read_text()
    assert html.escape(texts[-1].strip()[:40]) in page, texts[-1]


def test_escape_leaves_no_unescaped_dollar():
    for text in HOSTILE:
        escaped = escape(text)
        assert escaped.count("\\$") == text.count("$")


def test_a_failed_drawing_leaves_no_folder(tmp_path, monkeypatch):
    from dsbench.report import figures

    run = write_results(tmp_path / "run", ci_cells())

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "save_figure", broken)
    out = tmp_path / "deep" / "er" / "rep"
    with pytest.raises(RuntimeError):
        build_report([run], out=out)
    assert not (tmp_path / "deep").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]  # no report folder, no temporary one


def test_a_failed_drawing_keeps_the_previous_report(tmp_path, monkeypatch):
    from dsbench.report import figures

    run = write_results(tmp_path / "run", ci_cells())
    out = build_report([run], out=tmp_path / "rep")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(figures, "save_figure", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("drawing failed")))
    with pytest.raises(RuntimeError):
        build_report([run], out=out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


BAD_BASELINES = [
    ("missing", lambda tmp: tmp / "nope", "does not exist"),
    ("a file", lambda tmp: _file(tmp / "f.txt"), "not a folder"),
    ("empty folder", lambda tmp: _folder(tmp / "empty"), ""),
    ("corrupt run.json", lambda tmp: _corrupt(write_results(tmp / "b", ci_cells()), "run.json"), "run.json"),
    ("corrupt cells.parquet", lambda tmp: _corrupt(write_results(tmp / "b", ci_cells()), "cells.parquet"), "cells.parquet"),
    ("brackets [/x]", lambda tmp: tmp / "a[/x]b", "a[/x]b"),
]


def _file(p):
    p.write_text("x")
    return p


def _folder(p):
    p.mkdir()
    return p


def _corrupt(folder, name):
    (folder / name).write_bytes(b"\x00garbage")
    return folder


@pytest.mark.parametrize("name, make, needle", BAD_BASELINES, ids=[b[0] for b in BAD_BASELINES])
def test_a_bad_baseline_is_one_line_and_writes_nothing(tmp_path, name, make, needle):
    run = write_results(tmp_path / "run", ci_cells())
    baseline = make(tmp_path)
    out = tmp_path / "rep"
    done = dsbench_in_process("report", str(run), "--out", str(out), "--baseline", str(baseline))
    assert_usage_error(done, "baseline" if not needle else needle)
    assert not out.exists()


def test_library_callers_get_the_error_too(tmp_path):
    run = write_results(tmp_path / "run", [make_cell()])
    with pytest.raises(UserError):
        build_report([run], out=tmp_path / "rep", baseline=tmp_path / "nope")
    assert not (tmp_path / "rep").exists()

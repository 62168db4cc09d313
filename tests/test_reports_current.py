"""Every committed report (reports/<run>/) was drawn by the current report code: its stamp
(dsbench/report/stamp.py, in generator.json and on the page) is the one this checkout would write.
A change to dsbench/report/ fails here until the reports are redrawn:

    python scripts/regenerate_reports.py        # every reports/<run>/ from its generator.json
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dsbench.report.stamp import generator, read_generator, stamp_line

ROOT = Path(__file__).resolve().parents[1]
REPORTS = sorted(p.parent for p in (ROOT / "reports").glob("*/index.md"))


def test_there_are_committed_reports():
    assert len(REPORTS) >= 5, REPORTS


@pytest.mark.parametrize("report", REPORTS, ids=lambda p: p.name)
def test_committed_report_is_drawn_by_the_current_report_code(report: Path):
    record = read_generator(report)
    assert record is not None, f"reports/{report.name} has no generator.json: drawn before reports were stamped; redraw it"
    now = generator()
    assert (record["dsbench"], record["report_code"]) == (now["dsbench"], now["report_code"]), (
        f"reports/{report.name} was drawn by report code {record['report_code']} (dsbench {record['dsbench']}); "
        f"this checkout's is {now['report_code']} (dsbench {now['dsbench']}): python scripts/regenerate_reports.py")
    for page in ("index.md", "index.html"):
        assert stamp_line(record) in (report / page).read_text(encoding="utf-8"), f"reports/{report.name}/{page}: stamp differs"


@pytest.mark.parametrize("report", REPORTS, ids=lambda p: p.name)
def test_committed_report_names_committed_results(report: Path):
    """generator.json's inputs are committed results folders, so the report can be redrawn here."""
    record = read_generator(report) or {"results": [], "baseline": None}
    inputs = [*record["results"], *([record["baseline"]] if record["baseline"] else [])]
    assert record["results"], f"reports/{report.name}: generator.json names no results"
    for folder in inputs:
        assert (ROOT / folder / "run.json").is_file(), f"reports/{report.name}: {folder} is not a committed results folder"


def test_the_stamp_follows_the_report_code(tmp_path, monkeypatch):
    """Another byte in any report source is another stamp."""
    from dsbench.report import stamp

    copy = tmp_path / "report"
    copy.mkdir()
    for path in stamp.SOURCES.glob("*.py"):
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(stamp, "SOURCES", copy)
    before = stamp.report_code_hash()
    assert before == generator()["report_code"]  # the same files, elsewhere: the same stamp
    (copy / "render.py").write_bytes((copy / "render.py").read_bytes() + b"\n# changed\n")
    assert stamp.report_code_hash() != before

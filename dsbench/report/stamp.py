"""The generator stamp: which report code drew a report, so a committed report drawn by older code
is found (tests/test_reports_current.py) instead of read as current.

The stamp is the dsbench version and a hash of every source file of this package (dsbench/report/,
its path and bytes, sorted): a change to how any section, card or figure is drawn changes it.
It is written into index.md and index.html beside the date, and with the report's inputs into
generator.json, so `python scripts/regenerate_reports.py` can redraw every committed report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dsbench import __version__

SOURCES = Path(__file__).resolve().parent
GENERATOR_FILE = "generator.json"


def report_code_hash() -> str:
    """sha256 (first 12 hex digits) of the report package's .py files; newlines normalised so a
    checkout with CRLF endings stamps as the same code."""
    digest = hashlib.sha256()
    for path in sorted(SOURCES.rglob("*.py")):
        digest.update(path.relative_to(SOURCES).as_posix().encode() + b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:12]


def generator() -> dict:
    return {"dsbench": __version__, "report_code": report_code_hash()}


def stamp_line(stamp: dict) -> str:
    """'dsbench 0.1.0 · report code 1a2b3c4d5e6f': the line the page opens with."""
    return f"dsbench {stamp['dsbench']} · report code {stamp['report_code']}"


def write_generator(out: Path, stamp: dict, results: list[str], baseline: str | None) -> None:
    """generator.json: the stamp, and what the report was drawn from (paths as given)."""
    record = {**stamp, "results": results, "baseline": baseline}
    (out / GENERATOR_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_generator(report: Path) -> dict | None:
    path = Path(report) / GENERATOR_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

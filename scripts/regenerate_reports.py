"""Redraw every committed report (reports/<run>/) from the inputs its generator.json names, with
this checkout's report code: what tests/test_reports_current.py asks for after a change to
dsbench/report/. Run from the repository root:

    python scripts/regenerate_reports.py               # all of them
    python scripts/regenerate_reports.py paper-cpu     # some
"""

from __future__ import annotations

import sys
from pathlib import Path

from dsbench.report import build_report
from dsbench.report.stamp import read_generator


def main(names: list[str]) -> int:
    reports = [p.parent for p in sorted(Path("reports").glob("*/index.md")) if not names or p.parent.name in names]
    for report in reports:
        record = read_generator(report)
        if record is None:
            print(f"{report}: no generator.json; draw it once with `dsbench report RESULTS --out {report}`", file=sys.stderr)
            return 2
        build_report(record["results"], out=report, baseline=record["baseline"])
        print(f"{report}: {' + '.join(record['results'])}" + (f" against {record['baseline']}" if record["baseline"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A workload is one registration: harness files do not branch on a concrete workload's name.

The rule: in dsbench/**/*.py, outside dsbench/claims/ (claims name what they check), dsbench/workloads/
(each workload is its own file) and dsbench/presets/, no line compares a cell's workload with a
workload name: `workload ... "train"` (==, in, a key), `of_workload(data, "decode")`, `.name == "prefill"`.
The data split "train" and metric groups are not workload names and do not match the rule.
"""

from __future__ import annotations

import re
from pathlib import Path

DSBENCH = Path(__file__).resolve().parents[1] / "dsbench"
NAMES = r"""["'](train|prefill|decode|speculative)["']"""
RULE = re.compile(rf"""workload\W[^\n]{{0,40}}{NAMES}|of_workload\([^)]*{NAMES}|\.name\s*==\s*{NAMES}""")
EXCLUDED = ("claims", "workloads", "presets")



def found() -> dict[str, int]:
    counts = {}
    for path in sorted(DSBENCH.rglob("*.py")):
        rel = path.relative_to(DSBENCH).as_posix()
        if rel.split("/")[0] in EXCLUDED:
            continue
        n = len(RULE.findall(path.read_text()))
        if n:
            counts[rel] = n
    return counts


def test_harness_files_do_not_branch_on_workload_names():
    counts = found()
    assert counts == {}, f"a harness file names a workload (use a Workload attribute instead): {counts}"


def test_the_rule_sees_what_it_forbids():
    assert RULE.search('if axes["workload"] == "prefill":') and RULE.search('of_workload(data, "decode")')
    assert RULE.search('kv * (2 if workload.name == "prefill" else 1)')
    assert not RULE.search('def batch(self, step, split: str = "train")')

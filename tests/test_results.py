"""Results folders read back: the tables are rebuilt from the fragments only when the fragments
hold something the tables do not, never because of file times (a fresh clone's are arbitrary)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from dsbench.results import load_results

ROOT = Path(__file__).resolve().parents[1]


def copy(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(ROOT / "results" / name, folder)
    return folder


def test_fragments_newer_than_the_tables_do_not_rebuild_them(tmp_path):
    folder = copy(tmp_path, "cpu-small")
    before = (folder / "cells.parquet").read_bytes()
    for fragment in (folder / "cells").glob("*.json"):
        os.utime(fragment, (2e9, 2e9))  # as a checkout may leave them: newer than cells.parquet
    results = load_results(folder)
    assert (folder / "cells.parquet").read_bytes() == before
    assert len(results.cells) == len(list((folder / "cells").glob("*.json")))


def test_a_cell_the_tables_lack_rebuilds_them_and_old_fragments_still_read(tmp_path):
    folder = copy(tmp_path, "cpu-small")
    fragments = sorted((folder / "cells").glob("*.json"))
    old = json.loads(fragments[0].read_text())
    assert all(len(entry) == 5 for entry in old["series"])  # recorded before the layer field
    extra = {"row": {**old["row"], "cell_id": "000000000000", "status": "error"}, "series": old["series"][:3]}
    (folder / "cells" / "000000000000.json").write_text(json.dumps(extra))
    results = load_results(folder)
    assert "000000000000" in set(results.cells["cell_id"])
    rebuilt = pd.read_parquet(folder / "series.parquet")
    assert rebuilt["layer"].isna().all() and len(rebuilt[rebuilt["cell_id"] == "000000000000"]) == 3
    committed = pd.read_parquet(ROOT / "results" / "cpu-small" / "series.parquet")
    by_domain = rebuilt[(rebuilt["metric"] == "loss_by_domain") & (rebuilt["cell_id"] != "000000000000")]
    assert len(by_domain) == (committed["metric"] == "loss_by_domain").sum() and by_domain["domain"].notna().all()

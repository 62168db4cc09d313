"""A results folder that is damaged never crashes a reader (issue 19, class 2): every corruption
below, met by report, check (either side), claims and a resumed sweep's reading, gives either a
correct rebuild from the fragments or one line naming the file, exit 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from fixture_results import ci_cells, make_series, write_results
from typer.testing import CliRunner

from dsbench.cli import app
from dsbench.errors import ResultsError
from dsbench.results import ResultStore, load_results


def with_fragments(path):
    """A fixture folder plus the per-cell fragments a real sweep leaves (the source of truth)."""
    cells = ci_cells()
    folder = write_results(path, cells)
    store = ResultStore(folder)
    store.create()
    for cell in cells:
        series = [[r["step"], r["metric"], r["value"], None, None, None] for r in make_series(cell)]
        store.write_cell(dict(cell), series)
    return folder


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def first_fragment(folder):
    return sorted((folder / "cells").glob("*.json"))[0]


# (name, damage, with fragments, rebuilt?, words the one-line error must hold)
CASES = [
    ("run.json truncated", lambda f: truncate(f / "run.json"), True, False, "'run.json' in"),
    ("run.json a list", lambda f: (f / "run.json").write_text("[]"), True, False, "is not a dsbench run.json"),
    ("run.json binary", lambda f: (f / "run.json").write_bytes(b"\xff\xfe\x00garbage"), True, False, "'run.json' in"),
    ("cells.parquet truncated", lambda f: truncate(f / "cells.parquet"), True, True, None),
    ("cells.parquet truncated, no fragments", lambda f: truncate(f / "cells.parquet"), False, False, "cells.parquet or series.parquet"),
    ("cells.parquet wrong columns", lambda f: pd.DataFrame({"x": [1]}).to_parquet(f / "cells.parquet"), True, True, None),
    ("cells.parquet wrong columns, no fragments", lambda f: pd.DataFrame({"x": [1]}).to_parquet(f / "cells.parquet"), False, False,
     "lacks its columns"),
    ("cells.parquet a folder", lambda f: ((f / "cells.parquet").unlink(), (f / "cells.parquet").mkdir()), True, True, None),
    ("series.parquet missing", lambda f: (f / "series.parquet").unlink(), True, True, None),
    ("series.parquet missing, no fragments", lambda f: (f / "series.parquet").unlink(), False, False, "has no series.parquet"),
    ("series.parquet garbage", lambda f: (f / "series.parquet").write_bytes(b"PAR1 not really"), True, True, None),
    ("cells.parquet missing", lambda f: (f / "cells.parquet").unlink(), True, True, None),
    ("a fragment truncated", lambda f: truncate(first_fragment(f)), True, False, "cells/"),
    ("a fragment without its row", lambda f: first_fragment(f).write_text('{"series": []}'), True, False, "is not a cell fragment"),
    ("a fragment with a bad series", lambda f: first_fragment(f).write_text('{"row": {"cell_id": "a", "status": "ok"}, "series": 3}'),
     True, False, "is not a cell fragment"),
    ("a fragment binary", lambda f: first_fragment(f).write_bytes(b"\x80\x81\x82"), True, False, "cells/"),
]


def damaged(tmp_path, damage, fragments):
    folder = with_fragments(tmp_path / "r") if fragments else write_results(tmp_path / "r", ci_cells())
    damage(folder)
    return folder


def readers(folder, good, out):
    return {"report": ["report", str(folder), "--out", str(out / "rep")],
            "check as baseline": ["check", "--baseline", str(folder), "--current", str(good)],
            "check as current": ["check", "--baseline", str(good), "--current", str(folder)],
            "claims": ["claims", str(folder)]}


@pytest.mark.parametrize("name, damage, fragments, rebuilt, words", CASES, ids=[c[0] for c in CASES])
def test_every_reader_rebuilds_or_names_the_file(tmp_path, name, damage, fragments, rebuilt, words):
    good = write_results(tmp_path / "good", ci_cells())
    folder = damaged(tmp_path, damage, fragments)
    for reader, args in readers(folder, good, tmp_path).items():
        result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
        assert "Traceback" not in result.output, (reader, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (reader, repr(result.exception))
        if rebuilt:
            assert result.exit_code in (0, 1), (reader, result.output)  # 1: a check that found a regression, not a crash
        else:
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert result.exit_code == 2 and len(lines) == 1 and words in lines[0], (reader, result.output)


@pytest.mark.parametrize("name, damage, fragments, rebuilt, words", [c for c in CASES if c[2]], ids=[c[0] for c in CASES if c[2]])
def test_a_rebuild_gives_the_fragments_cells(tmp_path, name, damage, fragments, rebuilt, words):
    folder = damaged(tmp_path, damage, fragments)
    if not rebuilt:
        with pytest.raises(ResultsError) as e:
            load_results(folder)
        assert words in str(e.value) and "\n" not in str(e.value)
        return
    results = load_results(folder)
    assert sorted(results.cells["cell_id"]) == sorted(c["cell_id"] for c in ci_cells())
    assert len(results.series) == sum(len(make_series(c)) for c in ci_cells())


@pytest.mark.parametrize("name, damage, fragments, rebuilt, words", [c for c in CASES if c[2] and not c[3]],
                         ids=[c[0] for c in CASES if c[2] and not c[3]])
def test_resume_reads_the_folder_or_names_the_file(tmp_path, name, damage, fragments, rebuilt, words):
    """What --resume reads before it runs anything: run.json and the recorded cells."""
    folder = damaged(tmp_path, damage, fragments)
    store = ResultStore(folder)
    with pytest.raises(ResultsError) as e:
        store.read_run_info()
        store.recorded()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_table_that_cannot_be_written_is_one_line_and_keeps_the_fragments(tmp_path):
    folder = with_fragments(tmp_path / "r")
    store = ResultStore(folder)
    row = {**ci_cells()[0], "cell_id": "huge", "seed": 2**64}  # beyond int64: parquet cannot hold it
    store.write_cell(row, [])
    with pytest.raises(ResultsError) as e:
        store.consolidate()
    assert "cannot be written as cells.parquet" in str(e.value) and "\n" not in str(e.value)
    assert (folder / "cells" / "huge.json").exists()
    json.loads((folder / "cells" / "huge.json").read_text())

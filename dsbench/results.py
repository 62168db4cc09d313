"""Results on disk: per-cell fragments written atomically while a sweep runs, consolidated into
tidy tables that pandas, polars or DuckDB read directly. Nothing is pickled.

    <out>/run.json          schema version, run id, resolved spec, git, environment, calibration
    <out>/cells.parquet     one row per cell (units in column names)
    <out>/series.parquet    long format: run_id, cell_id, step, metric, value, layer, index, domain
    <out>/cells/<id>.json   the fragment each finished cell wrote (the source of truth)
    <out>/logs/<id>.log     the cell process's stdout and stderr
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "timeout", "diverged")
FIRST_COLUMNS = ("run_id", "cell_id", "status", "error", "label", "workload", "ffn", "attention", "precision", "balance")
SERIES_COLUMNS = ("run_id", "cell_id", "step", "metric", "value", "layer", "index", "domain")


from dsbench.errors import ResultsError  # noqa: E402,F401 (kept importable from here)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.logs_dir = self.root / "logs"
        self.work_dir = self.root / ".work"
        self.weights_dir = self.root / "weights"  # trained weights later cells reuse (dsbench/checkpoints.py); not committed

    def create(self) -> None:
        for d in (self.cells_dir, self.logs_dir, self.work_dir):
            d.mkdir(parents=True, exist_ok=True)

    # --- run metadata ---
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def read_run_info(self) -> dict | None:
        if not self.run_json.exists():
            return None
        return json.loads(self.run_json.read_text())

    def write_run_info(self, info: dict) -> None:
        write_atomic(self.run_json, json.dumps(info, indent=2, default=str).encode())

    # --- cell fragments ---
    def recorded(self) -> dict[str, str]:
        """cell_id → status of every cell already written."""
        if not self.cells_dir.exists():
            return {}
        out = {}
        for path in sorted(self.cells_dir.glob("*.json")):
            out[path.stem] = json.loads(path.read_text())["row"]["status"]
        return out

    def write_cell(self, row: dict, series: list) -> None:
        """One finished cell, atomically: a killed sweep never leaves half a fragment."""
        payload = json.dumps({"row": row, "series": series}, default=str).encode()
        write_atomic(self.cells_dir / f"{row['cell_id']}.json", payload)

    def fragments(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.cells_dir.glob("*.json"))]

    # --- consolidation ---
    def consolidate(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Rebuild cells.parquet and series.parquet from the fragments (idempotent)."""
        fragments = self.fragments()
        run_id = (self.read_run_info() or {}).get("run_id")
        cells = cells_frame([f["row"] for f in fragments], run_id)
        series = series_frame(fragments, run_id)
        for name, frame in (("cells.parquet", cells), ("series.parquet", series)):
            write_atomic(self.root / name, frame.to_parquet(index=False))
        return cells, series


def cells_frame(rows: list[dict], run_id: str | None) -> pd.DataFrame:
    columns: list[str] = list(FIRST_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    frame = pd.DataFrame([{**row, "run_id": run_id} for row in rows], columns=columns)
    for column in frame.columns[frame.dtypes == object]:
        frame[column] = _uniform_axis_values(frame[column])
    if "cell_index" in frame:  # the sweep's expansion order, not the order files were listed
        frame = frame.sort_values("cell_index", kind="stable").reset_index(drop=True)
    return frame


def _uniform_axis_values(values: pd.Series) -> pd.Series:
    """A dotted axis of numbers is "n/a" on the cells it does not apply to ("parallel.ep" = [1, 2]
    on a dense cell): parquet holds one type a column, so such a column is written as text."""
    kinds = {type(v) for v in values if v is not None and v == v}  # v == v: not NaN
    if str in kinds and len(kinds) > 1:
        return values.map(lambda v: v if v is None or v != v else str(v))
    return values


def _series_entry(entry: list) -> list:
    """(step, metric, value, layer, index, domain); fragments written before the `layer` field
    (schema 1's first results) hold (step, metric, value, index, domain)."""
    return [*entry[:3], None, *entry[3:]] if len(entry) == len(SERIES_COLUMNS) - 3 else entry


def series_frame(fragments: list[dict], run_id: str | None) -> pd.DataFrame:
    records = [(run_id, f["row"]["cell_id"], *_series_entry(entry)) for f in fragments for entry in f["series"]]
    frame = pd.DataFrame.from_records(records, columns=list(SERIES_COLUMNS))
    return frame.astype({"step": "int64", "value": "float64", "layer": "Int64", "index": "Int64", "metric": "string", "domain": "string"})


@dataclass
class Results:
    """A run loaded back: metadata, the cells table and the long series table."""

    path: Path
    run: dict
    cells: pd.DataFrame
    series: pd.DataFrame

    def ok(self) -> pd.DataFrame:
        return self.cells[self.cells["status"] == "ok"]

    def metric(self, metric: str) -> pd.DataFrame:
        return self.series[self.series["metric"] == metric]


def _import_plugins(info: dict) -> None:
    """The run's plug-in variants, so their columns are known to the report and the check; a
    reader without them installed still reads every column, unregistered."""
    plugins = (info.get("spec") or {}).get("plugins") or ()
    if not plugins:
        return
    from dsbench.variants import registry  # on use: it loads torch

    for name in plugins:
        try:
            registry.import_plugins([name])
        except ImportError:
            pass


def load_results(path: str | Path) -> Results:
    """One call: read a results folder (consolidating fragments if the sweep was cut short)."""
    store = ResultStore(path)
    info = store.read_run_info()
    if info is None:
        raise ResultsError(f"results: {str(path)!r} has no run.json; pass a folder written by `dsbench run sweep`")
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(f"results: {str(path)!r} has schema_version {version!r}; this dsbench reads {SCHEMA_VERSION}")
    _import_plugins(info)
    cells_path, series_path = store.root / "cells.parquet", store.root / "series.parquet"
    if not cells_path.exists() or _fragments_differ(store, cells_path):
        cells, series = store.consolidate()
    else:
        cells, series = pd.read_parquet(cells_path), pd.read_parquet(series_path)
    return Results(store.root, info, cells, series)


def _fragments_differ(store: ResultStore, cells_path: Path) -> bool:
    """Do the fragments hold cells, or outcomes, the tables do not (a sweep cut short, a cell
    re-run)? Compared by content: file times say nothing in a fresh clone, where checkout
    order decides them."""
    if not store.cells_dir.exists():
        return False
    recorded = pd.read_parquet(cells_path, columns=["cell_id", "status"])
    tables = set(zip(recorded["cell_id"], recorded["status"]))
    return {(f["row"]["cell_id"], f["row"]["status"]) for f in store.fragments()} != tables

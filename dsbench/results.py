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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dsbench.atomic import write_atomic  # noqa: F401 (importable from here)
from dsbench.schema import AXES

SCHEMA_VERSION = 1
FIRST_COLUMNS = ("run_id", "cell_id", "status", "error", "label", *AXES)
SERIES_COLUMNS = ("run_id", "cell_id", "step", "metric", "value", "layer", "index", "domain")


from dsbench.errors import ResultsError  # noqa: E402,F401 (kept importable from here)


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
        info = _read_json(self.run_json, self.root)
        if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
            raise ResultsError(f"results: {_where(self.run_json, self.root)} is not a dsbench run.json (no run_id); "
                               "it cannot be rebuilt: rerun the sweep into a new --out")
        _check_run_shape(info, _where(self.run_json, self.root))
        return info

    def write_run_info(self, info: dict) -> None:
        self._write(self.run_json, json.dumps(info, indent=2, default=str).encode())

    def _write(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except OSError as e:  # disk full, a read-only mount: one line; what was written before stays
            raise ResultsError(f"results: cannot write {_where(path, self.root)} ({e.strerror or type(e).__name__}); "
                               "the cells already recorded are kept: free space and --resume") from None

    # --- cell fragments ---
    def recorded(self) -> dict[str, str]:
        """cell_id → status of every cell already written."""
        if not self.cells_dir.exists():
            return {}
        return {f["row"]["cell_id"]: f["row"]["status"] for f in self.fragments()}

    def write_cell(self, row: dict, series: list) -> None:
        """One finished cell, atomically: a killed sweep never leaves half a fragment."""
        payload = json.dumps({"row": row, "series": series}, default=str).encode()
        self._write(self.cells_dir / f"{row['cell_id']}.json", payload)

    def fragments(self) -> list[dict]:
        """Every cell fragment, each checked: a corrupt one is named in one line (delete it and
        `--resume` runs that cell again)."""
        if not self.cells_dir.exists():
            return []
        return [_checked_fragment(path, self.root) for path in sorted(self.cells_dir.glob("*.json"))]

    # --- consolidation ---
    def rebuild(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The cells and series tables from the fragments, in memory."""
        fragments = self.fragments()
        run_id = (self.read_run_info() or {}).get("run_id")
        return cells_frame([f["row"] for f in fragments], run_id), series_frame(fragments, run_id)

    def consolidate(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Rebuild cells.parquet and series.parquet from the fragments (idempotent)."""
        cells, series = self.rebuild()
        self.write_tables(cells, series)
        return cells, series

    def write_tables(self, cells: pd.DataFrame, series: pd.DataFrame) -> None:
        for name, frame in (("cells.parquet", cells), ("series.parquet", series)):
            try:
                data = frame.to_parquet(index=False)
            except (ValueError, TypeError, OverflowError, ImportError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise ResultsError(f"results: the cells of {str(self.root)!r} cannot be written as {name} "
                                   f"({type(e).__name__}: {_first_line(e)}); the fragments under cells/ are kept") from None
            try:
                write_atomic(self.root / name, data)
            except OSError as e:
                raise ResultsError(f"results: cannot write {name} in {str(self.root)!r} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _where(path: Path, root: Path) -> str:
    """A file of a results folder, as messages name it: 'cells/abc.json' in '/the/folder'."""
    return f"{str(path.relative_to(root))!r} in {str(root)!r}"


# The fields of run.json that readers (check, report, claims, profile) open as an object or a list:
# any other value there is a damaged file, named here once rather than failing in each reader.
RUN_JSON_SHAPE = {"spec": dict, "probe": dict, "environment": dict, "git": dict, "command": list,
                  **{f"spec.{k}": dict for k in ("model", "attention", "ffn", "axes", "measure", "parallel", "kernels",
                                                 "executor", *("train", "prefill", "decode", "speculative"))},
                  "spec.plugins": list, "spec.sweep": list}


def _check_run_shape(info: dict, where: str) -> None:
    for key, kind in RUN_JSON_SHAPE.items():
        head, _, tail = key.partition(".")
        value = info.get(head) if not tail else (info.get(head) or {}).get(tail)
        if value is not None and not isinstance(value, kind):
            raise ResultsError(f"results: {where}: {key} is {type(value).__name__} {str(value)[:40]!r}, where "
                               f"{'an object' if kind is dict else 'a list'} belongs; the file is damaged: rerun the sweep into a new --out")


def _read_json(path: Path, root: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"results: {_where(path, root)} is unreadable or not JSON ({type(e).__name__}: {_first_line(e)})") from None


def _checked_fragment(path: Path, root: Path) -> dict:
    fragment = _read_json(path, root)
    row = fragment.get("row") if isinstance(fragment, dict) else None
    ok = (isinstance(row, dict) and isinstance(row.get("cell_id"), str) and isinstance(row.get("status"), str)
          and isinstance(fragment.get("series"), list) and all(isinstance(e, list) for e in fragment["series"]))
    if not ok:
        raise ResultsError(f"results: {_where(path, root)} is not a cell fragment (it needs row.cell_id, row.status and a "
                           "series list); delete it and --resume runs that cell again")
    return fragment


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
    tables = _read_tables(store)
    if tables is None or _fragments_differ(store, tables[0]):
        if not store.fragments() and tables is None:
            _no_tables(store)
        tables = store.rebuild()
        try:  # best effort: a reader needs the tables in memory, not on disk (a read-only folder still reads)
            store.write_tables(*tables)
        except ResultsError:
            pass
    return Results(store.root, info, *tables)


def _read_tables(store: ResultStore) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """cells.parquet and series.parquet, or None where either is missing, unreadable or lacks
    its key columns (then the fragments rebuild them)."""
    try:
        cells, series = pd.read_parquet(store.root / "cells.parquet"), pd.read_parquet(store.root / "series.parquet")
    except Exception:  # noqa: BLE001 — any unreadable table (ArrowInvalid, OSError, …) is rebuilt from the fragments
        return None
    lacking = ((len(cells) and not {"cell_id", "status", "label"} <= set(cells.columns))
               or (len(series) and not {"cell_id", "step", "metric", "value"} <= set(series.columns)))
    if lacking:  # an empty table is an empty run's, whatever its columns
        return None
    return cells, series


def _no_tables(store: ResultStore) -> None:
    """Neither readable tables nor fragments: say which file is wrong, in one line."""
    for name in ("cells.parquet", "series.parquet"):
        path = store.root / name
        if not path.exists():
            raise ResultsError(f"results: {str(store.root)!r} has no {name} and no cell fragments under cells/ to rebuild it from")
    raise ResultsError(f"results: cells.parquet or series.parquet in {str(store.root)!r} is unreadable or lacks its columns, "
                       "and there are no cell fragments under cells/ to rebuild them from")


def _fragments_differ(store: ResultStore, cells: pd.DataFrame) -> bool:
    """Do the fragments hold cells, or outcomes, the tables do not (a sweep cut short, a cell
    re-run)? Compared by content: file times say nothing in a fresh clone, where checkout
    order decides them."""
    if not store.cells_dir.exists():
        return False
    if "cell_id" not in cells:  # an empty table without columns
        return bool(store.fragments())
    tables = set(zip(cells["cell_id"], cells["status"]))
    return {(f["row"]["cell_id"], f["row"]["status"]) for f in store.fragments()} != tables

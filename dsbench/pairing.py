"""When two cells are a pair: the one rule the report's ablation, the claims and the loss-gap
comparison all use.

    pairs(cells, "attention", "mha", "mla")    # [(mha cell, mla cell), ...]
    pairs(cells, "ffn", "dense")               # dense against every other ffn value

The rule. Cells A and B are a pair along `axis` when A's value of `axis` is `a`, B's is `b` (any
other value when b is None), and they are equal in everything else that says what a cell is: every
axis, every resolved config column (model dims, shape, steps, lr, seed, data, device, replicate;
dsbench.metrics' axis, config and variant groups) and the run they came from (a `run` column, where
the caller has one). Four qualifications, each one a thing the cells themselves say:

1. Variant config owned by the axis under test is a consequence of its value, not part of the
   identity: along `attention`, MHA's n_kv_heads and MLA's latent dims; along `ffn`, the expert
   layout and router. Along any other axis they must be equal.
2. An axis that does not apply to a cell (`n/a`: balance on a dense FFN) matches every value of
   it: a dense cell pairs with each balance of a routed one, while two routed cells must agree.
3. Under a memory budget the batch size is the outcome (the largest batch that fits), so the
   budget is compared and the batch is not.
4. `differ` names columns the caller lets differ (claims' shared-expert ablation pairs two runs).

Values are compared normalised: None, NaN, pd.NA and "n/a" are one "missing"; integral floats
equal ints (8.0 == 8: a column with a null in one run's parquet is stored as float); numpy scalars
compare as Python values. A column present in neither cell, or absent from the table, is not
compared. Replicates (measure.replicates: one cell in several processes) pair replicate to
replicate, each its own pair. Every match is a pair, A before B.

What this replaced: the report held only axes, shape and run fixed (two sizes of a model paired,
and `n/a` matched only along ffn); claims compared a fixed column list without n_heads or
head_dim, across runs, and kept only the first B per A; compare merged on another list that
included n_kv_heads (so MHA and GQA cells could never pair) and missed context_len.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from dsbench.metrics import describing_columns, dotted_axis, metric_of, owned_by

NA = "n/a"
RUN = "run"  # the caller's column telling runs apart


def norm(value):
    """A cell value as a plain, comparable Python value; every kind of missing becomes None."""
    if value is None or value is pd.NA or (isinstance(value, str) and value == NA):
        return None
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def identity_columns(cells: pd.DataFrame, axis: str, differ: Iterable[str] = ()) -> list[str]:
    """The columns two cells must agree in to pair along `axis`."""
    skip = {axis, *owned_by(axis), *differ}
    dotted = [c for c in cells.columns if dotted_axis(c)]  # a dotted-key axis is held fixed like a named one
    return [c for c in (*describing_columns(), *dotted, RUN) if c in cells and c not in skip]


def _axes(columns: list[str]) -> list[str]:
    return [c for c in columns if (m := metric_of(c)) and m.group == "axis"]


def _batch_under_budget(cells: pd.DataFrame) -> pd.Series:
    """batch_size, or "fitted" where a memory budget chose it (rule 3: the budget is compared)."""
    if "memory_budget_bytes" not in cells:
        return cells["batch_size"]
    return cells["batch_size"].astype(object).where(cells["memory_budget_bytes"].isna(), "fitted")


def _rows(cells: pd.DataFrame, columns: list[str]) -> list[tuple]:
    frame = cells[columns].copy()
    if "batch_size" in frame:
        frame["batch_size"] = _batch_under_budget(cells)
    return [tuple(norm(v) for v in row) for row in frame.itertuples(index=False)]


def _match(x: tuple, y: tuple, wildcard: list[bool]) -> bool:
    return all(u == v or (w and (u is None or v is None)) for u, v, w in zip(x, y, wildcard))


def pairs(cells: pd.DataFrame, axis: str, a, b=None, differ: Iterable[str] = ()) -> list[tuple[pd.Series, pd.Series]]:
    """(A, B) for every pair along `axis` with A's value `a` and B's `b` (or any other present value)."""
    if cells.empty or axis not in cells:
        return []
    values = [norm(v) for v in cells[axis]]
    a_pos = [i for i, v in enumerate(values) if v == norm(a)]
    b_pos = [i for i, v in enumerate(values) if v is not None and (v == norm(b) if b is not None else v != norm(a))]
    columns = identity_columns(cells, axis, differ)
    keys = _rows(cells, columns)
    axes = set(_axes(columns))
    wildcard = [c in axes for c in columns]
    return [(cells.iloc[i], cells.iloc[j]) for i in a_pos for j in b_pos if _match(keys[i], keys[j], wildcard)]

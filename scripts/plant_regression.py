"""Plant a regression in a copy of a results folder, to show the CI gate catches it.

    python scripts/plant_regression.py SRC DST --slow "decode/dense/mha/fp32" [--factor 1.25]
    python scripts/plant_regression.py SRC DST --loss "train/dense/mha/fp32" [--loss-factor 1.02]
    dsbench check --baseline results/ci-baseline --current DST      # expect exit 1

--slow multiplies the step times of every cell whose label starts with the prefix (cells and
series; tokens/s, MFU and FLOP/s follow), as if that variant had become `factor` times slower.
--loss multiplies the train loss (final_loss, eval_loss and the loss curve) of matching cells.
Only run.json and the parquet tables are copied (the per-cell fragments would be re-read).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd

TIME_COLUMNS = ("step_time_ms_median", "step_time_ms_p10", "step_time_ms_p90", "step_time_ms_mean", "measured_work_s")
RATE_COLUMNS = ("tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90", "model_flops_per_s", "mfu")
LOSS_COLUMNS = ("final_loss", "eval_loss")


def plant(src: Path, dst: Path, slow: str | None = None, factor: float = 1.25, loss: str | None = None,
          loss_factor: float = 1.02) -> list[str]:
    """Copy src to dst with the regressions planted; returns the labels it changed."""
    dst.mkdir(parents=True, exist_ok=False)
    shutil.copy2(src / "run.json", dst / "run.json")
    cells, series = pd.read_parquet(src / "cells.parquet"), pd.read_parquet(src / "series.parquet")
    changed = []
    if slow:
        hit = cells["label"].str.startswith(slow) & (cells["status"] == "ok")
        _scale(cells, hit, TIME_COLUMNS, factor)
        _scale(cells, hit, RATE_COLUMNS, 1 / factor)
        s_hit = series["cell_id"].isin(cells.loc[hit, "cell_id"]) & (series["metric"] == "step_time_ms")
        series.loc[s_hit, "value"] *= factor
        changed += cells.loc[hit, "label"].tolist()
    if loss:
        hit = cells["label"].str.startswith(loss) & (cells["status"] == "ok") & cells["final_loss"].notna()
        _scale(cells, hit, LOSS_COLUMNS, loss_factor)
        s_hit = series["cell_id"].isin(cells.loc[hit, "cell_id"]) & series["metric"].isin(["loss", "eval_loss"])
        series.loc[s_hit, "value"] *= loss_factor
        changed += cells.loc[hit, "label"].tolist()
    if not changed:
        raise SystemExit(f"no ok cell's label starts with {slow or loss!r}")
    cells.to_parquet(dst / "cells.parquet", index=False)
    series.to_parquet(dst / "series.parquet", index=False)
    return changed


def _scale(cells: pd.DataFrame, rows: pd.Series, columns, factor: float) -> None:
    for col in columns:
        if col in cells:
            cells.loc[rows, col] = pd.to_numeric(cells.loc[rows, col]) * factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--slow", help="label prefix of the cells to slow down")
    parser.add_argument("--factor", type=float, default=1.25)
    parser.add_argument("--loss", help="label prefix of the train cells whose loss changes")
    parser.add_argument("--loss-factor", type=float, default=1.02)
    args = parser.parse_args()
    for label in plant(args.src, args.dst, args.slow, args.factor, args.loss, args.loss_factor):
        print(f"planted in {label}")


if __name__ == "__main__":
    main()

"""The loss gap of one precision against another, trained with the same seed and data: the one
implementation the report's FP8 − BF16 figure, the FP8 claims and scripts/fp8_loss_gap.py read
(DeepSeek-V3 §3.3 reports FP8 vs BF16 below 0.25% relative error).

    gap = relative_loss_error(load_results("results/fp8-cpu"), a="bf16", b="fp8")
    gap = loss_gaps(cells, series, a="bf16", b="fp8")   # frames of several runs (a `run` column)
    gap.per_step   # one row per pair and step: loss_a, loss_b, gap = loss_b − loss_a (nats/token),
                   # rel_error = gap / loss_a
    gap.final      # one row per pair: final and eval losses, their relative errors, step summary

Two ok train cells pair up by dsbench.pairing's rule along `precision`. Errors are signed
(positive: b's loss is higher).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dsbench.pairing import RUN, pairs
from dsbench.workloads import names_where

PER_STEP = ["label", "cell_id_a", "cell_id_b", "step", "loss_a", "loss_b", "gap", "rel_error"]


@dataclass
class LossGap:
    per_step: pd.DataFrame
    final: pd.DataFrame


def relative_loss_error(results, a: str = "bf16", b: str = "fp8") -> LossGap:
    """Per-step and final relative loss error of precision b against precision a, in one results set."""
    return loss_gaps(results.cells, results.series, a, b)


def loss_gaps(cells: pd.DataFrame, series: pd.DataFrame, a: str = "bf16", b: str = "fp8") -> LossGap:
    train = cells[cells["workload"].isin(names_where("trains")) & (cells["status"] == "ok")]
    loss = series[series["metric"] == "loss"] if not series.empty else series
    per_step, final = [], []
    for x, y in pairs(train, "precision", a, b):
        curve = pd.concat([_curve(loss, x), _curve(loss, y)], axis=1, keys=["loss_a", "loss_b"]).dropna()
        rel = (curve["loss_b"] - curve["loss_a"]) / curve["loss_a"]
        label = str(x["label"]).replace(f"/{a}", "", 1)
        per_step.append(pd.DataFrame({**_ids(x, y, label), "step": curve.index, "loss_a": curve["loss_a"].values,
                                      "loss_b": curve["loss_b"].values, "gap": (curve["loss_b"] - curve["loss_a"]).values,
                                      "rel_error": rel.values}))
        final.append(_final(x, y, a, b, label, rel))
    columns = PER_STEP + ([RUN] if RUN in cells else [])
    per_step_df = pd.concat(per_step, ignore_index=True) if per_step else pd.DataFrame(columns=columns)
    return LossGap(per_step_df, pd.DataFrame(final))


def _ids(x: pd.Series, y: pd.Series, label: str) -> dict:
    ids = {"label": label, "cell_id_a": x["cell_id"], "cell_id_b": y["cell_id"]}
    return {**ids, RUN: x[RUN]} if RUN in x else ids


def _curve(loss: pd.DataFrame, cell: pd.Series) -> pd.Series:
    """The cell's loss per step (series rows of its run where the frame holds several runs)."""
    if loss.empty:
        return pd.Series(dtype=float)
    mine = loss["cell_id"] == cell["cell_id"]
    if RUN in loss and RUN in cell:
        mine &= loss[RUN] == cell[RUN]
    return loss[mine].groupby("step")["value"].mean()


def _final(x: pd.Series, y: pd.Series, a: str, b: str, label: str, rel: pd.Series) -> dict:
    tail = rel.iloc[-max(1, len(rel) // 10):]  # the last 10% of steps, as final_loss averages
    return {
        **_ids(x, y, label), "a": a, "b": b, "ffn": x.get("ffn"),
        "final_loss_a": x["final_loss"], "final_loss_b": y["final_loss"],
        "final_rel_error": _rel(x["final_loss"], y["final_loss"]),
        "eval_loss_a": x.get("eval_loss"), "eval_loss_b": y.get("eval_loss"),
        "eval_rel_error": _rel(x.get("eval_loss"), y.get("eval_loss")),
        "mean_abs_rel_error": float(rel.abs().mean()), "max_abs_rel_error": float(rel.abs().max()),
        "tail_mean_rel_error": float(tail.mean()), "steps": len(rel),
    }


def _rel(a, b) -> float | None:
    if a is None or b is None or pd.isna(a) or pd.isna(b):
        return None
    return (b - a) / a

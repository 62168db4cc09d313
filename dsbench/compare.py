"""Comparisons across cells of one result set: the relative loss error of one precision against
another, trained with the same seed and data (DeepSeek-V3 §3.3 reports FP8 vs BF16 below 0.25%).

    gap = relative_loss_error(load_results("results/fp8-cpu"), a="bf16", b="fp8")
    gap.per_step   # one row per pair and step: loss_a, loss_b, rel_error = (loss_b − loss_a) / loss_a
    gap.final      # one row per pair: final and eval losses, their relative errors, step summary

Two train cells pair up when every axis but `precision` and every config column agree.
Relative errors are signed (positive: b's loss is higher).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

# Columns that must agree for two cells to be the same experiment in another precision.
PAIR_KEYS = (
    "workload", "ffn", "attention", "balance", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
    "vocab_size", "batch_size", "seq_len", "steps", "lr", "seed", "data", "device", "replicate",
)


@dataclass
class LossGap:
    per_step: pd.DataFrame
    final: pd.DataFrame


def _train_cells(cells: pd.DataFrame, precision: str) -> pd.DataFrame:
    chosen = cells[(cells["precision"] == precision) & (cells["workload"] == "train") & (cells["status"] == "ok")]
    return chosen.assign(label=chosen["label"].str.replace(f"/{precision}", "", regex=False))


def relative_loss_error(results, a: str = "bf16", b: str = "fp8") -> LossGap:
    """Per-step and final relative loss error of precision b against precision a."""
    cells, series = results.cells, results.series
    keys = [k for k in PAIR_KEYS if k in cells.columns]
    left, right = _train_cells(cells, a), _train_cells(cells, b)
    pairs = left.merge(right, on=keys, suffixes=("_a", "_b"))
    loss = series[series["metric"] == "loss"][["cell_id", "step", "value"]]
    per_step, final = [], []
    for _, pair in pairs.iterrows():
        curve = (loss[loss["cell_id"] == pair["cell_id_a"]]
                 .merge(loss[loss["cell_id"] == pair["cell_id_b"]], on="step", suffixes=("_a", "_b")))
        rel = (curve["value_b"] - curve["value_a"]) / curve["value_a"]
        per_step.append(pd.DataFrame({"label": pair["label_a"], "cell_id_a": pair["cell_id_a"], "cell_id_b": pair["cell_id_b"],
                                      "step": curve["step"], "loss_a": curve["value_a"], "loss_b": curve["value_b"],
                                      "rel_error": rel}))
        tail = rel.iloc[-max(1, len(rel) // 10):]  # the last 10% of steps, as final_loss averages
        final.append({
            "label": pair["label_a"], "a": a, "b": b, "cell_id_a": pair["cell_id_a"], "cell_id_b": pair["cell_id_b"],
            "final_loss_a": pair["final_loss_a"], "final_loss_b": pair["final_loss_b"],
            "final_rel_error": (pair["final_loss_b"] - pair["final_loss_a"]) / pair["final_loss_a"],
            "eval_loss_a": pair.get("eval_loss_a"), "eval_loss_b": pair.get("eval_loss_b"),
            "eval_rel_error": _rel(pair.get("eval_loss_a"), pair.get("eval_loss_b")),
            "mean_abs_rel_error": float(rel.abs().mean()), "max_abs_rel_error": float(rel.abs().max()),
            "tail_mean_rel_error": float(tail.mean()), "steps": len(rel),
        })
    columns = ["label", "cell_id_a", "cell_id_b", "step", "loss_a", "loss_b", "rel_error"]
    per_step_df = pd.concat(per_step, ignore_index=True) if per_step else pd.DataFrame(columns=columns)
    return LossGap(per_step_df, pd.DataFrame(final))


def _rel(a, b) -> float | None:
    if a is None or b is None or pd.isna(a) or pd.isna(b):
        return None
    return (b - a) / a

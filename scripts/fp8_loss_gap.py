"""What FP8 training costs in loss, and what each recipe's quantisation error is.

    python scripts/fp8_loss_gap.py RESULTS_DIR [--every N]

For every train cell pair that differs only in precision: the relative loss error of fp8 and
fp8-tensorwise against bf16, same seed and same batches (DeepSeek-V3 §3.3 reports < 0.25% for its
recipe), per step every N steps and at the end; fp32 against bf16 too when present, as the scale
of a difference that has nothing to do with FP8. Then each FP8 cell's SQNR of activations,
weights and output gradients (dB, mean and worst over its FP8 linears, measured at the final
weights) and the bytes its FP8 activation cache saves per step against BF16.
"""

from __future__ import annotations

import argparse

import pandas as pd

from dsbench.compare import relative_loss_error
from dsbench.results import load_results

BASELINE = "bf16"
OTHERS = ("fp8", "fp8-tensorwise", "fp32")


def markdown(df: pd.DataFrame, index: bool = False) -> str:
    """A Markdown table (pandas' to_markdown needs the optional `tabulate`)."""
    if index:
        df = df.reset_index()
    rows = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.itertuples(index=False)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None or pd.isna(x) else f"{100 * x:+.3f}%"


def loss_gap_tables(res, every: int) -> None:
    present = set(res.cells["precision"])
    for b in (p for p in OTHERS if p in present):
        gap = relative_loss_error(res, a=BASELINE, b=b)
        if gap.final.empty:
            continue
        print(f"\n## relative loss error of {b} vs {BASELINE}  ((loss_{b} − loss_{BASELINE}) / loss_{BASELINE})\n")
        table = pd.DataFrame({
            "cell": gap.final["label"],
            f"final loss {BASELINE}": gap.final["final_loss_a"].map("{:.4f}".format),
            f"final loss {b}": gap.final["final_loss_b"].map("{:.4f}".format),
            "final (last 10%)": gap.final["final_rel_error"].map(_pct),
            "eval": gap.final["eval_rel_error"].map(_pct),
            "mean abs per step": gap.final["mean_abs_rel_error"].map(_pct),
            "max abs per step": gap.final["max_abs_rel_error"].map(_pct),
            "steps": gap.final["steps"],
        })
        print(markdown(table))
        steps = gap.per_step[gap.per_step["step"] % every == 0]
        wide = steps.pivot(index="step", columns="label", values="rel_error").map(_pct)
        print(f"\nper step (every {every}):\n")
        print(markdown(wide, index=True))


def sqnr_table(res) -> None:
    cells = res.cells
    if "sqnr_act_db" not in cells.columns:
        return
    fp8 = cells[cells["sqnr_act_db"].notna()]
    print("\n## quantisation error at the final weights (SQNR, dB: mean over FP8 linears / worst one)\n")
    cols = {"cell": fp8["label"]}
    for kind in ("act", "weight", "grad"):
        cols[f"{kind} SQNR"] = [f"{m:.1f} / {w:.1f}" for m, w in zip(fp8[f"sqnr_{kind}_db"], fp8[f"sqnr_{kind}_db_min"])]
    cols["FP8 activation cache, MiB/step"] = (fp8["fp8_activation_bytes"] / 2**20).map("{:.2f}".format)
    cols["saved vs BF16, MiB/step"] = (fp8["fp8_activation_bytes_saved"] / 2**20).map("{:.2f}".format)
    cols["emulated"] = fp8["emulated"]
    print(markdown(pd.DataFrame(cols)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results folder (run.json, cells.parquet, series.parquet)")
    parser.add_argument("--every", type=int, default=25, help="print the per-step error every N steps")
    args = parser.parse_args()
    res = load_results(args.results)
    print(f"run {res.run['run_id']} ({res.run.get('name')}), {len(res.cells)} cells")
    loss_gap_tables(res, args.every)
    sqnr_table(res)


if __name__ == "__main__":
    main()

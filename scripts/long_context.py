"""Per-token cost and KV cache against context for each attention value of a long-context
sweep, and where each beats MLA: measured (per-token time) and predicted (the analytic FLOPs per
token: dsa's by bisection, variants/dsa.py; the others' at the measured contexts).

    python scripts/long_context.py results/long-context-cpu [--figure out.png]
    python scripts/long_context.py results/v4-long-context-cpu --figure v4.png   # mla, dsa, csa, hca, v4-hybrid

Decode: per-token time is the median step (one generated token per row); prefill: the median
step ÷ its tokens; of a cell's replicates, the fastest. Prints a Markdown table per workload,
each value ÷ mla, the KV cache of one sequence at each context (read off the live caches, against
the analytic count, and ÷ mla's), and the crossovers; with --figure, time, FLOPs and KV bytes
against context (log-log), one line per attention value (and dsa prefill form).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from dsbench.results import load_results
from dsbench.variants import dsa, registry
from dsbench.variants.config import config_from_size


def per_token(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per ok cell: workload, variant (attention, and dsa's prefill form), context, ms/token, FLOP/token."""
    ok = cells[(cells["status"] == "ok") & cells["workload"].isin(["decode", "prefill"])].copy()  # train cells: the claims
    prefill = ok["workload"] == "prefill"
    ok["context"] = ok["seq_len"].where(prefill, ok["context_len"])
    ok["ms_per_token"] = ok["step_time_ms_median"] / ok["tokens_per_step"]
    form = ok.get("dsa_prefill", pd.Series(None, index=ok.index))
    ok["variant"] = ok["attention"].where(~((ok["attention"] == "dsa") & prefill), "dsa-" + form.fillna("gather").astype(str))
    for column in ("kv_cache_bytes_at_context", "kv_cache_bytes_at_context_measured"):  # results from before they existed
        ok[column] = ok[column] if column in ok else float("nan")
    columns = ["workload", "variant", "context", "ms_per_token", "flops_per_token", "kv_cache_bytes_per_token",
               "kv_cache_bytes_at_context", "kv_cache_bytes_at_context_measured"]
    # Replicates of a cell (measure.replicates): the fastest, the one the machine's other processes slowed least.
    return ok[columns].groupby(["workload", "variant", "context"], as_index=False).min()


def crossover(table: pd.DataFrame, column: str, sparse: str, dense: str = "mla") -> str:
    """The first context where `sparse` costs less than `dense` in `column` (between the two
    contexts measured around it, and where the log of the ratio interpolates, log-linearly in
    context, to 0), or 'none measured'."""
    pivot = table.pivot_table(index="context", columns="variant", values=column)
    if sparse not in pivot or dense not in pivot:
        return "not in these results"
    both = pivot[[sparse, dense]].dropna()
    wins = both[sparse] < both[dense]
    # From here on: a single win between losses (both on MLA's dense path below index_topk) is noise.
    holds = wins[::-1].cummin()[::-1]
    if not holds.any():
        return f"none up to {int(both.index.max())}"
    first = holds.idxmax()
    before = [c for c in both.index if c < first]
    if not before:
        return f"at or below {int(first)}"
    lo = before[-1]
    r_lo, r_hi = (math.log(both.loc[c, sparse] / both.loc[c, dense]) for c in (lo, first))
    at = math.exp(math.log(lo) + (math.log(first) - math.log(lo)) * r_lo / (r_lo - r_hi))
    return f"between {int(lo)} and {int(first)} (interpolated {at:.0f})"


def predicted_crossover(size: str, attention: dict, decode: bool, upto: int = 1 << 20) -> str:
    """Smallest context (powers of √2) where dsa's analytic FLOPs per token fall below mla's, and
    the exact context (bisection between the grid points around it)."""
    keys = {k: v for k, v in attention.items() if k in registry.config_fields("attention", "dsa")}
    sparse_cfg = config_from_size(size, "dsa", "dense", **keys)
    dense_cfg = config_from_size(size, "mla", "dense", **{k: v for k, v in keys.items() if k in registry.config_fields("attention", "mla")})
    mla_module = registry.ATTENTION["mla"].module

    def wins(context: float) -> bool:
        mean = context if decode else (context + 1) / 2
        return dsa.DeepSeekSparseAttention.flops_per_token(sparse_cfg, mean, decode) < mla_module.flops_per_token(dense_cfg, mean, decode)

    context = 64.0
    while context <= upto:
        if wins(context):
            lo, hi = context / 2 ** 0.5, context
            for _ in range(40):
                lo, hi = (lo, (lo + hi) / 2) if wins((lo + hi) / 2) else ((lo + hi) / 2, hi)
            return f"{int(context)} (exactly {hi:.0f}; one attention layer's analytic FLOPs, dsa's gather form)"
        context *= 2 ** 0.5
    return f"none up to {upto}"


def markdown(table: pd.DataFrame) -> str:
    lines = []
    for workload, rows in table.groupby("workload"):
        pivot = rows.pivot_table(index="context", columns="variant", values="ms_per_token")
        flops = rows.pivot_table(index="context", columns="variant", values="flops_per_token")
        lines.append(f"\n### {workload}: ms per token (FLOP per token)\n")
        lines.append("| context | " + " | ".join(pivot.columns) + " |")
        lines.append("|---" * (len(pivot.columns) + 1) + "|")
        for context, r in pivot.iterrows():
            cells = [f"{r[c]:.4g} ({flops.loc[context, c]:.3g})" if pd.notna(r[c]) else "–" for c in pivot.columns]
            lines.append(f"| {int(context)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compared(variants, dense: str = "mla") -> list[str]:
    """The values compared with mla: every other one but mha and gqa (the dense baselines)."""
    return [v for v in variants if v != dense and v not in ("mha", "gqa", "mqa")]


def ratios(table: pd.DataFrame, dense: str = "mla") -> str:
    """Per workload: each value's ms per token ÷ mla's, measured and analytic."""
    lines = []
    for workload, rows in table.groupby("workload"):
        ms = rows.pivot_table(index="context", columns="variant", values="ms_per_token")
        flops = rows.pivot_table(index="context", columns="variant", values="flops_per_token")
        sparse = compared(ms.columns, dense)
        if dense not in ms or not sparse:
            continue
        lines.append(f"\n### {workload}: ÷ {dense}, measured ms per token (analytic FLOPs per token)\n")
        lines.append("| context | " + " | ".join(sparse) + " |")
        lines.append("|---" * (len(sparse) + 1) + "|")
        for context in ms.index:
            cells = [f"{ms.loc[context, v] / ms.loc[context, dense]:.2f} ({flops.loc[context, v] / flops.loc[context, dense]:.2f})"
                     if pd.notna(ms.loc[context, v]) and pd.notna(ms.loc[context, dense]) else "–" for v in sparse]
            lines.append(f"| {int(context)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kv_table(table: pd.DataFrame, dense: str = "mla") -> str:
    """Decode: one sequence's KV cache at each context, as the live caches hold it, whether that
    equals the analytic count exactly, and ÷ mla's."""
    rows = table[table["workload"] == "decode"].dropna(subset=["kv_cache_bytes_at_context_measured"])
    if rows.empty:
        return ""
    measured = rows.pivot_table(index="context", columns="variant", values="kv_cache_bytes_at_context_measured")
    analytic = rows.pivot_table(index="context", columns="variant", values="kv_cache_bytes_at_context")
    lines = [f"\n### decode: KV cache of one sequence, KiB (÷ {dense}); = : equal to the analytic count\n",
             "| context | " + " | ".join(measured.columns) + " |", "|---" * (len(measured.columns) + 1) + "|"]
    for context in measured.index:
        cells = []
        for v in measured.columns:
            got, want = measured.loc[context, v], analytic.loc[context, v]
            if pd.isna(got):
                cells.append("–")
                continue
            ratio = f" (×{got / measured.loc[context, dense]:.3g})" if dense in measured and v != dense else ""
            cells.append(f"{got / 1024:.4g}{ratio} {'=' if got == want else '≠ ' + str(int(want))}")
        lines.append(f"| {int(context)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted(table["workload"].unique())
    kv = table["kv_cache_bytes_at_context_measured"].notna().any()
    fig, axes = plt.subplots(3 if kv else 2, len(workloads), figsize=(6 * len(workloads), 12 if kv else 8), squeeze=False,
                             layout="constrained")
    for j, workload in enumerate(workloads):
        rows = table[table["workload"] == workload]
        for variant, g in rows.groupby("variant"):
            g = g.sort_values("context")
            axes[0][j].plot(g["context"], g["ms_per_token"], marker="o", label=variant)
            axes[1][j].plot(g["context"], g["flops_per_token"], marker="o", label=variant)
            if kv:
                axes[2][j].plot(g["context"], g["kv_cache_bytes_at_context"] / 2**20, marker="o", label=variant)
        axes[0][j].set(title=f"{workload}: measured", xscale="log", yscale="log", ylabel="ms per token")
        axes[1][j].set(title=f"{workload}: analytic", xscale="log", yscale="log", ylabel="FLOP per token", xlabel="context (tokens)")
        if kv:
            axes[2][j].set(title=f"{workload}: KV cache of one sequence", xscale="log", yscale="log", ylabel="MiB",
                           xlabel="context (tokens)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args(argv)
    res = load_results(args.results)
    table = per_token(res.cells)
    print(markdown(table))
    print(ratios(table))
    print(kv_table(table))
    spec = res.run.get("spec") or {}
    size = spec.get("size", "debug")
    attention = spec.get("attention") or {}
    print("\n### where each beats mla\n")
    for workload in sorted(table["workload"].unique()):
        rows = table[table["workload"] == workload]
        for sparse in sorted(compared(rows["variant"].unique())):
            predicted = (predicted_crossover(size, attention, workload == "decode") if str(sparse).startswith("dsa")
                         else f"{crossover(rows, 'flops_per_token', sparse)} (analytic FLOPs at the measured contexts)")
            print(f"- {workload}, {sparse}: measured {crossover(rows, 'ms_per_token', sparse)}; predicted {predicted}")
    if args.figure:
        figure(table, args.figure)
        print(f"\nfigure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

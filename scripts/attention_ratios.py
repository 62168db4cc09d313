"""MHA vs MLA (plus GQA, MQA) from a results folder of the attention presets.

    python scripts/attention_ratios.py RESULTS_DIR

Prints, per decode context length, the ratios issue 4 asks for:
- KV bytes/token MLA ÷ MHA, measured from the live caches, and the same from the formula
  (d_c + d_h^R) / (2·n_h·d_h) (DeepSeek-V2 Table 1); they must agree;
- decode tokens/s MLA-absorbed ÷ MHA and MLA-absorbed ÷ MLA-naive (same batch and context);
- max batch and max-batch generation tokens/s MLA ÷ MHA under the same memory budget (the
  quantity of V2's "5.76× maximum generation throughput");
- prefill tokens/s MLA ÷ MHA where a prefill length equals the context length.
Then one detail line per attention variant and context. Only `ok` cells are used; a missing
cell leaves its ratio empty.
"""

from __future__ import annotations

import sys

import pandas as pd

from dsbench.results import load_results


def _by(frame: pd.DataFrame, key: str, value: str) -> pd.Series:
    """value per attention variant, for the rows of one key (context or sequence length)."""
    return frame.drop_duplicates(["attention", key]).set_index("attention")[value]


def _ratio(values: pd.Series, top: str, bottom: str) -> float | None:
    if top not in values or bottom not in values or not values[bottom]:
        return None
    return float(values[top] / values[bottom])


def _split(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ok = cells[cells["status"] == "ok"]
    budget = ok["memory_budget_bytes"] if "memory_budget_bytes" in ok else pd.Series(float("nan"), index=ok.index)
    decode = ok[(ok["workload"] == "decode") & budget.isna()]
    fit = ok[(ok["workload"] == "decode") & budget.notna()]
    return decode, fit, ok[ok["workload"] == "prefill"]


def ratio_table(cells: pd.DataFrame) -> pd.DataFrame:
    decode, fit, prefill = _split(cells)
    rows = []
    for L in sorted(decode["context_len"].dropna().unique()):
        d, f, p = decode[decode["context_len"] == L], fit[fit["context_len"] == L], prefill[prefill["seq_len"] == L]
        kv, kv_live = _by(d, "context_len", "kv_cache_bytes_per_token"), _by(d, "context_len", "kv_cache_bytes_per_token_measured")
        tps = _by(d, "context_len", "tokens_per_s_median")
        rows.append({
            "context_len": int(L),
            "kv_bytes mla/mha": _ratio(kv_live, "mla", "mha"),
            "kv_bytes formula": _formula_ratio(d),
            "kv_bytes mla-naive/mla": _ratio(kv_live, "mla-naive", "mla"),
            "decode tok/s mla/mha": _ratio(tps, "mla", "mha"),
            "decode tok/s mla/mla-naive": _ratio(tps, "mla", "mla-naive"),
            "max batch mla/mha": _ratio(_by(f, "context_len", "batch_size"), "mla", "mha") if len(f) else None,
            "max-batch tok/s mla/mha": _ratio(_by(f, "context_len", "tokens_per_s_median"), "mla", "mha") if len(f) else None,
            "prefill tok/s mla/mha": _ratio(_by(p, "seq_len", "tokens_per_s_median"), "mla", "mha") if len(p) else None,
            "live == analytic": bool((kv == kv_live.reindex(kv.index)).all()),
        })
    return pd.DataFrame(rows)


def _formula_ratio(decode: pd.DataFrame) -> float | None:
    """(d_c + d_h^R) / (2·n_kv·d_h) from the rows' resolved config columns."""
    mla, mha = decode[decode["attention"] == "mla"], decode[decode["attention"] == "mha"]
    if mla.empty or mha.empty or "kv_lora_rank" not in decode:
        return None
    a, b = mla.iloc[0], mha.iloc[0]
    return float((a["kv_lora_rank"] + a["qk_rope_head_dim"]) / (2 * b["n_kv_heads"] * b["head_dim"]))


def detail_table(cells: pd.DataFrame) -> pd.DataFrame:
    decode, fit, prefill = _split(cells)
    rows = []
    for (L, kind), d in decode.groupby(["context_len", "attention"]):
        f = fit[(fit["context_len"] == L) & (fit["attention"] == kind)]
        p = prefill[(prefill["seq_len"] == L) & (prefill["attention"] == kind)]
        r = d.iloc[0]
        rows.append({
            "context_len": int(L), "attention": kind, "kv B/token": int(r["kv_cache_bytes_per_token_measured"]),
            "decode tok/s": r["tokens_per_s_median"], "ms/token": r["step_time_ms_median"],
            "p10–p90 ms": f"{r['step_time_ms_p10']:.2f}–{r['step_time_ms_p90']:.2f}" if "step_time_ms_p10" in r else None,
            "peak MiB": r["peak_mem_bytes"] / 2**20 if "peak_mem_bytes" in r else None,
            "prefill tok/s": p["tokens_per_s_median"].iloc[0] if len(p) else None,
            "max batch": int(f["batch_size"].iloc[0]) if len(f) else None,
            "max-batch tok/s": f["tokens_per_s_median"].iloc[0] if len(f) else None,
        })
    return pd.DataFrame(rows)


def main(path: str) -> None:
    cells = load_results(path).cells
    budget = cells["memory_budget_bytes"].dropna().unique() if "memory_budget_bytes" in cells else []
    print(f"{path}: {len(cells)} cells, {int((cells['status'] == 'ok').sum())} ok"
          + (f"; max-batch budget {budget[0] / 2**20:g} MiB (weights + KV cache, analytic)" if len(budget) else ""))
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3g}".format):
        print(ratio_table(cells).to_string(index=False))
        print()
        print(detail_table(cells).to_string(index=False))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/attention_ratios.py RESULTS_DIR")
    main(sys.argv[1])

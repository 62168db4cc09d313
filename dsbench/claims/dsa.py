"""DeepSeek Sparse Attention claims (DeepSeek-V3.2-Exp): the per-token decode cost stays nearly
flat with context where MLA's grows (measured slopes, and the analytic FLOP slopes beside them),
and sparse attention costs little quality (eval loss of dsa against mla at equal steps, with the
share of attention mass the selection keeps)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dsbench.claims.empirical import LOSS_TIE, listing, loss_of, majority, ok_cells
from dsbench.claims.evidence import Evidence, missing, pct
from dsbench.pairing import norm, pairs
from dsbench.results import Results

PRESET = "long-context-cpu"
RUN_LONG = (f"run `dsbench run sweep --preset {PRESET}` (long-context-gpu on a GPU; dsa-crossover-cpu for decode at V3.2's "
            "indexer share) and pass its folder")
# dsa's own settings and accounting differ from mla's by construction: not part of a pair's identity.
DSA_DIFFER = ("index_topk", "index_n_heads", "index_head_dim", "index_stage", "index_dense_steps", "index_warmup_steps",
              "dsa_prefill", "params_total", "params_active", "flops_per_token", "kv_cache_bytes_per_token",
              "kv_cache_bytes_per_token_measured", "attention.dsa_prefill", "attention.index_stage")


def slope_per_1k(contexts: pd.Series, values: pd.Series) -> float:
    """Least-squares slope of values against context, per 1,000 tokens of context."""
    return float(np.polyfit(contexts.astype(float) / 1000, values.astype(float), 1)[0])


def decode_curves(results: Sequence[Results]) -> list[tuple[str, pd.DataFrame, int]]:
    """Per run: (device, ok decode cells of mla and dsa at contexts past dsa's index_topk, that top-k)."""
    out = []
    for i, _ in enumerate(results):
        cells = ok_cells([results[i]])
        cells = cells[(cells["workload"] == "decode") & cells["attention"].isin(["mla", "dsa"])] if not cells.empty else cells
        if cells.empty or "index_topk" not in cells or not (cells["attention"] == "dsa").any():
            continue
        topk = int(cells.loc[cells["attention"] == "dsa", "index_topk"].min())
        past = cells[cells["context_len"] > topk]
        if past.groupby("attention")["context_len"].nunique().reindex(["mla", "dsa"]).fillna(0).min() >= 2:
            out.append((str(past["device"].iloc[0]), past, topk))
    return out


def check_flat_decode(results) -> Evidence:
    curves = decode_curves(results)
    if not curves:
        return missing("no mla and dsa decode cells at two or more contexts past index_topk", RUN_LONG)
    wins, items = [], []
    for device, cells, topk in curves:
        by = {a: g.groupby("context_len")[["step_time_ms_median", "flops_per_token"]].median() for a, g in cells.groupby("attention")}
        time = {a: slope_per_1k(g.index.to_series(), g["step_time_ms_median"]) for a, g in by.items()}
        flops = {a: slope_per_1k(g.index.to_series(), g["flops_per_token"]) for a, g in by.items()}
        wins.append(time["dsa"] < time["mla"])
        level = {a: float(g["step_time_ms_median"].iloc[-1]) for a, g in by.items()}
        items.append(f"{device}, contexts {int(cells['context_len'].min())}–{int(cells['context_len'].max())} (index_topk {topk}): "
                     f"ms/token per 1K context dsa {time['dsa']:+.3f} vs mla {time['mla']:+.3f}; at the longest, dsa {level['dsa']:.2f} ms "
                     f"vs mla {level['mla']:.2f} ms; analytic FLOP/token per 1K context dsa {flops['dsa']:.3g} vs mla {flops['mla']:.3g}")
    detail = ("Least-squares slope of the median decode step against context, past index_topk (where dsa's main attention "
              "reads a fixed top-k and only its indexer grows). A lower slope is the claim's direction; it does not say "
              f"dsa is faster at these contexts: {listing(items)}. One small model; V3.2's figure is for the 671B model on H800s.")
    return majority(wins, detail, f"{sum(wins)}/{len(wins)} runs: dsa's per-token time grows more slowly", "this machine, small scale")


def stage_text(dsa: pd.Series) -> str:
    """How a dsa train cell trained: sparse from the start, or V3.2's stages with their steps."""
    if dsa.get("index_stage") != "staged":
        return str(dsa.get("index_stage"))
    dense, warm = int(dsa["index_dense_steps"]), int(dsa["index_warmup_steps"])
    return f"staged ({dense} MLA + {warm} warm-up + {int(dsa['steps']) - dense - warm} sparse steps)"


def check_sparse_quality(results) -> Evidence:
    cells = ok_cells(results)
    if cells.empty:
        return missing("no train cells of mla and dsa", RUN_LONG)
    train = cells[(cells["workload"] == "train") & cells["attention"].isin(["mla", "dsa"])]
    found = pairs(train, "attention", "mla", "dsa", differ=DSA_DIFFER)
    if not found:
        return missing("no mla/dsa train cell pairs equal in everything else", RUN_LONG)
    wins, items = [], []
    for mla, dsa in found:
        l_mla, l_dsa, kind = loss_of(mla, dsa)
        wins.append(l_dsa <= l_mla * (1 + LOSS_TIE))
        kept = norm(dsa.get("indexer_kept_mass"))
        kept_text = f", the selection keeps {pct(kept, False)} of the attention mass" if kept is not None else ""
        items.append(f"{stage_text(dsa)}, index_topk {int(dsa['index_topk'])} of {int(dsa['seq_len'])}-token rows, {int(dsa['steps'])} steps: "
                     f"{kind} dsa {l_dsa:.4f} vs mla {l_mla:.4f} ({l_dsa / l_mla - 1:+.2%}){kept_text}")
    detail = (f"'on par' read as dsa's loss at most {LOSS_TIE:.1%} above mla's at equal steps and data: {listing(items)}. "
              "V3.2-Exp reaches this from a trained dense checkpoint, a dense warm-up and a long sparse stage (a 'staged' "
              "cell runs that recipe at small scale; a 'sparse' one trains sparse from the start).")
    return majority(wins, detail, f"{sum(wins)}/{len(wins)} pairs within {LOSS_TIE:.1%}", "small scale, one seed")

"""Empirical claims: read the ok cells of the results given, paired by dsbench.pairing's rule
(equal in everything but the axis under test, within one run; the shared-expert ablation alone
pairs across runs). Direction-only verdicts go by the majority of pairs; every pair's numbers are
in the detail."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from dsbench.claims.evidence import DIRECTION, NOT_REPRODUCED, REPRODUCED, Evidence, missing
from dsbench.compare import relative_loss_error
from dsbench.pairing import norm, pairs
from dsbench.results import Results
from dsbench.stats import TIMING_NOISE, ratio_interval

LOSS_TIE = 0.005  # "no worse loss": at most 0.5% above the other, one seed at small scale
FP8_LOSS_LIMIT = 0.0025  # V3 §3.3: relative loss error below 0.25%
RUN_NOSHARED = ("run `dsbench run sweep --preset paper-cpu` (paper-gpu on a GPU): its second [[sweep]] block is "
                "the n_shared = 0 ablation; or pass a folder of n_shared = 0 cells beside the main one")


# --- empirical: the cells ---


def ok_cells(results: Sequence[Results]) -> pd.DataFrame:
    """Every ok cell of every run, with `n_shared` resolved (the row's column, else the run's
    spec, else DeepSeekMoEConfig's default) for deepseekmoe cells, and the run it came from."""
    from dsbench.variants.moe import DeepSeekMoEConfig

    frames = []
    for i, res in enumerate(results):
        cells = res.cells[res.cells["status"] == "ok"].copy()
        spec_shared = ((res.run.get("spec") or {}).get("ffn") or {}).get("n_shared", DeepSeekMoEConfig().n_shared)
        column = cells["n_shared"] if "n_shared" in cells else pd.Series(float("nan"), index=cells.index)
        cells["n_shared"] = column.where(column.notna(), spec_shared).where(cells["ffn"] == "deepseekmoe")
        cells["run"] = i
        frames.append(cells)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def where(row: pd.Series, skip: str) -> str:
    """The pair's other axes, for the detail: 'mha/bf16/aux'."""
    parts = [str(row[a]) for a in ("ffn", "attention", "precision", "balance") if a != skip and a in row and row[a] != "n/a"]
    if norm(row.get("context_len")) is not None:
        parts.append(f"ctx{int(row['context_len'])}")
    return "/".join(parts)


def loss_of(a: pd.Series, b: pd.Series) -> tuple[float, float, str]:
    """Held-out eval loss where both rows have it, else the final training loss."""
    if norm(a.get("eval_loss")) is not None and norm(b.get("eval_loss")) is not None:
        return float(a["eval_loss"]), float(b["eval_loss"]), "eval loss"
    return float(a["final_loss"]), float(b["final_loss"]), "final train loss"


def majority(wins: list[bool], detail: str, measured: str, scale: str = "small scale, one seed") -> Evidence:
    n = sum(wins)
    verdict = DIRECTION if n > len(wins) / 2 else NOT_REPRODUCED
    return Evidence(measured, verdict, f"{n} of {len(wins)} pairs agree ({scale}). {detail}")


def listing(items: list[str], limit: int = 6) -> str:
    return "; ".join(items[:limit]) + (f"; … {len(items) - limit} more" if len(items) > limit else "")


def lower_loss(found: list[tuple[pd.Series, pd.Series]], column: str, names: tuple[str, str]) -> Evidence:
    """Direction: the first of each pair has the lower loss in most pairs."""
    wins, items, params = [], [], []
    for x, y in found:
        lx, ly, kind = loss_of(x, y)
        wins.append(lx < ly)
        items.append(f"{where(x, column)}: {lx:.4f} vs {ly:.4f} ({lx / ly - 1:+.2%})")
        if norm(x.get("params_active")) and norm(y.get("params_active")):
            params.append(abs(x["params_active"] / y["params_active"] - 1))
    matched = f" Activated parameters differ by at most {max(params):.2%}." if params else ""
    detail = f"{kind}, {names[0]} vs {names[1]}: {listing(items)}.{matched}"
    return majority(wins, detail, f"{sum(wins)}/{len(wins)} pairs lower")


def train_of(results) -> pd.DataFrame:
    cells = ok_cells(results)
    return cells[cells["workload"] == "train"] if not cells.empty else cells


# --- empirical: MoE ---


def check_deepseekmoe_vs_moe(results) -> Evidence:
    cells = train_of(results)
    cells = cells[cells["n_shared"].fillna(1) > 0] if not cells.empty else cells  # DeepSeekMoE isolates shared experts
    found = pairs(cells, "ffn", "deepseekmoe", "moe")
    if not found:
        return missing("no moe/deepseekmoe train cell pairs")
    return lower_loss(found, "ffn", ("deepseekmoe", "moe"))


def check_shared_expert(results) -> Evidence:
    cells = train_of(results)
    cells = cells[cells["ffn"] == "deepseekmoe"].copy() if not cells.empty else cells
    if cells.empty:
        return missing("no deepseekmoe train cells")
    cells["shared"] = cells["n_shared"].map(lambda n: "none" if n == 0 else "isolated")
    if not (cells["shared"] == "none").any():
        return missing("no deepseekmoe train cell with n_shared = 0", noshared_hint(results))
    # The n_shared = 0 cells come from a second sweep (one [ffn] table per sweep), so pairs cross
    # runs; the routed layout follows from n_shared (one more routed expert keeps activated params).
    found = pairs(cells, "shared", "isolated", "none", differ=("n_shared", "n_routed_experts", "routed_top_k", "run"))
    if not found:
        return missing("no n_shared ≥ 1 vs n_shared = 0 cells with otherwise equal settings", noshared_hint(results))
    return lower_loss(found, "shared", ("shared expert", "none"))


def noshared_hint(results) -> str:
    """What to pass for the n_shared = 0 cells. Telling a user who passed a paper-cpu run to run
    paper-cpu says nothing: say what that run lacks, and why."""
    for res in results:
        source = str(res.run.get("spec_source") or "")
        if source not in ("preset:paper-cpu", "preset:paper-gpu"):
            continue
        preset, when = source.split(":")[1], str(res.run.get("created_at") or "")[:10]
        blocks = (res.run.get("spec") or {}).get("sweep") or []
        ablated = any(((b.get("ffn") or {}).get("n_shared")) == 0 for b in blocks if isinstance(b, dict))
        why = ("its n_shared = 0 cells did not finish ok" if ablated else
               f"recorded before {preset} held the shared-expert ablation (its second [[sweep]] block, n_shared = 0)")
        committed = " (the committed run's: results/paper-cpu-noshared)" if preset == "paper-cpu" else ""
        return (f"they are {preset}'s of {when}, {why}: pass a folder of n_shared = 0 cells beside them{committed}, "
                f"or rerun `dsbench run sweep --preset {preset}`")
    return RUN_NOSHARED


def maxvio_column(cells: pd.DataFrame) -> str | None:
    for column in ("maxvio_global", "maxvio_batch_mean"):
        if column in cells and cells[column].notna().any():
            return column
    return None


def check_aux_free(results) -> Evidence:
    cells = train_of(results)
    column = maxvio_column(cells) if not cells.empty else None
    found = pairs(cells, "balance", "bias", "aux") if column else []
    if not found:
        return missing("no routed train cell pairs with balance = bias and aux (and MaxVio)")
    wins, items = [], []
    for x, y in found:
        lx, ly, kind = loss_of(x, y)
        vx, vy = float(x[column]), float(y[column])
        wins.append(vx < vy and lx <= ly * (1 + LOSS_TIE))
        items.append(f"{where(x, 'balance')}: MaxVio {vx:.3f} vs {vy:.3f}, {kind} {lx:.4f} vs {ly:.4f} ({lx / ly - 1:+.2%})")
    detail = f"bias vs aux ({column}; 'no worse' = at most {LOSS_TIE:.1%} higher loss): {listing(items)}."
    return majority(wins, detail, f"{sum(wins)}/{len(wins)} pairs lower MaxVio, loss no worse")


# --- empirical: MLA ---


def kv_formula_ratio(mla: pd.Series, mha: pd.Series) -> float | None:
    """V2 Table 1 per layer: (d_c + d_h^R) ÷ 2·n_kv·d_h, from the rows' own dims."""
    need = [mla.get("kv_lora_rank"), mla.get("qk_rope_head_dim"), mha.get("head_dim")]
    if any(norm(v) is None for v in need):
        return None
    kv_heads = norm(mha.get("n_kv_heads")) or mha["n_heads"]
    return (mla["kv_lora_rank"] + mla["qk_rope_head_dim"]) / (2 * kv_heads * mha["head_dim"])


def inference_pairs(results, workloads=("decode", "prefill")) -> list[tuple[pd.Series, pd.Series]]:
    cells = ok_cells(results)
    if cells.empty:
        return []
    return pairs(cells[cells["workload"].isin(workloads)], "attention", "mla", "mha")


def check_mla_kv(results) -> Evidence:
    found = inference_pairs(results)
    if not found:
        return missing("no mla/mha decode or prefill cell pairs")
    column = "kv_cache_bytes_per_token_measured"
    live = all(norm(x.get(column)) is not None and norm(y.get(column)) is not None for x, y in found)
    column = column if live else "kv_cache_bytes_per_token"
    items, ok = [], True
    for x, y in found:
        ratio, formula = x[column] / y[column], kv_formula_ratio(x, y)
        ok &= ratio < 1 and (formula is None or abs(ratio / formula - 1) <= 0.01)
        items.append(f"{where(x, 'attention')}: {int(x[column]):,} vs {int(y[column]):,} B/token = {ratio:.4f}"
                     + (f" (formula {formula:.4f})" if formula is not None else ""))
    source = "measured from the live caches" if live else "analytic (these rows have no live-cache measurement)"
    ratios = sorted({round(float(x[column] / y[column]), 4) for x, y in found})
    return Evidence(f"MLA ÷ MHA = {', '.join(map(str, ratios))}", REPRODUCED if ok else NOT_REPRODUCED,
                    f"KV bytes per token, {source}: {listing(items)}.")


def clean_speed_pairs(found: list[tuple[pd.Series, pd.Series]]) -> list[tuple[pd.Series, pd.Series]]:
    """The pairs whose speed a verdict may use: the report's cards' rule (no emulated, numerics-only
    or implementation-bound side, none contended), so a claim and a card never read different rows."""
    from dsbench.report.ablation import contended, speed_caveat

    return [(x, y) for x, y in found if not (speed_caveat(x, y) or contended(x, y))]


def check_mla_decode(results) -> Evidence:
    everything = inference_pairs(results, ("decode",))
    found = clean_speed_pairs(everything)
    if not found:
        left = f" ({len(everything)} pairs, each with an emulated, numerics-only, implementation-bound or contended side)" if everything else ""
        return missing(f"no mla/mha decode cell pairs whose speed means something{left}")
    ratios, items = [], []
    for x, y in found:
        ratios.append(float(x["tokens_per_s_median"] / y["tokens_per_s_median"]))
        items.append(f"{where(x, 'attention')} b{int(x['batch_size'])}: ×{ratios[-1]:.2f}")
    iv = ratio_interval(ratios)
    side = iv.excludes_one(TIMING_NOISE)
    verdict = DIRECTION if side > 0 else NOT_REPRODUCED
    said = {1: "faster", -1: "slower", 0: f"no clear difference (the 90% interval does not clear ×1 by ±{TIMING_NOISE:.0%})"}[side]
    detail = (f"decode tokens/s MLA ÷ MHA {iv.describe()} over {len(ratios)} pairs, this machine, small scale: {said}. "
              f"Pairs (emulated, numerics-only, implementation-bound and contended ones left out): {listing(items, 8)}.")
    return Evidence(f"{iv.describe()} ({len(ratios)} pairs)", verdict, detail)


# --- empirical: FP8 ---


def fp8_gaps(results, recipe: str) -> tuple[pd.DataFrame, str]:
    """Final relative loss errors of `recipe` against bf16 (dsbench.compare), one row per pair, and
    which cells they come from. Dense and routed pairs alike: under an fp8 precision every linear
    layer and the routed experts' grouped GEMMs run in FP8 (the router's gate stays FP32)."""
    from dsbench.compare import relative_loss_error

    finals = [relative_loss_error(r, a="bf16", b=recipe).final for r in results]
    finals = [f for f in finals if not f.empty]
    if not finals:
        return pd.DataFrame(), ""
    gap = pd.concat(finals, ignore_index=True)
    kinds = " and ".join(dict.fromkeys("dense" if f == "dense" else "routed" for f in gap["ffn"]))
    return gap, f"{kinds} cells (linear layers and routed experts in FP8)"


def check_fp8_gap(results) -> Evidence:
    gap, which = fp8_gaps(results, "fp8")
    if gap.empty:
        return missing("no bf16/fp8 train cell pairs")
    worst = float(gap["final_rel_error"].abs().max())
    items = [f"{r.label}: {r.final_rel_error:+.3%} (max over steps {r.max_abs_rel_error:.3%})" for r in gap.itertuples()]
    verdict = DIRECTION if worst < FP8_LOSS_LIMIT else NOT_REPRODUCED
    return Evidence(f"|error| ≤ {worst:.3%}", verdict,
                    f"final relative loss error (fp8 − bf16) / bf16, same seed and batches, {which}, small scale: "
                    f"{listing(items)}.")


def check_fp8_tensorwise(results) -> Evidence:
    (block, which), (tensor, _) = fp8_gaps(results, "fp8"), fp8_gaps(results, "fp8-tensorwise")
    if block.empty or tensor.empty:
        return missing("no bf16/fp8/fp8-tensorwise train cell triples")
    both = block.merge(tensor, on="label", suffixes=("_block", "_tensor"))
    if both.empty:
        return missing("no fp8 and fp8-tensorwise cells trained with the same settings")
    wins = [abs(t) > abs(b) for b, t in zip(both["final_rel_error_block"], both["final_rel_error_tensor"])]
    items = [f"{r.label}: block-wise {r.final_rel_error_block:+.3%}, tensorwise {r.final_rel_error_tensor:+.3%}"
             for r in both.itertuples()]
    return majority(wins, f"final relative loss error vs bf16, {which}: {listing(items)}.{sqnr_note(results)}",
                    f"{sum(wins)}/{len(wins)} pairs worse")


def sqnr_note(results) -> str:
    cells = ok_cells(results)
    if cells.empty or "sqnr_act_db" not in cells:
        return ""
    means = cells.groupby("precision")["sqnr_act_db"].mean()
    if not {"fp8", "fp8-tensorwise"} <= set(means.dropna().index):
        return ""
    return f" Activation SQNR: block-wise {means['fp8']:.1f} dB, tensorwise {means['fp8-tensorwise']:.1f} dB."

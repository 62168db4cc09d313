"""The papers' efficiency claims, each checked: analytic ones from the official model configs
(dsbench/official.py), empirical ones from results that dsbench measured.

    rows = evaluate()                                    # analytic claims only
    rows = evaluate([load_results("results/paper-cpu")])  # and the empirical ones it has evidence for
    print(markdown(rows))

A Claim holds its source (paper, section or table), the statement in our words, its method
(analytic | empirical), the value the paper gives, and a check that returns Evidence: what we
measured, a verdict and the numbers behind it. Verdicts:
- reproduced: the number (or the exact structural property) agrees. For parameter counts:
  within 1%, or equal to the published figure at the precision it is printed with (a printed
  "2.8B" is any count in [2.75B, 2.85B)); the detail gives the signed difference either way;
- not reproduced: the evidence contradicts it;
- direction only: the sign agrees but the size cannot be tested here — small-scale runs, or
  a FLOP bound on a claim measured in GPU hours;
- not checkable here: the evidence is missing (and the detail says which preset gives it) or
  cannot exist on this hardware (and the detail says why). Never a verdict without evidence.

Empirical claims compare pairs of ok cells by dsbench.pairing's rule (equal in everything but the
axis under test, within one run); the shared-expert ablation alone pairs across the results
folders given, paper-cpu's deepseekmoe cells with paper-cpu-noshared's.
Direction-only verdicts go by the majority of pairs; every pair's numbers are in the detail.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from dsbench import official
from dsbench.check import md_escape
from dsbench.compare import relative_loss_error
from dsbench.pairing import norm, pairs
from dsbench.results import Results

REPRODUCED, NOT_REPRODUCED, DIRECTION, NOT_CHECKABLE = "reproduced", "not reproduced", "direction only", "not checkable here"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, DIRECTION, NOT_CHECKABLE)
PARAM_TOLERANCE = 0.01  # relative, for parameter counts (or the published figure's own precision)
LOSS_TIE = 0.005  # "no worse loss": at most 0.5% above the other, one seed at small scale
FP8_LOSS_LIMIT = 0.0025  # V3 §3.3: relative loss error below 0.25%
RUN_PAPER = "run `dsbench run sweep --preset paper-cpu` first (paper-gpu on a GPU)"
RUN_PRESET = "run `dsbench run sweep --preset paper-cpu` (paper-gpu on a GPU) and pass its folder"
RUN_NOSHARED = ("run `dsbench run sweep --preset paper-cpu-noshared` and pass its folder with paper-cpu's "
                "(paper-gpu-noshared with paper-gpu on a GPU)")
SEQ_LEN = 4096  # DeepSeekMoE's "FLOPs per 4K tokens"; V2 and V3 pre-train at 4K too


@dataclass(frozen=True)
class Evidence:
    measured: str
    verdict: str
    detail: str


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    where: str
    statement: str
    method: str  # analytic | empirical
    expected: str
    check: Callable[[list[Results]], Evidence]


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    evidence: Evidence

    def to_json(self) -> dict:
        c = {k: v for k, v in dataclasses.asdict(self.claim).items() if k != "check"}
        return {**c, **dataclasses.asdict(self.evidence)}


def missing(what: str, hint: str = RUN_PRESET) -> Evidence:
    return Evidence("–", NOT_CHECKABLE, f"{what} in these results; {hint}")


class NotCheckable:
    """A check that no results can answer here; `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, _results) -> Evidence:
        return Evidence("–", NOT_CHECKABLE, self.reason)


# --- formatting ---


def billions(n: float) -> str:
    return f"{n / 1e9:,.2f}B"


def pct(x: float, signed: bool = True) -> str:
    return f"{100 * x:+.2f}%" if signed else f"{100 * x:.1f}%"


# --- analytic: parameter counts ---


def published_value(published: str) -> tuple[float, float]:
    """A figure printed like '2.8B' → (2.8e9, the half-unit of its last digit, 0.05e9)."""
    digits = published.rstrip("B")
    return float(digits) * 1e9, 0.5 * 10 ** -len(digits.partition(".")[2]) * 1e9


def published_match(measured: float, published: str) -> tuple[bool, str]:
    """(reproduced, which criterion held) for a count against a published figure."""
    value, half_unit = published_value(published)
    if abs(measured / value - 1) <= PARAM_TOLERANCE:
        return True, f"within {PARAM_TOLERANCE:.0%}"
    if abs(measured - value) <= half_unit:
        return True, f"outside {PARAM_TOLERANCE:.0%} but rounds to the published {published}"
    return False, f"outside {PARAM_TOLERANCE:.0%} and does not round to {published}"


def count_check(model: str, which: str, published: str, note: str = "") -> Callable[[list], Evidence]:
    def check(_results) -> Evidence:
        counts = official.param_counts(official.load_official(model))
        measured, (value, _) = getattr(counts, which), published_value(published)
        ok, why = published_match(measured, published)
        other = {"activated": ("activated_with_embedding", "with the input embedding table"),
                 "activated_with_embedding": ("activated", "without the input embedding table")}.get(which)
        detail = f"{billions(measured)} ({measured:,}): {pct(measured / value - 1)} from {published}; {why}."
        if other:
            alt = getattr(counts, other[0])
            detail += f" Counted {other[1]}: {billions(alt)} ({pct(alt / value - 1)})."
        return Evidence(billions(measured), REPRODUCED if ok else NOT_REPRODUCED, detail + (f" {note}" if note else ""))

    return check


def check_v3_checkpoint(_results) -> Evidence:
    a = official.load_official("deepseek-v3")
    c, scales = official.param_counts(a), official.fp8_scale_count(a)
    stored = c.total + c.mtp_stored + scales
    ok = round(stored / 1e9) == 685
    return Evidence(billions(stored), REPRODUCED if ok else NOT_REPRODUCED,
                    f"main model {billions(c.total)} + MTP module {billions(c.mtp_stored)} (its own block, norms and "
                    f"2d→d projection {billions(c.mtp)}, plus the copies of the shared embedding and head its checkpoint "
                    f"stores) + {scales:,} FP32 128×128 block scales of the FP8 weights = {stored:,}, which rounds to 685B "
                    f"(Hugging Face counts every stored tensor). The MTP module is {billions(c.mtp_stored)}: the README's "
                    "'14B' is 685 − 671.")


def check_v3_fraction(_results) -> Evidence:
    c = official.param_counts(official.load_official("deepseek-v3"))
    frac = c.activated / c.total
    return Evidence(pct(frac, signed=False), NOT_REPRODUCED if abs(frac - 0.18) > 0.01 else REPRODUCED,
                    f"{billions(c.activated)} of {billions(c.total)} = {100 * frac:.2f}% activated per token "
                    f"({100 * c.activated_with_embedding / c.total:.2f}% counting the embedding table). "
                    f"671/37 = {671 / 37:.1f}: the '18' is the ratio total ÷ activated, not a percentage.")


# --- analytic: KV cache ---


def check_kv_table1(_results) -> Evidence:
    a = official.load_official("deepseek-v2")
    d_h, l = a.qk_nope_head_dim, a.num_hidden_layers
    t = official.table1_kv_elements(a.num_attention_heads, d_h, l, n_g=8, d_c=a.kv_lora_rank, d_rope=a.qk_rope_head_dim)
    per_dh = (a.kv_lora_rank + a.qk_rope_head_dim) / d_h
    ok = per_dh == 4.5 and t["MLA"] == official.kv_cache_elements_per_token(a)
    return Evidence(f"(d_c + d_h^R)·l = {per_dh:g}·d_h·l", REPRODUCED if ok else NOT_REPRODUCED,
                    f"V2 dims n_h = {a.num_attention_heads}, d_h = {d_h}, l = {l}, d_c = {a.kv_lora_rank}, d_h^R = "
                    f"{a.qk_rope_head_dim}. Elements per token: MHA {t['MHA']:,}, GQA (8 groups) {t['GQA']:,}, MQA "
                    f"{t['MQA']:,}, MLA {t['MLA']:,} = {t['MLA'] / t['MHA']:.2%} of MHA (1/{t['MHA'] / t['MLA']:.1f}), "
                    f"as much as GQA with {per_dh / 2:g} groups.")


def check_kv_vs_67b(_results) -> Evidence:
    v2, dense = official.load_official("deepseek-v2"), official.load_official("deepseek-llm-67b")
    mla, gqa = official.kv_cache_elements_per_token(v2), official.kv_cache_elements_per_token(dense)
    alone = 1 - mla / gqa  # both in BF16
    both = 1 - mla * 6 / (gqa * 16)  # V2's cache at ~6 bits an element, 67B's at 16
    ok = round(100 * both, 1) == 93.3
    return Evidence(f"{pct(both, signed=False)} (MLA alone {pct(alone, signed=False)})", REPRODUCED if ok else NOT_REPRODUCED,
                    f"DeepSeek 67B (GQA, {dense.kv_heads} KV heads × {dense.head_dim}, {dense.num_hidden_layers} layers) "
                    f"caches {gqa:,} elements a token, {2 * gqa:,} bytes in BF16; V2's MLA {mla:,}, {2 * mla:,} bytes: "
                    f"MLA alone cuts {pct(alone, signed=False)}. V2's deployment quantises its KV cache to ~6 bits an "
                    f"element on average (§3.2.3): {mla * 6 // 8:,} bytes, {pct(both, signed=False)} less than the "
                    "67B in BF16 — the 93.3% needs both.")


# --- analytic: compute ---


def check_moe16b_flops(_results) -> Evidence:
    moe, llama = official.load_official("deepseek-moe-16b"), official.load_official("llama-2-7b")
    ratio = official.train_flops_per_token(moe, SEQ_LEN) / official.train_flops_per_token(llama, SEQ_LEN)
    full = [official.train_flops_per_token(a, SEQ_LEN, causal=False) * SEQ_LEN for a in (moe, llama)]
    ok = abs(ratio - 74.4 / 187.9) <= 0.02
    return Evidence(f"{pct(ratio, signed=False)}", REPRODUCED if ok else NOT_REPRODUCED,
                    f"Train FLOPs per token at 4K context, dsbench's convention (6 × activated matmul params + causal "
                    f"attention): {ratio:.3f} of LLaMA2 7B's (the paper's 74.4/187.9 = {74.4 / 187.9:.3f}). Per 4K tokens "
                    f"with every token attending all 4K keys, as the paper's totals seem to count: {full[0] / 1e12:.1f}T "
                    f"({full[0] / 74.4e12 - 1:+.1%}) vs {full[1] / 1e12:.1f}T ({full[1] / 187.9e12 - 1:+.1%}).")


def check_v2_training_cost(_results) -> Evidence:
    v2, dense = official.load_official("deepseek-v2"), official.load_official("deepseek-llm-67b")
    ratio = official.train_flops_per_token(v2, SEQ_LEN) / official.train_flops_per_token(dense, SEQ_LEN)
    full = official.train_flops_per_token(v2, SEQ_LEN, False) / official.train_flops_per_token(dense, SEQ_LEN, False)
    hours = 172.8 / 300.6
    verdict = DIRECTION if 1 - ratio >= 1 - hours else NOT_REPRODUCED
    return Evidence(f"{pct(1 - ratio, signed=False)} fewer FLOPs/token", verdict,
                    f"Train FLOPs per token at 4K, V2 ÷ 67B = {ratio:.3f} ({full:.3f} without causal halving): a "
                    f"{pct(1 - ratio, signed=False)}–{pct(1 - full, signed=False)} FLOP saving. The paper's 42.5% is H800 "
                    f"GPU hours per trillion tokens (172.8K vs 300.6K = {hours:.3f}), so V2 ran at ~{ratio / hours:.2f}–"
                    f"{full / hours:.2f}× the 67B's FLOP utilisation. The ratio leaves out what GPU hours include: MoE "
                    "all-to-all communication and its overlap, expert load imbalance, smaller expert GEMMs, and each "
                    "model's kernels and parallelism.")


# --- empirical: the cells ---


def ok_cells(results: Sequence[Results]) -> pd.DataFrame:
    """Every ok cell of every run, with `n_shared` resolved (the row's column, else the run's
    spec, else FFNConfig's default) for deepseekmoe cells, and the run it came from."""
    from dsbench.variants.config import FFNConfig

    frames = []
    for i, res in enumerate(results):
        cells = res.cells[res.cells["status"] == "ok"].copy()
        spec_shared = ((res.run.get("spec") or {}).get("ffn") or {}).get("n_shared", FFNConfig().n_shared)
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
        return missing("no deepseekmoe train cell with n_shared = 0", RUN_NOSHARED)
    # The n_shared = 0 cells come from a second sweep (one [ffn] table per sweep), so pairs cross
    # runs; the routed layout follows from n_shared (one more routed expert keeps activated params).
    found = pairs(cells, "shared", "isolated", "none", differ=("n_shared", "n_routed_experts", "routed_top_k", "run"))
    if not found:
        return missing("no n_shared ≥ 1 vs n_shared = 0 cells with otherwise equal settings", RUN_NOSHARED)
    return lower_loss(found, "shared", ("shared expert", "none"))


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


def check_mla_decode(results) -> Evidence:
    found = [(x, y) for x, y in inference_pairs(results, ("decode",)) if not (norm(x.get("emulated")) or norm(y.get("emulated")))]
    if not found:
        return missing("no mla/mha decode cell pairs that are not emulated")
    wins, items = [], []
    for x, y in found:
        ratio = x["tokens_per_s_median"] / y["tokens_per_s_median"]
        wins.append(ratio > 1)
        items.append(f"{where(x, 'attention')} b{int(x['batch_size'])}: ×{ratio:.2f}")
    noted = any(norm(x.get("speed_note")) for x, _ in found)
    note = " Some rows carry a speed note (bf16 on a CPU is for numerics: its speed does not predict a GPU)." if noted else ""
    detail = f"decode tokens/s MLA ÷ MHA (emulated rows left out): {listing(items, 8)}.{note}"
    return majority(wins, detail, f"{sum(wins)}/{len(wins)} pairs faster", "this machine, small scale")


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


# --- the registry ---

V3, V2, DSMOE = "DeepSeek-V3 (2412.19437)", "DeepSeek-V2 (2405.04434)", "DeepSeekMoE (2401.06066)"
ACTIVATED = "Convention: activated = what a token multiplies with, the input embedding table not counted (a lookup reads one row)"

CLAIMS: tuple[Claim, ...] = (
    Claim("v3-total-params", V3, "Abstract; §1", "DeepSeek-V3's main model has 671B parameters.", "analytic", "671B",
          count_check("deepseek-v3", "total", "671B", "Convention: every main-model parameter (embedding, head, all experts); MTP module excluded.")),
    Claim("v3-activated-params", V3, "Abstract; §1", "DeepSeek-V3 activates 37B parameters per token.", "analytic", "37B",
          count_check("deepseek-v3", "activated", "37B", ACTIVATED + ".")),
    Claim("v3-checkpoint-685b", V3, "README_WEIGHTS.md; §2.2 (MTP)",
          "The released 685B checkpoint is the 671B main model plus the 14B multi-token-prediction module.", "analytic",
          "685B = 671B + 14B", check_v3_checkpoint),
    Claim("v3-activated-fraction", "secondary summaries of V3", "derived from 37B / 671B",
          "About 18% of DeepSeek-V3's parameters are active for each token.", "analytic", "18%", check_v3_fraction),
    Claim("v2-total-params", V2, "Abstract; §1", "DeepSeek-V2 has 236B parameters.", "analytic", "236B",
          count_check("deepseek-v2", "total", "236B")),
    Claim("v2-activated-params", V2, "Abstract; §1", "DeepSeek-V2 activates 21B parameters per token.", "analytic", "21B",
          count_check("deepseek-v2", "activated", "21B", ACTIVATED + ".")),
    Claim("v2-lite-total-params", V2, "Appendix B", "DeepSeek-V2-Lite has 15.7B parameters.", "analytic", "15.7B",
          count_check("deepseek-v2-lite", "total", "15.7B")),
    Claim("v2-lite-activated-params", V2, "Appendix B", "DeepSeek-V2-Lite activates 2.4B parameters per token.", "analytic",
          "2.4B", count_check("deepseek-v2-lite", "activated", "2.4B", ACTIVATED + "; the gap is reported in "
                              "deepseek-ai/DeepSeek-V2 issue #73.")),
    Claim("moe16b-total-params", DSMOE, "Abstract; §5.2.2, Table 4", "DeepSeekMoE 16B has 16.4B parameters.", "analytic", "16.4B",
          count_check("deepseek-moe-16b", "total", "16.4B")),
    Claim("moe16b-activated-params", DSMOE, "Abstract; §5.2.2, Table 4", "DeepSeekMoE 16B activates 2.8B parameters per token.",
          "analytic", "2.8B", count_check("deepseek-moe-16b", "activated_with_embedding", "2.8B",
                                          "Convention: DeepSeekMoE's 2.8B counts the input embedding table as activated (V2/V3's figures do not).")),
    Claim("v2-kv-table1", V2, "§2.1.4, Table 1",
          "Per token MHA caches 2·n_h·d_h·l elements, GQA 2·n_g·d_h·l, MQA 2·d_h·l and MLA (d_c + d_h^R)·l ≈ 9/2·d_h·l, "
          "as much as GQA with 2.25 groups.", "analytic", "(d_c + d_h^R)·l = 9/2·d_h·l", check_kv_table1),
    Claim("v2-kv-vs-67b", V2, "Abstract; §3.2.3",
          "DeepSeek-V2 needs 93.3% less KV cache than DeepSeek 67B.", "analytic", "93.3%", check_kv_vs_67b),
    Claim("moe16b-flops-vs-llama2", DSMOE, "§5.2.2, Table 4",
          "DeepSeekMoE 16B needs about 40% of LLaMA2 7B's computation: 74.4T vs 187.9T FLOPs per 4K tokens.", "analytic",
          "39.6% (±2 points)", check_moe16b_flops),
    Claim("v2-training-cost", V2, "§3.2.3", "DeepSeek-V2 saves 42.5% of the training cost of DeepSeek 67B.", "analytic",
          "42.5% saving", check_v2_training_cost),
    Claim("deepseekmoe-vs-moe", DSMOE, "§4.2, Table 1",
          "At equal total and activated parameters, DeepSeekMoE (fine-grained + shared experts) reaches a lower loss than "
          "a classic top-2 MoE.", "empirical", "loss(deepseekmoe) < loss(moe)", check_deepseekmoe_vs_moe),
    Claim("shared-expert", DSMOE, "§4.4, Figure 3",
          "Removing the shared expert (same activated parameters, all experts routed) raises the loss.", "empirical",
          "loss(n_shared = 1) < loss(n_shared = 0)", check_shared_expert),
    Claim("aux-free-balance", V3, "§2.1.2; Wang et al. 2408.15664",
          "Auxiliary-loss-free balancing (a routing bias) balances experts better than the auxiliary loss without hurting "
          "the loss.", "empirical", "MaxVio(bias) < MaxVio(aux), loss(bias) ≤ loss(aux) + 0.5%", check_aux_free),
    Claim("mla-kv-bytes", V2, "§2.1, Table 1",
          "MLA's cache holds (d_c + d_h^R) values per token and layer, a fraction of MHA's 2·n_h·d_h.", "empirical",
          "KV bytes MLA ÷ MHA = (d_c + d_h^R) / 2·n_h·d_h", check_mla_kv),
    Claim("mla-decode-throughput", V2, "§3.2.3", "Decoding from MLA's small cache is faster than from MHA's.",
          "empirical", "tokens/s MLA > MHA", check_mla_decode),
    Claim("fp8-loss-gap", V3, "§3.3; Appendix B.1, Figure 10",
          "Fine-grained (block-wise) FP8 training stays within 0.25% relative loss error of BF16.", "empirical",
          "|loss_fp8 / loss_bf16 − 1| < 0.25%", check_fp8_gap),
    Claim("fp8-tensorwise-worse", V3, "§3.3.2",
          "Per-tensor FP8 scaling tracks BF16 worse than fine-grained (1×128, 128×128) scaling.", "empirical",
          "|error(tensorwise)| > |error(block-wise)|", check_fp8_tensorwise),
    Claim("v2-max-throughput", V2, "§3.2.3", "DeepSeek-V2's maximum generation throughput is 5.76× DeepSeek 67B's.",
          "empirical", "5.76×", NotCheckable(
              "measured serving the full V2 (FP8 weights, ~6-bit KV cache) on 8×H800 against the 67B; the attention-gpu "
              "preset measures the small-scale analogue (max-batch decode tokens/s MLA ÷ MHA in one memory budget).")),
    Claim("v3-training-cost", V3, "§1, Table 1", "DeepSeek-V3's full training took 2.788M H800 GPU hours.", "empirical",
          "2.788M GPU hours", NotCheckable("needs 14.8T training tokens on a 2048-GPU H800 cluster.")),
)


def evaluate(results: Sequence[Results] = ()) -> list[ClaimResult]:
    """Every claim's evidence: analytic always; empirical from `results` (or 'run paper-cpu first')."""
    out = []
    for claim in CLAIMS:
        if claim.method == "empirical" and not results and not isinstance(claim.check, NotCheckable):
            evidence = Evidence("–", NOT_CHECKABLE, f"no results given; {RUN_PAPER}")
        else:
            evidence = run_check(claim, list(results))
        out.append(ClaimResult(claim, evidence))
    return out


def run_check(claim: Claim, results: list[Results]) -> Evidence:
    """A results folder from another dsbench version may lack a column a check reads: that is
    missing evidence, not a crash."""
    try:
        return claim.check(results)
    except KeyError as e:
        return Evidence("–", NOT_CHECKABLE, f"these results lack the column {e.args[0]!r} this check reads; "
                                            "rerun the sweep with this dsbench")


def has_evidence(rows: list[ClaimResult]) -> bool:
    """True when some empirical claim got a verdict from the results."""
    return any(r.claim.method == "empirical" and r.evidence.verdict != NOT_CHECKABLE for r in rows)


# --- output ---

HEADER = ("id", "source", "method", "expected", "measured", "verdict")


def table_rows(rows: list[ClaimResult]) -> list[list[str]]:
    return [[r.claim.id, f"{r.claim.paper} {r.claim.where}", r.claim.method, r.claim.expected, r.evidence.measured,
             r.evidence.verdict] for r in rows]


def markdown(rows: list[ClaimResult]) -> str:
    head = ("id", "claim", "source", "method", "expected", "measured", "verdict", "detail")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c, e = r.claim, r.evidence
        cells = (c.id, c.statement, f"{c.paper} {c.where}", c.method, c.expected, e.measured, e.verdict, e.detail)
        lines.append("| " + " | ".join(md_escape(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(rows: list[ClaimResult]) -> str:
    return json.dumps([r.to_json() for r in rows], indent=2)


def frame(rows: list[ClaimResult]) -> pd.DataFrame:
    return pd.DataFrame([r.to_json() for r in rows])

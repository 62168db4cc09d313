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

The package: evidence (verdicts, Evidence), analytic (official.py's counts), empirical (the
measured cells, paired by dsbench.pairing), mtp (multi-token prediction: speculative cells, and
train cells paired along `mtp`), and here the registry, evaluate and the output. A claim's `hint`
says which preset gives its evidence (paper-cpu unless it says otherwise).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from dsbench.check import md_escape
from dsbench.claims.analytic import (check_kv_table1, check_kv_vs_67b, check_moe16b_flops, check_v2_training_cost,
                                     check_v3_checkpoint, check_v3_fraction, count_check, published_match, published_value)
from dsbench.claims.empirical import (check_aux_free, check_deepseekmoe_vs_moe, check_fp8_gap, check_fp8_tensorwise,
                                      check_mla_decode, check_mla_kv, check_shared_expert, ok_cells)
from dsbench.claims.evidence import DIRECTION, NOT_CHECKABLE, NOT_REPRODUCED, REPRODUCED, VERDICTS, Evidence, NotCheckable
from dsbench.claims.dsa import RUN_LONG, check_flat_decode, check_sparse_quality
from dsbench.claims.mtp import RUN_MTP, check_mtp_acceptance, check_mtp_main_loss, check_mtp_speedup
from dsbench.claims import v4
from dsbench.results import Results

__all__ = ["CLAIMS", "DIRECTION", "NOT_CHECKABLE", "NOT_REPRODUCED", "REPRODUCED", "VERDICTS", "Claim", "ClaimResult",
           "Evidence", "NotCheckable", "evaluate", "frame", "has_evidence", "markdown", "ok_cells", "published_match",
           "published_value", "table_rows", "to_json"]
RUN_PAPER = "run `dsbench run sweep --preset paper-cpu` first (paper-gpu on a GPU)"


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    where: str
    statement: str
    method: str  # analytic | empirical
    expected: str
    check: Callable[[list[Results]], Evidence]
    hint: str = RUN_PAPER  # what to run for its evidence, when no results are given

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("check", "hint")}


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    evidence: Evidence

    def to_json(self) -> dict:
        return {**self.claim.to_json(), **dataclasses.asdict(self.evidence)}


# --- the registry ---

V3, V2, DSMOE = "DeepSeek-V3 (2412.19437)", "DeepSeek-V2 (2405.04434)", "DeepSeekMoE (2401.06066)"
V32 = "DeepSeek-V3.2-Exp report (2025)"
V4 = "DeepSeek-V4 report (2026)"
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
    Claim("v3-mtp-acceptance", V3, "§5.4.3",
          "With one MTP module as the draft, the second predicted token is accepted 85–90% of the time.", "empirical",
          "85–90%", check_mtp_acceptance, RUN_MTP),
    Claim("v3-mtp-speedup", V3, "§5.4.3",
          "Self-speculative decoding with the MTP module generates about 1.8× the tokens per second.", "empirical",
          "≈ 1.8× (±10%)", check_mtp_speedup, RUN_MTP),
    Claim("v3-mtp-main-loss", V3, "§4.5.1, Table 4",
          "Training with the MTP objective improves the main model at equal steps and data (the MTP modules are dropped "
          "at inference).", "empirical", "loss(mtp ≥ 1) < loss(mtp = 0)", check_mtp_main_loss, RUN_MTP),
    Claim("v32-flat-decode-cost", V32, "§3, Figure 3 (cost per token against position)",
          "With DSA, the per-token decode cost stays nearly flat as context grows, where dense MLA's grows with it.",
          "empirical", "slope(dsa) < slope(mla) past index_topk", check_flat_decode, hint=RUN_LONG),
    Claim("v32-sparse-quality", V32, "§2–3 (on par with V3.1-Terminus)",
          "Sparse attention (top-2048 of the context) costs little quality against the dense attention it replaces.",
          "empirical", "loss(dsa) ≤ loss(mla) + 0.5% at equal steps", check_sparse_quality, hint=RUN_LONG),
    Claim("v4-pro-total-params", V4, "Abstract", "DeepSeek-V4-Pro has 1.6T parameters.", "analytic", "1.6T",
          v4.count_check("deepseek-v4-pro", "total", "1.6T")),
    Claim("v4-pro-activated-params", V4, "Abstract", "DeepSeek-V4-Pro activates 49B parameters per token.", "analytic", "49B",
          v4.count_check("deepseek-v4-pro", "activated", "49B")),
    Claim("v4-flash-total-params", V4, "Abstract", "DeepSeek-V4-Flash has 284B parameters.", "analytic", "284B",
          v4.count_check("deepseek-v4-flash", "total", "284B")),
    Claim("v4-flash-activated-params", V4, "Abstract", "DeepSeek-V4-Flash activates 13B parameters per token.", "analytic",
          "13B", v4.count_check("deepseek-v4-flash", "activated", "13B")),
    Claim("v4-pro-1m-flops", V4, "Abstract",
          "At 1M tokens of context, DeepSeek-V4-Pro needs 27% of DeepSeek-V3.2's single-token inference FLOPs.", "analytic",
          "27%", v4.flops_check("deepseek-v4-pro", 0.27)),
    Claim("v4-pro-1m-kv", V4, "Abstract", "At 1M tokens of context, DeepSeek-V4-Pro's KV cache is 10% of DeepSeek-V3.2's.",
          "analytic", "10%", v4.kv_check("deepseek-v4-pro", 0.10)),
    Claim("v4-flash-1m-flops", V4, "Abstract",
          "At 1M tokens of context, DeepSeek-V4-Flash needs 10% of DeepSeek-V3.2's single-token inference FLOPs.",
          "analytic", "10%", v4.flops_check("deepseek-v4-flash", 0.10)),
    Claim("v4-flash-1m-kv", V4, "Abstract", "At 1M tokens of context, DeepSeek-V4-Flash's KV cache is 7% of DeepSeek-V3.2's.",
          "analytic", "7%", v4.kv_check("deepseek-v4-flash", 0.07)),
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
            evidence = Evidence("–", NOT_CHECKABLE, f"no results given; {claim.hint}")
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

"""Analytic claims: parameter counts, KV-cache sizes and FLOPs computed by dsbench/official.py from
the official config.json of each model. A count is reproduced within PARAM_TOLERANCE or when it
rounds to the figure as printed."""

from __future__ import annotations

from collections.abc import Callable

from dsbench import official
from dsbench.claims.evidence import DIRECTION, NOT_REPRODUCED, REPRODUCED, Evidence, billions, pct

PARAM_TOLERANCE = 0.01  # relative, for parameter counts (or the published figure's own precision)
SEQ_LEN = 4096  # DeepSeekMoE's "FLOPs per 4K tokens"; V2 and V3 pre-train at 4K too


# --- analytic: parameter counts ---


UNITS = {"B": 1e9, "T": 1e12}


def published_value(published: str) -> tuple[float, float]:
    """A figure printed like '2.8B' → (2.8e9, the half-unit of its last digit, 0.05e9); '1.6T' → (1.6e12, 0.05e12)."""
    digits, unit = published[:-1], UNITS[published[-1]]
    return float(digits) * unit, 0.5 * 10 ** -len(digits.partition(".")[2]) * unit


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

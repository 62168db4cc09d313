"""DeepSeek-V4's analytic claims: V4-Pro's and V4-Flash's parameter counts, and their 1M-context
savings against DeepSeek-V3.2 (single-token inference FLOPs and KV cache), computed by
dsbench/official_v4.py from the official config.json files."""

from __future__ import annotations

from collections.abc import Callable

from dsbench import official_v4
from dsbench.claims.analytic import published_match, published_value
from dsbench.claims.evidence import NOT_REPRODUCED, REPRODUCED, Evidence, billions, pct

CONTEXT = 1 << 20  # the report's "1M-token context": 1,048,576, V4's max_position_embeddings
# A printed percentage of a ratio is reproduced within 2 points, the tolerance the DeepSeekMoE
# FLOP claim uses (claims/analytic.py check_moe16b_flops).
RATIO_POINTS = 0.02


def count_check(model: str, which: str, published: str) -> Callable[[list], Evidence]:
    def check(_results) -> Evidence:
        counts = official_v4.param_counts(official_v4.load_v4(model))
        measured, (value, _) = getattr(counts, which), published_value(published)
        ok, why = published_match(measured, published)
        detail = (f"{billions(measured)} ({measured:,}): {pct(measured / value - 1)} from {published}; {why}. Counted as "
                  "Hugging Face's deepseek_v4 module tree counts it (the same number, tests/test_official_v4.py); the MTP "
                  "layer is not part of the main model.")
        if which == "activated":
            detail += (f" Activated = what a token multiplies with, the input embedding table not counted (V3's convention); "
                       f"with it: {billions(counts.activated_with_embedding)}.")
        return Evidence(billions(measured), REPRODUCED if ok else NOT_REPRODUCED, detail)

    return check


def _ratio_evidence(ratio: float, published: float, what: str, detail: str) -> Evidence:
    ok = abs(ratio - published) <= RATIO_POINTS
    return Evidence(pct(ratio, signed=False), REPRODUCED if ok else NOT_REPRODUCED,
                    f"{what} at {CONTEXT:,} tokens of context, V4 ÷ V3.2 = {ratio:.3f} (the report's {published:.0%}; "
                    f"{'within' if ok else 'outside'} ±{RATIO_POINTS * 100:.0f} points). {detail}")


def flops_check(model: str, published: float) -> Callable[[list], Evidence]:
    def check(_results) -> Evidence:
        a, v32 = official_v4.load_v4(model), official_v4.load_v32()
        ours, theirs = official_v4.decode_flops_per_token(a, CONTEXT), official_v4.v32_decode_flops_per_token(v32, CONTEXT)
        matmuls = 2 * official_v4.matmul_params_per_token(a)
        detail = (f"Forward FLOPs of one new token, dsbench's convention (2 per multiply-add, matmuls only): V4 "
                  f"{ours / 1e9:,.1f} GFLOP ({matmuls / ours:.0%} of it the weights' matmuls, the rest attention and the "
                  f"CSA indexer's scores over L/4 compressed keys) vs V3.2 {theirs / 1e9:,.1f} GFLOP (its indexer scores "
                  "all L keys in every layer). The report does not state its FLOP convention or precision weighting "
                  "(its indexer QK runs in FP4).")
        return _ratio_evidence(ours / theirs, published, "Single-token inference FLOPs", detail)

    return check


def kv_check(model: str, published: float) -> Callable[[list], Evidence]:
    def check(_results) -> Evidence:
        a, v32 = official_v4.load_v4(model), official_v4.load_v32()
        ratio = official_v4.kv_cache_bytes(a, CONTEXT) / official_v4.v32_kv_cache_bytes(v32, CONTEXT)
        elements = official_v4.kv_cache_elements(a, CONTEXT) / official_v4.v32_kv_cache_elements(v32, CONTEXT)
        detail = (f"One sequence's cache in bytes: V4 {official_v4.kv_cache_bytes(a, CONTEXT) / 2**30:.2f} GiB (window + "
                  f"compressed entries, RoPE dims BF16 and the rest FP8, CSA indexer keys FP4) vs V3.2 "
                  f"{official_v4.v32_kv_cache_bytes(v32, CONTEXT) / 2**30:.2f} GiB (FP8 latent, BF16 RoPE key, FP8 indexer "
                  f"key per token and layer); block scales left out on both sides. Counted in elements, whatever the "
                  f"formats: {elements:.3f}.")
        return _ratio_evidence(ratio, published, "KV cache", detail)

    return check

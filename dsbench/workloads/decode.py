"""decode: prefill a context of L tokens, then generate tokens one at a time from the cache.

A spec's memory budget adds, per context, a cell at the largest batch whose weights and KV
cache fit it (maximum generation throughput, the quantity of DeepSeek-V2's "5.76×").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsbench import compiled
from dsbench.errors import SpecError
from dsbench.measure import StepTimer
from dsbench.variants import decoder
from dsbench.variants.precision import precision_of
from dsbench.variants.precision import dtype_bytes
from dsbench.variants.profiling import PREFILL, WARMUP, part

from .base import Context, Workload, WorkloadRun, add_part_metrics, batch_label, check_finite, point

MAX_PREFILL_TOKENS = 1 << 16  # tokens per prefill forward in max-batch decode cells


@dataclass(frozen=True)
class DecodeSettings:
    batch_size: int = 4
    context_lens: tuple[int, ...] = (128,)
    new_tokens: int = 32
    # Maximum generation throughput (the quantity of DeepSeek-V2's "5.76×"): with a budget, each
    # context of max_batch_context_lens (default: all context_lens) also gets a decode cell at the
    # largest batch whose weights and KV cache (analytic, context + new_tokens slots a row) fit.
    memory_budget_bytes: int | None = None
    max_batch_context_lens: tuple[int, ...] | None = None


def max_batch(cfg, budget_bytes: int, positions: int) -> int:
    """The largest batch whose weights and KV cache (`positions` slots a row) fit budget_bytes.

    Analytic, from the same formulas as the accounting columns (parameter count × the inference
    dtype's bytes, and the KV bytes per token that the tests check against the live caches).
    Activations are not counted: at decode they are O(batch × d_model), beside O(batch × context)
    for the cache; the prefill that fills the cache is the larger transient.
    """
    width = dtype_bytes(precision_of(cfg).inference_dtype)
    free = budget_bytes - decoder.weight_bytes(cfg, width)
    return max(0, int(free // decoder.kv_cache_bytes(cfg, width, positions)))


def cache_bytes_at(cache, context_len: int) -> int:
    """One row's bytes in this cache after context_len tokens, off its live tensors."""
    if hasattr(cache, "filled_bytes"):  # a cache with a constant part (variants/v4_attention_core.py V4Cache)
        return cache.filled_bytes(context_len)
    return int(cache.live_bytes_per_token() * context_len)


class Decode(Workload):
    name = "decode"
    Settings = DecodeSettings
    description = "prefill a context, then generate tokens one at a time from the KV cache"
    decodes = True
    context_curve = True

    def cells(self, section: DecodeSettings, cfg) -> list[dict]:
        d = section
        cells = [{"batch_size": d.batch_size, "context_len": L, "new_tokens": d.new_tokens} for L in d.context_lens]
        if d.memory_budget_bytes is not None:
            for L in d.max_batch_context_lens or d.context_lens:
                batch = max_batch(cfg, d.memory_budget_bytes, L + d.new_tokens)
                cells.append({"batch_size": batch, "context_len": L, "new_tokens": d.new_tokens, "memory_budget_bytes": d.memory_budget_bytes})
        return cells

    def shape_label(self, settings: dict) -> str:
        w = settings
        budget = f"(max@{w['memory_budget_bytes'] / 2**20:.4g}MiB)" if "memory_budget_bytes" in w else ""
        return f"{batch_label(w)}{budget}×ctx{w['context_len']}+{w['new_tokens']}"

    def tokens_per_step(self, settings: dict) -> int:
        return settings["batch_size"]  # one generated token per row per timed step

    def mean_context_len(self, settings: dict) -> float:
        return settings["context_len"] + (settings["new_tokens"] + 1) / 2

    def row_columns(self, cfg, settings: dict, kv_bytes_per_token: int) -> dict:
        """A max-batch cell: what the fit counted (analytic weights and KV cache at this batch)."""
        if "memory_budget_bytes" not in settings:
            return {}
        width = dtype_bytes(precision_of(cfg).inference_dtype)
        return {"memory_budget_bytes": settings["memory_budget_bytes"], "weights_bytes": decoder.weight_bytes(cfg, width),
                "kv_cache_bytes": int(decoder.kv_cache_bytes(cfg, width, self.cache_slots(settings))) * settings["batch_size"]}

    def cache_slots(self, settings: dict) -> int:
        return settings["context_len"] + settings["new_tokens"]

    def data_lengths(self, section: DecodeSettings) -> list[tuple[int, str]]:
        return [(L, "train") for L in section.context_lens]

    def section_from_flags(self, flags) -> dict:
        return {"batch_size": flags.batch_size, "context_lens": [flags.context_len], "new_tokens": flags.new_tokens}

    def check(self, section, configs, read) -> None:
        d, limit = section, configs[0][1].max_seq_len
        for L in d.context_lens:
            if L + d.new_tokens > limit:
                raise SpecError(f"decode.context_lens: {L} + decode.new_tokens {d.new_tokens} exceeds model.max_seq_len {limit}")
        _check_max_batch(d, configs)

    def profiled(self, settings: dict, options) -> tuple[dict, int]:
        return dict(settings), 1  # one round of new_tokens tokens

    def add_step_costs(self, cell, costs: dict, add, act_bytes: int) -> None:
        add("sample", 0.0, self.tokens_per_step(cell.workload) * cell.model.vocab_size * act_bytes)

    @torch.inference_mode()
    def run(self, ctx: Context, settings: dict) -> WorkloadRun:
        """Greedy generation; the argmax is part of each step. Samples are per generated token.

        Rounds of (prefill L, generate N) repeat until at least `repeats` tokens are timed; one
        untimed round of `warmup` tokens comes first.
        """
        model, B, L, N = ctx.model, settings["batch_size"], settings["context_len"], settings["new_tokens"]
        model.eval()
        batch = ctx.data.batch(0, B, L)
        context = batch.inputs.to(ctx.device)
        domains = (batch.domains, ctx.data.domains)
        model.set_token_domains(*domains)
        caches = model.new_caches(B, L + N, ctx.precision.inference_dtype, ctx.device)
        prefill_timer, token_timer = StepTimer(ctx.device, kind=PREFILL), StepTimer(ctx.device)
        # A max-batch cell fits weights + KV cache to a memory budget; its prefill runs a few rows at
        # a time so the prefill's activations stay small beside them (as a server prefills requests).
        rows = max(1, MAX_PREFILL_TOKENS // L) if "memory_budget_bytes" in settings else B
        if ctx.warmup:
            generate(model, context, caches, min(ctx.warmup, N), StepTimer(ctx.device, WARMUP), StepTimer(ctx.device, WARMUP), rows, domains)
        for _ in compiled.rounds(math.ceil(ctx.repeats / N), lambda: len(token_timer) >= ctx.repeats):
            last_logits = generate(model, context, caches, N, prefill_timer, token_timer, rows, domains)
        check_finite(last_logits.float(), "decode logits")
        run = WorkloadRun(token_timer.samples_s(), self.tokens_per_step(settings), self.mean_context_len(settings))
        prefill_s = prefill_timer.samples_s()
        # None: every prefill compiled (a compiled cell's rounds each met a new shape)
        run.summary["prefill_time_ms"] = 1e3 * sorted(prefill_s)[len(prefill_s) // 2] if prefill_s else None
        run.summary["kv_cache_bytes_per_token_measured"] = sum(c.live_bytes_per_token() for c in caches)
        run.summary["kv_cache_bytes_at_context_measured"] = sum(cache_bytes_at(c, L) for c in caches)
        run.series += [point(i, "prefill_time_ms", 1e3 * t) for i, t in enumerate(prefill_s)]
        add_part_metrics(ctx, run)
        return run


def _check_max_batch(d: DecodeSettings, configs) -> None:
    if d.max_batch_context_lens is not None:
        if d.memory_budget_bytes is None:
            raise SpecError("decode.max_batch_context_lens: set without decode.memory_budget_bytes; set the budget too")
        for L in d.max_batch_context_lens:
            if L not in d.context_lens:
                raise SpecError(f"decode.max_batch_context_lens: {L} is not one of decode.context_lens {list(d.context_lens)}")
    if d.memory_budget_bytes is None:
        return
    for axes, cfg in configs:
        for L in d.max_batch_context_lens or d.context_lens:
            if max_batch(cfg, d.memory_budget_bytes, L + d.new_tokens) < 1:
                what = "/".join(axes[a] for a in ("ffn", "attention", "precision"))
                width = dtype_bytes(precision_of(cfg).inference_dtype)
                need = decoder.weight_bytes(cfg, width) + int(decoder.kv_cache_bytes(cfg, width, L + d.new_tokens))
                raise SpecError(f"decode.memory_budget_bytes: {d.memory_budget_bytes} does not hold one sequence of "
                                f"{what} at context {L} + {d.new_tokens} (weights and KV cache: {need} bytes); raise it")


def generate(model, context, caches, n_tokens: int, prefill_timer: StepTimer, token_timer: StepTimer,
              rows: int | None = None, domains=None, on_token=None):
    """Prefill the context into the caches, then generate n_tokens greedily; return last logits.
    on_token(token (B, 1)) sees each generated token (outside the timed step's work)."""
    L = context.shape[1]
    with prefill_timer.step():
        logits = prefill_caches(model, context, caches, rows or context.shape[0], domains)  # (B, V)
    for i in range(n_tokens):
        with token_timer.step():
            with part("sample"):
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            logits = model(next_token, L + i, caches)[:, -1]
        if on_token is not None:
            on_token(next_token)
    return logits


def prefill_caches(model, context, caches, rows: int, domains=None) -> torch.Tensor:
    """Fill the caches with the context, `rows` batch rows per forward; last logits (B, V)."""
    B = context.shape[0]
    if rows >= B:
        return model(context, 0, caches)[:, -1]
    parts = []
    for i in range(0, B, rows):
        if domains is not None:
            model.set_token_domains(domains[0][i:i + rows], domains[1])
        parts.append(model(context[i:i + rows], 0, [c.rows(i, i + rows) for c in caches])[:, -1])
    if domains is not None:
        model.set_token_domains(*domains)
    return torch.cat(parts)

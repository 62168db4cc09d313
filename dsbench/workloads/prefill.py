"""prefill: one forward over batch×seq tokens that fills a fresh KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsbench import compiled, distributed
from dsbench.errors import SpecError
from dsbench.measure import StepTimer

from .base import Context, WholeSequences, WorkloadRun, add_part_metrics, check_finite


@dataclass(frozen=True)
class PrefillSettings:
    batch_size: int = 4
    seq_lens: tuple[int, ...] = (128,)


class Prefill(WholeSequences):
    name = "prefill"
    Settings = PrefillSettings
    description = "one forward over batch×seq tokens, filling a KV cache"
    expert_parallel = True
    redundant_experts = True  # V3 deploys redundant experts for inference (§3.4.1)
    cache_copies = 2  # each repeat's fresh cache is allocated while the last one is still held

    def cells(self, section: PrefillSettings, cfg) -> list[dict]:
        return [{"batch_size": section.batch_size, "seq_len": T} for T in section.seq_lens]

    def cache_slots(self, settings: dict) -> int:
        return settings["seq_len"]

    def data_lengths(self, section: PrefillSettings) -> list[tuple[int, str]]:
        return [(T, "train") for T in section.seq_lens]

    def section_from_flags(self, flags) -> dict:
        return {"batch_size": flags.batch_size, "seq_lens": [flags.seq_len]}

    def check(self, section, configs, read) -> None:
        limit = configs[0][1].max_seq_len
        for T in section.seq_lens:
            if T > limit:
                raise SpecError(f"prefill.seq_lens: {T} exceeds model.max_seq_len {limit}")

    @torch.inference_mode()
    def run(self, ctx: Context, settings: dict) -> WorkloadRun:
        model, B, T = ctx.model, settings["batch_size"], settings["seq_len"]
        model.eval()
        batch = ctx.data.batch(0, B, T)
        inputs = batch.inputs.to(ctx.device)
        model.set_token_domains(batch.domains, ctx.data.domains)
        dtype = ctx.precision.inference_dtype
        timer = StepTimer(ctx.device)
        for i in compiled.rounds(ctx.warmup + ctx.repeats, lambda: len(timer) >= ctx.repeats):
            caches = model.new_caches(B, T, dtype, ctx.device)  # serving preallocates: not timed
            with timer.step(record=i >= ctx.warmup):
                logits = model(inputs, 0, caches)
        check_finite(logits[:, -1].float(), "prefill logits")
        run = WorkloadRun(distributed.timed_samples(timer, ctx.ranks, "the prefill cell"), self.tokens_per_step(settings), self.mean_context_len(settings))
        run.summary["kv_cache_bytes_per_token_measured"] = sum(c.live_bytes_per_token() for c in caches)
        add_part_metrics(ctx, run)
        return run

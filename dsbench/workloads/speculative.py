"""speculative: MTP self-speculative decoding (DeepSeek-V3 2412.19437 §5.4.3) against plain
greedy decoding of the same model, in one cell.

A draft is only as good as the MTP modules' training, so the cell first trains its model for
`train_steps` AdamW steps (the spec's [train] settings, untimed, recorded in the cell's
settings), then alternates rounds of plain greedy decoding and of speculative decoding over
the same context: prefill L tokens, generate new_tokens. Each speculative round's tokens are
compared with the plain round's (they must be equal: greedy acceptance reproduces greedy
decoding). A timed sample is one verify round's draft + verify time divided by the tokens it
emitted, so tokens_per_s_* read as generated tokens per second, like a decode cell's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from dsbench.checkpoints import WEIGHT_SETTINGS
from dsbench.errors import SpecError
from dsbench.measure import StepTimer, summarize, sync
from dsbench.variants import registry
from dsbench.variants.mtp import MAX_DEPTH, SelfSpeculative, draft_agreement
from dsbench.variants.profiling import PREFILL, STEP, WARMUP

from .base import Context, Workload, WorkloadRun, batch_label, check_finite, point
from .decode import generate
from .train import Train, check_mtp_rows, settings_for



@dataclass(frozen=True)
class SpeculativeSettings:
    batch_size: int = 1  # rows decoded together (they advance by the fewest drafts any row accepted)
    context_lens: tuple[int, ...] = (128,)
    new_tokens: int = 64
    # Steps the model (MTP modules included) trains before decoding, with the spec's [train]
    # settings; acceptance depends on it. 0 decodes the untrained model (chance acceptance).
    train_steps: tuple[int, ...] = field(default=(200,), metadata={"min": 0})


class Speculative(Workload):
    name = "speculative"
    Settings = SpeculativeSettings
    description = ("train, then MTP self-speculative decoding (draft with the MTP modules, verify with the main model) "
                   "against plain greedy")
    reads = ("train",)
    decodes = True
    trains_first = True
    report_section = "dsbench.workloads.speculative_report:mtp_section"  # MTP: loss by depth, speculative speed-up

    def cells(self, section: SpeculativeSettings, cfg) -> list[dict]:
        raise NotImplementedError("speculative cells need the spec's [train] section: use cells_for")

    def cells_for(self, section: SpeculativeSettings, cfg, read) -> list[dict]:
        s = section
        pretrain = {k: v for k, v in settings_for(read["train"], cfg).items() if k in WEIGHT_SETTINGS}
        return [{"batch_size": s.batch_size, "context_len": L, "new_tokens": s.new_tokens, "train_steps": steps, "train": pretrain}
                for steps in s.train_steps for L in s.context_lens]

    def shape_label(self, settings: dict) -> str:
        return f"{batch_label(settings)}×ctx{settings['context_len']}+{settings['new_tokens']}@{settings['train_steps']}steps"

    def tokens_per_step(self, settings: dict) -> int:
        return settings["batch_size"]  # a sample is normalised to one generated token per row

    def mean_context_len(self, settings: dict) -> float:
        return settings["context_len"] + (settings["new_tokens"] + 1) / 2

    def cache_slots(self, settings: dict) -> int:
        return settings["context_len"] + settings["new_tokens"]

    def data_lengths(self, section: SpeculativeSettings) -> list[tuple[int, str]]:
        return [(L, "train") for L in section.context_lens]

    def section_from_flags(self, flags) -> dict:
        return {"batch_size": flags.batch_size, "context_lens": [flags.context_len], "new_tokens": flags.new_tokens,
                "train_steps": [flags.steps]}

    def check(self, section: SpeculativeSettings, configs, read) -> None:
        s, train = section, read["train"]
        for axes, cfg in configs:
            if not cfg.mtp:
                raise SpecError(f"axes.workload: speculative drafts with MTP modules; model.mtp is 0 for {axes['ffn']}/"
                                f"{axes['attention']}: set model.mtp between 1 and {MAX_DEPTH} for these cells (a [[sweep]] block)")
            if stuck := next((layer_cfg.attention.kind for module, layer_cfg in registry.attention_layers(cfg)
                              if not module.cache_rewinds), None):
                raise SpecError(f"axes.attention: {axes['attention']} has {stuck} layers, whose cache cannot roll back a "
                                f"rejected draft (Attention.cache_rewinds); allowed with speculative: attention kinds whose cache can")
            for L in s.context_lens:
                need = L + s.new_tokens + cfg.mtp + 1
                if need > cfg.max_seq_len:
                    raise SpecError(f"speculative.context_lens: {L} + speculative.new_tokens {s.new_tokens} + model.mtp "
                                    f"{cfg.mtp} + 1 (the verify window) exceeds model.max_seq_len {cfg.max_seq_len}")
        if any(s.train_steps):
            if train.seq_len > configs[0][1].max_seq_len:
                raise SpecError(f"train.seq_len: {train.seq_len} exceeds model.max_seq_len {configs[0][1].max_seq_len}")
            check_mtp_rows("train.seq_len", train.seq_len, configs)

    def profiled(self, settings: dict, options) -> tuple[dict, int]:
        """The measured model decodes again (already trained: no second pre-training)."""
        return {**settings, "train_steps": 0}, options.steps

    def run(self, ctx: Context, settings: dict) -> WorkloadRun:
        model = ctx.model
        run_summary = pretrain(ctx, settings)
        model.to(ctx.precision.inference_dtype).eval()
        with torch.inference_mode():
            if ctx.observe:
                run_summary.update(_eval_agreement(ctx, settings))
            measured = _measure(ctx, settings)
        run = WorkloadRun(measured.pop("samples"), self.tokens_per_step(settings), self.mean_context_len(settings),
                          step_range_total_s=measured.pop("step_range_total_s"))
        run.series += measured.pop("series")
        run.summary.update(run_summary)
        run.summary.update(measured)
        return run


def pretrain(ctx: Context, settings: dict) -> dict:
    """Train the cell's model for train_steps steps with the recorded [train] settings (untimed,
    unobserved), or load the weights an earlier cell of the sweep trained the same way
    (dsbench/checkpoints.py); the main head's final training loss says how trained the drafts are."""
    steps = settings["train_steps"]
    if not steps:
        return {"pretrain_final_loss": None, "pretrain_source": "untrained"}
    cache, key = ctx.weights, None
    if cache is not None:
        key = cache.key(ctx.model.cfg.to_dict(), settings["train"], steps)
        info = cache.load(key, ctx.model)
        if info is not None:
            return {"pretrain_final_loss": info["final_loss"], "pretrain_source": f"loaded {key}"}
    train_settings = {**settings["train"], "steps": steps, "eval_batches": 0}
    final_loss = Train().run(replace(ctx, warmup=0, observe=False), train_settings).summary["final_loss"]
    if cache is not None:
        cache.save(key, ctx.model, {"final_loss": final_loss})
    return {"pretrain_final_loss": final_loss, "pretrain_source": "trained"}


EVAL_AGREEMENT_BATCHES = 2


def _eval_agreement(ctx: Context, settings: dict) -> dict:
    """Draft agreement per depth on held-out text (mtp.draft_agreement), over a few eval batches
    of the [train] shape; with it, how varied the greedy output is, below."""
    B, T = settings["train"]["batch_size"], settings["train"]["seq_len"]
    by_batch = [draft_agreement(ctx.model, ctx.data.batch(i, B, T, split="eval").inputs.to(ctx.device))
                for i in range(EVAL_AGREEMENT_BATCHES)]
    rates = torch.tensor(by_batch).mean(dim=0)
    return {f"eval_agreement_pos{k}": float(r) for k, r in enumerate(rates, start=1)}


class _Timers:
    """A speculative round is one timed step (draft + verify); inside it, each phase on a host
    clock after a sync. Plain rounds are timed steps too, except in a profiled pass, where only
    the speculative rounds are the profile's steps."""

    def __init__(self, device, profiled: bool = False):
        self.device = device
        self.round = StepTimer(device)
        self.draft_s: list[float] = []
        self.verify_s: list[float] = []
        self.plain_prefill = StepTimer(device, kind=PREFILL if not profiled else WARMUP)
        self.plain_token = StepTimer(device, kind=STEP if not profiled else WARMUP)

    def phase(self, into: list[float]):
        return _Phase(self.device, into)


class _Phase:
    def __init__(self, device, into: list[float]):
        self.device, self.into = device, into

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        sync(self.device)
        self.into.append(time.perf_counter() - self.t0)


def _measure(ctx: Context, settings: dict) -> dict:
    """Alternate plain and speculative rounds; the columns and series of both."""
    model, B, L, N = ctx.model, settings["batch_size"], settings["context_len"], settings["new_tokens"]
    batch = ctx.data.batch(0, B, L)
    context = batch.inputs.to(ctx.device)
    model.set_token_domains(batch.domains, ctx.data.domains)
    dtype = ctx.precision.inference_dtype
    caches = model.new_caches(B, L + N, dtype, ctx.device)
    spec = SelfSpeculative(model, B, L + N, dtype, ctx.device)
    if ctx.warmup:
        warm = StepTimer(ctx.device, WARMUP)
        generate(model, context, caches, min(ctx.warmup, N), warm, warm)
        _speculative_round(spec, context, min(ctx.warmup, N), _Timers(ctx.device), record=False)
    timers = _Timers(ctx.device, profiled=not ctx.observe)
    accepted_rows, emitted, matches, plain_tokens = [], [], True, 0
    while len(emitted) < max(1, ctx.repeats):  # repeats: timed verify rounds, at least
        greedy = _plain_round(model, context, caches, N, timers)  # the same tokens every round
        plain_tokens += B * N
        got, round_accepted, round_emitted = _speculative_round(spec, context, N, timers)
        matches &= bool(torch.equal(got, greedy))
        accepted_rows += round_accepted
        emitted += round_emitted
    check_finite(spec.hidden[0][:, :L + N].float(), "speculative hidden states")
    columns = _columns(timers, accepted_rows, emitted, matches, plain_tokens, B, model.cfg.mtp)
    # A small model's greedy output can loop on a few tokens, which drafts then match trivially.
    columns["greedy_distinct_fraction"] = sum(len(set(row.tolist())) for row in greedy) / greedy.numel()
    columns["kv_cache_bytes_per_token_measured"] = sum(c.live_bytes_per_token() for c in spec.caches)
    columns["kv_cache_bytes_per_token_mtp"] = sum(c.live_bytes_per_token() for c in spec.mtp_caches)
    return columns


def _plain_round(model, context, caches, n: int, timers: _Timers) -> torch.Tensor:
    """Plain greedy decoding: the first n generated tokens (B, n), the prefill's argmax first."""
    tokens: list[torch.Tensor] = []
    generate(model, context, caches, n, timers.plain_prefill, timers.plain_token, on_token=tokens.append)
    return torch.cat(tokens, dim=1)


def _speculative_round(spec: SelfSpeculative, context, n: int, timers: _Timers, record: bool = True):
    """Prefill, then draft/verify rounds until n tokens are generated: (tokens (B, n), each
    round's accepted drafts per row, tokens emitted per round)."""
    L = context.shape[1]
    spec.prefill(context)
    accepted, emitted = [], []
    while spec.emitted(L) < n:
        with timers.round.step(record=record):
            with timers.phase(timers.draft_s):
                spec.draft()
            with timers.phase(timers.verify_s):
                n_emitted, rows = spec.verify()
        accepted.append(rows.cpu())
        emitted.append(n_emitted)
    return spec.generated(L, n), accepted, emitted


def _columns(timers: _Timers, accepted_rows: list[torch.Tensor], emitted: list[int], matches: bool, plain_tokens: int,
             batch: int, depth: int) -> dict:
    round_s, plain_s = timers.round.samples_s(), timers.plain_token.samples_s()
    accepted = torch.stack(accepted_rows).flatten()  # (rounds·B,) drafts each row's verify agreed with
    rates = acceptance_by_position(accepted, depth)
    spec_tokens_per_s = batch * sum(emitted) / sum(round_s)
    plain_tokens_per_s = plain_tokens / sum(plain_s)
    verify_ms, plain_ms = 1e3 * summarize(timers.verify_s)["median"], 1e3 * summarize(plain_s)["median"]
    columns = {f"accept_rate_pos{k}": r for k, r in enumerate(rates, start=1)}
    columns.update(
        accepted_len_mean=sum(emitted) / len(emitted),
        spec_tokens_per_s=spec_tokens_per_s,
        plain_tokens_per_s=plain_tokens_per_s,
        spec_speedup=spec_tokens_per_s / plain_tokens_per_s,
        verify_time_ms_median=verify_ms,
        draft_time_ms_median=1e3 * summarize(timers.draft_s)["median"],
        plain_token_time_ms_median=plain_ms,
        verify_cost_ratio=verify_ms / plain_ms,
        spec_matches_greedy=matches,
        prefill_time_ms=1e3 * summarize(timers.plain_prefill.samples_s())["median"],
    )
    series = [point(0, "accept_rate", r, index=k) for k, r in enumerate(rates, start=1)]
    series += [point(i, "accepted_drafts", float(e - 1)) for i, e in enumerate(emitted)]
    samples = [s / e for s, e in zip(round_s, emitted)]  # time per generated token, round by round
    return {**columns, "series": series, "samples": samples, "step_range_total_s": sum(round_s)}


def acceptance_by_position(accepted: torch.Tensor, depth: int) -> list[float | None]:
    """Per draft position k: P(draft k accepted | drafts 1…k−1 accepted), over every row of
    every round (`accepted` holds each row's count of leading drafts that agreed)."""
    rates = []
    for k in range(1, depth + 1):
        reached = int((accepted >= k - 1).sum())
        rates.append(int((accepted >= k).sum()) / reached if reached else None)
    return rates

"""The three workloads a cell can run. Each returns timed step samples (warm-up excluded) and
the series it observed; the worker turns them into a row.

- train: AdamW steps (forward, backward, clip, optimizer) on batch×seq tokens; loss every step.
- prefill: one forward over batch×seq tokens that fills a fresh KV cache.
- decode: prefill a context of L tokens, then generate tokens one at a time from the cache.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsbench.measure import StepTimer
from dsbench.variants.fp8 import QuantisationProbe
from dsbench.variants.precision import Precision
from dsbench.variants.profiling import PREFILL, WARMUP, part


class Diverged(RuntimeError):
    """The loss or the logits became NaN or infinite."""


@dataclass
class WorkloadRun:
    step_times_s: list[float]  # timed samples only
    tokens_per_step: int
    mean_context_len: float  # keys each processed token attends to, on average (for FLOPs)
    summary: dict = field(default_factory=dict)  # workload-specific scalar results
    series: list[tuple] = field(default_factory=list)  # point(...) rows


def point(step: int, metric: str, value: float, layer: int | None = None, index: int | None = None, domain: str | None = None) -> tuple:
    """One row of the long series table (layer: model layer; index: e.g. expert id)."""
    return (step, metric, value, layer, index, domain)


@dataclass
class Context:
    """What every workload needs besides its own settings."""

    model: torch.nn.Module
    data: object  # dsbench.data.TokenDataset
    device: torch.device
    precision: Precision
    warmup: int
    repeats: int
    observe: bool = True  # False (a profiled pass): only the steps, no metrics, no probes


def _autocast(ctx: Context):
    dtype = ctx.precision.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=dtype)


def _to_device(batch, device):
    return (batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True), batch.domains)


# --- train ---


def make_optimizer(model: torch.nn.Module, settings: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only, not on norms (as nanoGPT's configure_optimizers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings["lr"], betas=(settings["beta1"], settings["beta2"]))


def lr_at(step: int, settings: dict) -> float:
    """Linear warm-up over the first 10% of steps (at least one), then constant."""
    ramp = max(1, settings["steps"] // 10)
    return settings["lr"] * min(1.0, (step + 1) / ramp)


def _loss_per_row(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) → (B,) mean cross-entropy per row, in fp32."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape).mean(dim=1)


def run_train(ctx: Context, settings: dict) -> WorkloadRun:
    model, B, T = ctx.model, settings["batch_size"], settings["seq_len"]
    model.train()
    optimizer = make_optimizer(model, settings)
    timer = StepTimer(ctx.device)
    clip = settings["grad_clip"] or math.inf
    row_losses, grad_norms, domain_labels = [], [], []
    for step in range(settings["steps"]):
        inputs, targets, domains = _to_device(ctx.data.batch(step, B, T), ctx.device)
        model.set_token_domains(domains, ctx.data.domains)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        with timer.step(record=step >= ctx.warmup):
            with _autocast(ctx):
                logits = model(inputs)
                with part("loss"):
                    per_row = _loss_per_row(logits, targets)
                    loss = per_row.mean()
                    aux = model.aux_loss()
                    total = loss if aux is None else loss + aux
            with part("autograd"):
                total.backward()
            with part("grad_clip"):
                grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).detach())
            with part("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.after_optimizer_step()
        # Kept on the device and read once at the end: a per-step .item() would sync the GPU.
        row_losses.append(per_row.detach())
        domain_labels.append(domains)
    losses = torch.stack(row_losses).float().cpu()  # (steps, B)
    run = WorkloadRun(timer.samples_s(), B * T, mean_context_len=(T + 1) / 2)
    _check_finite(losses.mean(dim=1), "train loss")
    run.series += _loss_series(losses, torch.stack(domain_labels), ctx.data.domains)
    run.series += [point(s, "grad_norm", float(g)) for s, g in enumerate(torch.stack(grad_norms).cpu())]
    tail = max(1, settings["steps"] // 10)
    run.summary["final_loss"] = float(losses[-tail:].mean())
    run.summary["first_loss"] = float(losses[0].mean())
    run.summary.update(_evaluate(ctx, settings, run.series))
    _add_part_metrics(ctx, run)
    if ctx.observe:
        run.summary.update(_quantisation_stats(ctx, settings))
    return run


def _quantisation_stats(ctx: Context, settings: dict) -> dict:
    """FP8 cells: SQNR of what each FP8 linear quantises (X, W, dY) and the bytes its FP8 cache of
    X saves, from one untimed forward and backward at the final weights on the next batch."""
    with QuantisationProbe(ctx.model) as probe:
        if not probe.layers:
            return {}
        ctx.model.train()
        batch = ctx.data.batch(settings["steps"], settings["batch_size"], settings["seq_len"])
        inputs, targets, domains = _to_device(batch, ctx.device)
        ctx.model.set_token_domains(domains, ctx.data.domains)
        with _autocast(ctx):
            loss = _loss_per_row(ctx.model(inputs), targets).mean()
        loss.backward()
    ctx.model.zero_grad(set_to_none=True)
    return probe.summary()


def _add_part_metrics(ctx: Context, run: WorkloadRun) -> None:
    """Series and columns the model's parts observed themselves (routing balance, …)."""
    if not ctx.observe:
        return
    records, columns = ctx.model.collect_metrics()
    run.series += [point(**r) for r in records]
    run.summary.update(columns)


def _loss_series(losses: torch.Tensor, domains: torch.Tensor, names) -> list[tuple]:
    """Loss per step, and per step and data domain (mean over that domain's rows)."""
    rows = [point(s, "loss", float(v)) for s, v in enumerate(losses.mean(dim=1))]
    for d, name in enumerate(names):
        mask = domains == d  # (steps, B)
        for s in torch.nonzero(mask.any(dim=1)).flatten().tolist():
            rows.append(point(s, "loss_by_domain", float(losses[s][mask[s]].mean()), domain=name))
    return rows


@torch.no_grad()
def _evaluate(ctx: Context, settings: dict, series: list) -> dict:
    """Loss on held-out batches (the data's eval split), overall and per domain."""
    if settings["eval_batches"] == 0:
        return {"eval_loss": None}
    ctx.model.eval()
    per_row, labels = [], []
    for i in range(settings["eval_batches"]):
        inputs, targets, domains = _to_device(ctx.data.batch(i, settings["batch_size"], settings["seq_len"], split="eval"), ctx.device)
        ctx.model.set_token_domains(domains, ctx.data.domains)
        with _autocast(ctx):
            per_row.append(_loss_per_row(ctx.model(inputs), targets).float().cpu())
        labels.append(domains)
    losses, labels = torch.cat(per_row), torch.cat(labels)
    step = settings["steps"]
    for d, name in enumerate(ctx.data.domains):
        if (labels == d).any():
            series.append(point(step, "eval_loss_by_domain", float(losses[labels == d].mean()), domain=name))
    series.append(point(step, "eval_loss", float(losses.mean())))
    _check_finite(losses, "eval loss")
    return {"eval_loss": float(losses.mean())}


# --- inference ---


@torch.inference_mode()
def run_prefill(ctx: Context, settings: dict) -> WorkloadRun:
    model, B, T = ctx.model, settings["batch_size"], settings["seq_len"]
    model.eval()
    batch = ctx.data.batch(0, B, T)
    inputs = batch.inputs.to(ctx.device)
    model.set_token_domains(batch.domains, ctx.data.domains)
    dtype = ctx.precision.inference_dtype
    timer = StepTimer(ctx.device)
    for i in range(ctx.warmup + ctx.repeats):
        caches = model.new_caches(B, T, dtype, ctx.device)  # serving preallocates: not timed
        with timer.step(record=i >= ctx.warmup):
            logits = model(inputs, 0, caches)
    _check_finite(logits[:, -1].float(), "prefill logits")
    run = WorkloadRun(timer.samples_s(), B * T, mean_context_len=(T + 1) / 2)
    run.summary["kv_cache_bytes_per_token_measured"] = sum(c.live_bytes_per_token() for c in caches)
    _add_part_metrics(ctx, run)
    return run


@torch.inference_mode()
def run_decode(ctx: Context, settings: dict) -> WorkloadRun:
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
        _generate(model, context, caches, min(ctx.warmup, N), StepTimer(ctx.device, WARMUP), StepTimer(ctx.device, WARMUP), rows, domains)
    for _ in range(math.ceil(ctx.repeats / N)):
        last_logits = _generate(model, context, caches, N, prefill_timer, token_timer, rows, domains)
    _check_finite(last_logits.float(), "decode logits")
    run = WorkloadRun(token_timer.samples_s(), B, mean_context_len=L + (N + 1) / 2)
    prefill_s = prefill_timer.samples_s()
    run.summary["prefill_time_ms"] = 1e3 * sorted(prefill_s)[len(prefill_s) // 2]
    run.summary["kv_cache_bytes_per_token_measured"] = sum(c.live_bytes_per_token() for c in caches)
    run.series += [point(i, "prefill_time_ms", 1e3 * t) for i, t in enumerate(prefill_s)]
    _add_part_metrics(ctx, run)
    return run


MAX_PREFILL_TOKENS = 1 << 16  # tokens per prefill forward in max-batch decode cells


def _generate(model, context, caches, n_tokens: int, prefill_timer: StepTimer, token_timer: StepTimer,
              rows: int | None = None, domains=None):
    """Prefill the context into the caches, then generate n_tokens greedily; return last logits."""
    L = context.shape[1]
    with prefill_timer.step():
        logits = _prefill(model, context, caches, rows or context.shape[0], domains)  # (B, V)
    for i in range(n_tokens):
        with token_timer.step():
            with part("sample"):
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            logits = model(next_token, L + i, caches)[:, -1]
    return logits


def _prefill(model, context, caches, rows: int, domains=None) -> torch.Tensor:
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


def _check_finite(values: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        where = int(torch.nonzero(bad.flatten())[0])
        raise Diverged(f"{what} is not finite (first at index {where}: {values.flatten()[where].item()})")


WORKLOADS = {"train": run_train, "prefill": run_prefill, "decode": run_decode}

"""train: AdamW (or Muon) steps (forward, backward, clip, optimizer) on batch×seq tokens; loss every step."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from dsbench import compiled, distributed, optimizers
from dsbench.errors import SpecError
from dsbench.measure import StepTimer
from dsbench.optimizers import make_optimizer
from dsbench.variants import decoder, mtp, registry
from dsbench.variants.base import PassShape, add_cost
from dsbench.variants.fp8 import QuantisationProbe
from dsbench.variants.profiling import part

from .base import Context, WholeSequences, WorkloadRun, add_part_metrics, autocast, check_finite, point, to_device

GRAD_CLIP_PASSES = 3  # read every gradient for the norm; read and write it to scale


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 50
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = field(default=0.1, metadata={"min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "max_exclusive": 1})
    beta2: float = field(default=0.95, metadata={"min": 0, "max_exclusive": 1})
    grad_clip: float = field(default=1.0, metadata={"min": 0})  # 0 = no clipping
    eval_batches: int = field(default=4, metadata={"min": 0})
    # λ of L_MTP = (λ/D)·Σ_k L_MTP^k (V3 §2.2 eq. (25); V3 used 0.3, then 0.1 for its last 4.8T tokens).
    # Read only by cells with model.mtp ≥ 1, and only theirs carry it (cell identity).
    mtp_lambda: float = field(default=0.3, metadata={"min": 0})
    # adamw, or torch's Muon on the hidden matrices with AdamW for the rest (dsbench/optimizers.py);
    # left out of the cell's settings at adamw, so existing cell ids hold.
    optimizer: str = field(default="adamw", metadata={"choices": optimizers.OPTIMIZERS})


class Train(WholeSequences):
    name = "train"
    Settings = TrainSettings
    description = "AdamW steps on batch×seq tokens: forward, backward, optimizer"
    reads = ("measure",)
    trains = True
    expert_parallel = True

    def cells(self, section: TrainSettings, cfg) -> list[dict]:
        return [settings_for(section, cfg)]

    def flops_per_token(self, cfg, settings: dict) -> float:
        # Backward costs two forwards (activation and weight gradients): train = 3 × forward.
        return 3 * (super().flops_per_token(cfg, settings) + mtp.forward_flops_per_token(cfg, settings["seq_len"]))

    def mtp_flops_per_token(self, cfg, settings: dict) -> float:
        return 3 * mtp.forward_flops_per_token(cfg, settings["seq_len"])

    def data_lengths(self, section: TrainSettings) -> list[tuple[int, str]]:
        return [(section.seq_len, "train")] + ([(section.seq_len, "eval")] if section.eval_batches else [])

    def section_from_flags(self, flags) -> dict:
        return {"steps": flags.steps, "batch_size": flags.batch_size, "seq_len": flags.seq_len}

    def check(self, section, configs, read) -> None:
        limit, measure = configs[0][1].max_seq_len, read["measure"]
        if section.seq_len > limit:
            raise SpecError(f"train.seq_len: {section.seq_len} exceeds model.max_seq_len {limit}")
        check_mtp_rows("train.seq_len", section.seq_len, configs)
        for _, cfg in configs:  # a part's own training schedule (DSA's stages) must fit the steps
            for part in ("attention", "ffn"):
                if problem := registry.TABLES[part][getattr(cfg, part).kind].module.check_training(cfg, section.steps):
                    raise SpecError(problem)
        if measure.warmup >= section.steps:
            raise SpecError(f"measure.warmup: {measure.warmup} leaves no timed step of train.steps {section.steps}; use warmup < steps")

    def profiled(self, settings: dict, options) -> tuple[dict, int]:
        return {**settings, "steps": options.warmup + options.steps, "eval_batches": 0}, options.steps

    def add_step_costs(self, cell, costs: dict, add, act_bytes: int) -> None:
        if cell.model.mtp:  # the MTP modules' forward, priced by their own parts
            shape = PassShape(tokens=self.tokens_per_step(cell.workload), mean_context_len=self.mean_context_len(cell.workload),
                              decode=False, batch=cell.workload["batch_size"], act_bytes=act_bytes, weight_bytes=4)
            for name, cost in mtp.part_costs(cell.model, shape, cell.workload["seq_len"]).items():
                add_cost(costs, name, cost.flops, cost.bytes)
        for cost in costs.values():  # backward: 2× the forward's FLOPs and traffic
            cost.flops *= 3
            cost.bytes = None if cost.bytes is None else 3 * cost.bytes
        counts = decoder.param_counts(cell.model)
        params = counts["params_total"] + counts["params_mtp"]
        add("loss", 0.0, self.tokens_per_step(cell.workload) * cell.model.vocab_size * (act_bytes + 4) * 3)  # logits read, FP32 copy; its backward writes dlogits
        add("grad_clip", 0.0, GRAD_CLIP_PASSES * 4 * params)
        add("optimizer", 0.0, optimizers.state_passes(cell.workload, cell.model, params) * 4)

    def run(self, ctx: Context, settings: dict) -> WorkloadRun:
        model, B, T = ctx.model, settings["batch_size"], settings["seq_len"]
        model.train()
        optimizer = make_optimizer(model, settings)  # every parameter: a frozen one has no grad, which AdamW skips
        model.freeze_for_training()
        timer = StepTimer(ctx.device)
        clip = settings["grad_clip"] or math.inf
        row_losses, named_losses, grad_norms, domain_labels = [], [], [], []
        for step in range(settings["steps"]):
            inputs, targets, domains = to_device(ctx.data.batch(step, B, T), ctx.device)
            model.set_token_domains(domains, ctx.data.domains)
            model.begin_step(step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            with timer.step(record=step >= ctx.warmup):
                with autocast(ctx):
                    out = model.forward_losses(inputs, targets)
                    with part("loss"):
                        total = out.total(loss_weights(settings))
                with part("autograd"):
                    total.backward()
                    distributed.sync_gradients(model, ctx.ranks)  # data parallel over the ranks (none: a no-op)
                with part("grad_clip"):
                    grad_norms.append(distributed.clip_grad_norm(model, clip, ctx.ranks).detach())
                with part("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                model.after_optimizer_step()
            # Kept on the device and read once at the end: a per-step .item() would sync the GPU.
            row_losses.append(compiled.keep(out.lm_loss_per_row.detach()))
            named_losses.append({**{name: compiled.keep(loss.detach()) for name, loss in out.losses.items()},
                                 **{name: compiled.keep(value) for name, value in out.observed.items()}})
            domain_labels.append(domains)
        # (steps, B); a multi-process cell's every rank's rows, so losses are the global batch's
        losses = distributed.all_rows(torch.stack(row_losses).float().cpu(), ctx.ranks, dim=1)
        domain_labels = list(distributed.all_rows(torch.stack(domain_labels).cpu(), ctx.ranks, dim=1))
        run = WorkloadRun(distributed.timed_samples(timer, ctx.ranks, "the train cell"), self.tokens_per_step(settings), self.mean_context_len(settings))
        check_finite(losses.mean(dim=1), "train loss")
        run.series += _loss_series(losses, torch.stack(domain_labels), ctx.data.domains)
        run.series += _named_loss_series(named_losses)
        run.series += [point(s, "grad_norm", float(g)) for s, g in enumerate(torch.stack(grad_norms).cpu())]
        run.series += _step_time_series(timer.samples_s(), settings["steps"])
        tail = max(1, settings["steps"] // 10)
        run.summary["final_loss"] = float(losses[-tail:].mean())
        run.summary["first_loss"] = float(losses[0].mean())
        if model.cfg.mtp:  # the MTP losses apart from the main head's (V3 Table 4 compares the main head)
            run.summary["final_loss_mtp"] = float(torch.stack([step["mtp"] for step in named_losses[-tail:]]).float().mean())
        if ctx.observe and ctx.weights is not None and model.cfg.mtp:  # a speculative cell may reuse them
            key = ctx.weights.key(model.cfg.to_dict(), settings, settings["steps"])
            ctx.weights.save(key, model, {"final_loss": run.summary["final_loss"]})
        run.summary.update(_evaluate(ctx, settings, run.series))
        add_part_metrics(ctx, run)
        if ctx.observe:
            run.summary.update(_quantisation_stats(ctx, settings))
        return run


def lr_at(step: int, settings: dict) -> float:
    """Linear warm-up over the first 10% of steps (at least one), then constant."""
    ramp = max(1, settings["steps"] // 10)
    return settings["lr"] * min(1.0, (step + 1) / ramp)


def settings_for(section: TrainSettings, cfg) -> dict:
    """A train cell's settings: the section, less what its model does not read (mtp_lambda
    without MTP), so cells recorded before a setting existed keep their ids."""
    settings = dataclasses.asdict(section)
    if not cfg.mtp:
        settings.pop("mtp_lambda")
    if settings["optimizer"] == "adamw":
        settings.pop("optimizer")
    return settings


def loss_weights(settings: dict) -> dict[str, float]:
    """The weights of the named losses in the objective that are not 1: MTP's λ (V3 eq. (25))."""
    return {"mtp": settings["mtp_lambda"]} if "mtp_lambda" in settings else {}


def check_mtp_rows(key: str, seq_len: int, configs) -> None:
    """Module D trains on T − D positions of each row: at least one (V3 eq. (24))."""
    for _, cfg in configs:
        if cfg.mtp and seq_len <= cfg.mtp:
            raise SpecError(f"{key}: {seq_len} is too short for model.mtp {cfg.mtp}; MTP module {cfg.mtp} predicts "
                            f"{cfg.mtp + 1} tokens ahead, so use {key} > {cfg.mtp}")


def _named_loss_series(named_losses: list[dict]) -> list[tuple]:
    """Each named loss but "lm" per step, as `loss.<name>` ("lm" is the `loss` series); MTP's
    per-depth losses ("mtp.k") as `loss_mtp_depth` with index k. A loss only some steps have (DSA's
    indexer KL, absent from a staged training's dense steps) has points at those steps only."""
    rows = []
    for name in dict.fromkeys(n for step in named_losses for n in step if n != "lm"):
        steps = [s for s, step in enumerate(named_losses) if name in step]
        values = torch.stack([named_losses[s][name].float() for s in steps]).cpu()
        depth = name.removeprefix("mtp.")
        if depth != name and depth.isdigit():
            rows += [point(s, "loss_mtp_depth", float(v), index=int(depth)) for s, v in zip(steps, values)]
        else:
            rows += [point(s, f"loss.{name}", float(v)) for s, v in zip(steps, values)]
    return rows


def _quantisation_stats(ctx: Context, settings: dict) -> dict:
    """FP8 cells: SQNR of what each FP8 linear quantises (X, W, dY) and the bytes its FP8 cache of
    X saves, from one untimed forward and backward of the LM loss at the final weights on the next batch.
    Eager in a compiled cell too: the probe reads values on the host, which a compiled graph would
    recompile for (variants/fp8.py)."""
    with QuantisationProbe(ctx.model) as probe, compiled.uncompiled():
        if not probe.layers:
            return {}
        ctx.model.train()
        batch = ctx.data.batch(settings["steps"], settings["batch_size"], settings["seq_len"])
        inputs, targets, domains = to_device(batch, ctx.device)
        ctx.model.set_token_domains(domains, ctx.data.domains)
        with autocast(ctx):
            loss = ctx.model.forward_losses(inputs, targets).losses["lm"]
        loss.backward()
    ctx.model.zero_grad(set_to_none=True)
    return probe.summary()


def _step_time_series(samples_s: list[float], steps: int) -> list[tuple]:
    """`step_time_s` at each timed step (the last len(samples) steps; warm-up is untimed): with
    the `loss` series, optimizers and residuals compare at equal wall time as well as equal steps."""
    first = steps - len(samples_s)
    return [point(first + i, "step_time_s", float(t)) for i, t in enumerate(samples_s)]


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
    per_row, labels, depth_losses = [], [], []
    for i in range(settings["eval_batches"]):
        inputs, targets, domains = to_device(ctx.data.batch(i, settings["batch_size"], settings["seq_len"], split="eval"), ctx.device)
        ctx.model.set_token_domains(domains, ctx.data.domains)
        with autocast(ctx), ctx.model.observing():
            out = ctx.model.forward_losses(inputs, targets)
        per_row.append(out.lm_loss_per_row.float().cpu())
        depth_losses.append([float(v) for v in out.observed.values()])
        labels.append(domains)
    losses, labels = (distributed.all_rows(torch.cat(t), ctx.ranks) for t in (per_row, labels))
    step = settings["steps"]
    summary = {"eval_loss": float(losses.mean())}
    if ctx.model.cfg.mtp:  # each depth on the same held-out batches (equal-size batches: a mean of means)
        by_depth = torch.tensor(depth_losses).mean(dim=0)
        series += [point(step, "eval_loss_mtp_depth", float(v), index=k) for k, v in enumerate(by_depth, start=1)]
        summary["eval_loss_mtp"] = float(by_depth.mean())
    for d, name in enumerate(ctx.data.domains):
        if (labels == d).any():
            series.append(point(step, "eval_loss_by_domain", float(losses[labels == d].mean()), domain=name))
    series.append(point(step, "eval_loss", float(losses.mean())))
    check_finite(losses, "eval loss")
    return summary

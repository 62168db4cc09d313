"""The workload contract, and what every workload's run shares.

A workload (train, prefill, decode; later speculative decode, long-context) is one class,
registered once (dsbench/workloads/__init__.py `register`): its typed spec section and
description, how `run cell`'s flags fill that section, how the section expands into cells, the
shape part of a cell's label, the tokens and context a timed step processes, the KV-cache slots
it holds, its own spec checks, what its step costs beyond the model's forward (roofline), and
`run`. The spec, the CLI and the report iterate the registry; no harness file names a workload.
Cell settings stay plain dicts: they are part of the cell's identity, hashed into its id.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from dsbench.variants import decoder
from dsbench.variants.precision import Precision

if TYPE_CHECKING:
    from dsbench.task import ProfileOptions
    from dsbench.variants.config import ModelConfig

AddCost = Callable[..., None]  # add(part, flops_per_token=0.0, nbytes=0.0), as roofline.part_costs defines it


class Diverged(RuntimeError):
    """The loss or the logits became NaN or infinite."""


@dataclass
class WorkloadRun:
    step_times_s: list[float]  # timed samples only
    tokens_per_step: int
    mean_context_len: float  # keys each processed token attends to, on average (for FLOPs)
    summary: dict = field(default_factory=dict)  # workload-specific scalar results
    series: list[tuple] = field(default_factory=list)  # point(...) rows
    # The timed step ranges' total, where a sample is not one range (speculative: a round's
    # time ÷ the tokens it emitted); None: the samples' sum. The profiler checks its ranges against it.
    step_range_total_s: float | None = None


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
    weights: object = None  # a dsbench.checkpoints.WeightCache: trained weights to save and reuse; None: none
    ranks: object = None  # a dsbench.distributed.Ranks: this process is one rank of a multi-process cell; None: the only one


@dataclass(frozen=True)
class CellFlags:
    """The shape flags of `dsbench run cell`; each workload says which of its section's keys they set."""

    batch_size: int
    seq_len: int
    context_len: int
    new_tokens: int
    steps: int


class Workload(ABC):
    """One workload. `settings` below is a cell's settings dict (what `cells` returned);
    `section` is the typed spec section `[<name>]`, an instance of `Settings`; `read` holds the
    other sections named in `reads` (and only those)."""

    name: ClassVar[str]  # the axes.workload value and the spec section's key
    Settings: ClassVar[type]  # frozen dataclass: fields, defaults and bounds (metadata) drive validation
    description: ClassVar[str] = ""  # one line: what a cell of it times
    reads: ClassVar[tuple[str, ...]] = ()  # other spec sections its cells or checks read (speculative: train's)
    expert_parallel: ClassVar[bool] = False  # its routed FFN cells run over [parallel] ep ranks
    redundant_experts: ClassVar[bool] = False  # EPLB replicas ([parallel] redundant_experts) apply to its cells
    trains: ClassVar[bool] = False  # backward + optimizer: FP32 master weights under autocast, 3× forward FLOPs
    decodes: ClassVar[bool] = False  # timed tokens come one at a time from the KV cache
    context_curve: ClassVar[bool] = False  # its cells sweep context_len: the report's KV-and-speed-vs-context figure
    # "module:function" of a report section of its own, (ReportData, tables_dir) → Section | None (None when the
    # results hold nothing for it); imported only when a report is built, and its figures register then
    report_section: ClassVar[str | None] = None
    trains_first: ClassVar[bool] = False  # trains its model before the timed work: built in FP32 like a train cell
    cache_copies: ClassVar[int] = 1  # KV caches of cache_slots alive at once (the memory estimate)

    @abstractmethod
    def cells(self, section, cfg: ModelConfig) -> list[dict]:
        """The cell settings this section expands to for one model config."""

    def cells_for(self, section, cfg: ModelConfig, read: dict) -> list[dict]:
        """The cells of this workload in a spec (a workload that reads other sections overrides this)."""
        return self.cells(section, cfg)

    def section_from_flags(self, flags: CellFlags) -> dict:
        """The [<name>] keys `dsbench run cell`'s flags set (a TOML table, validated as one)."""
        return {}

    @abstractmethod
    def shape_label(self, settings: dict) -> str:
        """The shape part of the cell's label (`b4×t16`, `b4×ctx128+32`)."""

    @abstractmethod
    def tokens_per_step(self, settings: dict) -> int:
        """Tokens one timed sample processes (throughput = this / step time)."""

    @abstractmethod
    def mean_context_len(self, settings: dict) -> float:
        """Keys a processed token attends to on average (a token at position p attends p+1)."""

    def cache_slots(self, settings: dict) -> int:
        """Positions a batch row's KV cache holds (0: the workload keeps no cache)."""
        return 0

    def row_columns(self, cfg: ModelConfig, settings: dict, kv_bytes_per_token: int) -> dict:
        """Extra result columns this workload's cells carry (decode's max-batch fit)."""
        return {}

    def flops_per_token(self, cfg: ModelConfig, settings: dict) -> float:
        """Model FLOPs per processed token (decoder.FLOP_CONVENTION)."""
        return decoder.forward_flops_per_token(cfg, self.mean_context_len(settings), decode=self.decodes)

    def mtp_flops_per_token(self, cfg: ModelConfig, settings: dict) -> float:
        """The share of flops_per_token the MTP modules run (0: they run only where a workload trains them)."""
        return 0.0

    @abstractmethod
    def data_lengths(self, section) -> list[tuple[int, str]]:
        """(tokens per row, data split) the data must supply for this section's cells."""

    def check(self, section, configs: list[tuple[dict, ModelConfig]], read: dict) -> None:
        """Raise SpecError (one line) for a section the model cannot run; configs: (axes, model
        config) of this workload's cells."""

    def profiled(self, settings: dict, options: ProfileOptions) -> tuple[dict, int]:
        """(settings, repeats) of the profiled pass: the cell's shapes, fewer steps."""
        return dict(settings), options.steps

    def add_step_costs(self, cell, costs: dict, add: AddCost, act_bytes: int) -> None:
        """Roofline: what the step runs besides the model's forward (costs: part → PartCost)."""

    @abstractmethod
    def run(self, ctx: Context, settings: dict) -> WorkloadRun:
        """Run the cell: timed step samples (warm-up excluded) and the series it observed."""


class WholeSequences(Workload, ABC):
    """A step processes batch_size rows of seq_len tokens each, all positions at once (train, prefill)."""

    def shape_label(self, settings: dict) -> str:
        return f"{batch_label(settings)}×t{settings['seq_len']}"

    def tokens_per_step(self, settings: dict) -> int:
        return settings["batch_size"] * settings["seq_len"]

    def mean_context_len(self, settings: dict) -> float:
        return (settings["seq_len"] + 1) / 2


def batch_label(settings: dict) -> str:
    return f"b{settings['batch_size']}"


def autocast(ctx: Context):
    dtype = ctx.precision.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=dtype)


def to_device(batch, device):
    return (batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True), batch.domains)


def add_part_metrics(ctx: Context, run: WorkloadRun) -> None:
    """Series and columns the model's parts observed themselves (routing balance, …)."""
    if not ctx.observe:
        return
    records, columns = ctx.model.collect_metrics()
    run.series += [point(**r) for r in records]
    run.summary.update(columns)


def check_finite(values: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        where = int(torch.nonzero(bad.flatten())[0])
        raise Diverged(f"{what} is not finite (first at index {where}: {values.flatten()[where].item()})")

"""The variant contract: what an attention or FFN variant owns, documented in one place.

A variant is one module class plus its config class, registered in one line (registry.py, or
`registry.register` from a plugin). The harness never asks which variant it holds; it calls:

| member | attention | FFN | used by |
|---|---|---|---|
| `Config` (a frozen dataclass, `kind` first) | its fields | its fields | spec validation, cell identity |
| `param_count(cfg[, layer])` | ✓ | ✓ | params_total |
| `active_param_count(cfg, layer)` | = param_count | ✓ | params_active |
| `flops_per_token(cfg, ...)` forward, 2 per multiply-add | `(cfg, context_len, decode)` | `(cfg, layer)` | flops_per_token, MFU |
| `kv_cache_bytes_per_token(cfg, dtype_bytes)` and `new_cache(...)` | ✓ | — | KV columns, memory estimate, max-batch fit, decode |
| `kv_cache_bytes(cfg, dtype_bytes, context_len)` one row's cache at that context (default: context × per token) | ✓ | — | memory estimate, max-batch fit, KV bytes against context |
| `layer_config(cfg, layer)` the config layer `layer` is built and priced from (default: cfg) | ✓ | — | per-layer schedules (V4's compress_ratios) |
| `train_activations(cfg, seq_len)` → `Activations` (wide, narrow, fp32 elements per token) | ✓ | ✓ | memory estimate (train) |
| `inference_activations(cfg, seq_len)` → int elements per token | ✓ | ✓ | memory estimate (prefill, decode) |
| `part_costs` FLOPs and bytes per step by part | `(cfg, shape)` | `(cfg, layer, shape)` | roofline (profile) |
| `row_columns(cfg)` extra result columns | ✓ | ✓ | cells.parquet |
| `metric_columns()` the dsbench.metrics.Metric of every column it adds (row_columns, `metrics`) | ✓ | ✓ | the metric registry, reports, check |
| `kernel_families(cfg, decodes)` the op families its forward calls (kernels/choice.py) | ✓ | ✓ | `kernels.*` axes, dry-run |
| `check_config(cfg)` first problem as one line naming the field, or None | ✓ | ✓ | spec validation (exit 2) |
| `build(cfg, layer)` the module for one layer | default: `cls(cfg)` | default: `cls(cfg, layer)` | decoder |
| `routed` (class flag) and `balances` (the `balance` values it implements) | — | routed FFNs | the balance axis |
| `layout(cfg)` → `Layout` (experts per routed layer), None if not routed | — | routed FFNs | expert parallelism, EPLB |
| `check_parallel(cfg, ep, redundant)` first problem as one line, or None | — | routed FFNs (default: refuses ep > 1) | spec validation |
| `rank_param_count(cfg, layer, ep, redundant)` what one expert-parallel rank holds | — | default: all | memory estimate |

`cfg` is always the whole model config (variants/config.py ModelConfig): the part's own fields
are `cfg.attention` / `cfg.ffn`, the model's `cfg.d_model`, `cfg.n_layers`, ... A hook that raises
or returns the wrong type at spec time is reported as one line naming the variant and the hook.

Optional hooks (defaults do nothing), read by the decoder after each forward or step:
`aux_loss` (a training loss the part left from its last forward, or None), `metrics(layer)`
(series records and cell columns, read once at the end of a cell), `after_optimizer_step()`
(non-gradient state such as a routing bias), `set_token_domains(domains_B, names)`,
`begin_step(step)` (a training schedule of the part's own: DSA's staged continued pre-training),
and the static `check_training(cfg, steps)` (that schedule against train.steps, at spec time).

The FLOP convention is variants/decoder.py FLOP_CONVENTION; a variant's `part_costs` FLOPs sum
exactly to its `flops_per_token` (tests/test_contract.py walks the registry and checks this,
the parameter counts against the instantiated module, and cached decode against the full forward).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


def choices(default: str, *allowed: str):
    """A config str field with a fixed set of values (spec validation reads the metadata)."""
    return field(default=default, metadata={"choices": allowed})


def at_least(default, minimum):
    """A config numeric field with a lower bound below the default one (positive)."""
    return field(default=default, metadata={"min": minimum})


@dataclass(frozen=True)
class PartConfig:
    """The config of one part (attention or FFN); each variant subclasses it with its own fields.
    `kind` is the axis value that built it; the fields are exactly what the variant reads, so the
    cell identity (their asdict) never holds a setting the cell does not use."""

    kind: str
    # Fields added after cells were first recorded, with their defaults: left out of the cell's
    # identity at those values, so existing cell ids hold (ModelConfig.to_dict).
    LATE_DEFAULTS: ClassVar[dict] = {}

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for name, default in self.LATE_DEFAULTS.items():
            if d.get(name) == default:
                d.pop(name)
        return d


@dataclass(frozen=True)
class PassShape:
    """What one measured step pushes through a layer, for per-part costs."""

    tokens: int  # N: tokens processed per step
    mean_context_len: float  # keys a token attends to, on average
    decode: bool  # tokens come one at a time from a cache (each step reads the whole cache)
    batch: int  # rows whose caches a decode step reads
    act_bytes: int  # bytes of an activation element
    weight_bytes: int  # bytes of a weight element as the pass reads it


@dataclass(frozen=True)
class Layout:
    """A routed FFN's experts per routed layer, as the harness sizes them (memory estimate,
    expert parallelism, EPLB); a routed variant's `layout(cfg)` returns it."""

    n_routed: int  # E
    top_k: int  # K routed experts per token
    expert_d_ff: int  # F
    shared_d_ff: int  # K_s · F, one fused SwiGLU (the sum of K_s experts is one wider FFN)
    expert_groups: int = 1  # G: group-limited routing's groups (V3 §2.1.2); EPLB packs a group per node


@dataclass(frozen=True)
class Activations:
    """Elements per token that one layer's part keeps for its backward, by the dtype they are
    kept in (the memory estimate multiplies each by its element size)."""

    wide: int = 0  # model-width tensors: FP32 under autocast (it runs norms in FP32), else the activation dtype
    narrow: int = 0  # in the activation dtype
    fp32: int = 0  # FP32 whatever the precision (router logits and scores, softmax over selected keys)

    def __add__(self, other: Activations) -> Activations:
        return Activations(self.wide + other.wide, self.narrow + other.narrow, self.fp32 + other.fp32)


@dataclass
class PartCost:
    """FLOPs and compulsory bytes of one part per step; bytes None: no analytic count (time only)."""

    flops: float = 0.0
    bytes: float | None = 0.0

    def add(self, flops: float = 0.0, nbytes: float = 0.0) -> None:
        self.flops += flops
        self.bytes = None if self.bytes is None else self.bytes + nbytes


def add_cost(costs: dict[str, PartCost], part: str, flops: float = 0.0, nbytes: float = 0.0) -> None:
    costs.setdefault(part, PartCost()).add(flops, nbytes)


def linear_io(shape: PassShape, width_in: int, width_out: int) -> float:
    """Activation bytes a weight matmul moves per step: it reads its input and writes its output."""
    return shape.tokens * (width_in + width_out) * shape.act_bytes


class Part(nn.Module):
    """What attention and FFN variants share: the optional hooks, as no-ops."""

    Config: ClassVar[type[PartConfig]]
    aux_loss: torch.Tensor | None = None

    def metrics(self, layer: int) -> tuple[list[dict], dict] | None:
        """Read once at the end of a cell: (series records, summary), or None.

        records: dicts {step, metric, value} with optional layer, index (an expert) and domain,
        one series.parquet row each. summary: a routed layer's balance summary as
        variants/balance.py `routing_metrics` returns it (the decoder combines the layers' into
        maxvio_global and the other balance columns), and/or "columns": {name: value}, the part's
        own cell columns (numbers averaged over the layers giving them; text that differs between
        layers becomes "mixed"). Every column named here is declared in `metric_columns()`."""
        return None

    def after_optimizer_step(self) -> None:
        return None

    def set_token_domains(self, domains_B: torch.Tensor, names: tuple[str, ...]) -> None:
        return None

    def set_observing(self, on: bool) -> None:
        """Inside Decoder.observing(): forwards where a costly measurement may run."""
        return None

    def named_losses(self) -> dict[str, torch.Tensor]:
        """Training losses of their own name the last forward left (DSA's "indexer_kl"); the
        decoder averages each over the parts that give it."""
        return {}

    def begin_step(self, step: int) -> None:
        """Before training step `step` (0-based): a part whose training has stages switches here."""
        return None

    @staticmethod
    def check_training(cfg, steps: int) -> str | None:
        """The part's own training schedule against train.steps: the first problem as one line, or None."""
        return None

    def only_trains(self) -> list[nn.Parameter] | None:
        """The parameters training may update, where a part asks that nothing else train (DSA's
        dense warm-up: the indexer alone); None: no such request."""
        return None

    @staticmethod
    def row_columns(cfg) -> dict:
        return {}

    @staticmethod
    def kernel_families(cfg, decodes: bool) -> tuple[str, ...]:
        """The op families (dsbench/kernels/choice.py) this part's forward calls in a cell that
        decodes (or not): a `kernels.<family>` axis applies to the cell only then."""
        return ()

    @staticmethod
    def check_config(cfg) -> str | None:
        return None

    @staticmethod
    def train_activations(cfg, seq_len: int) -> Activations:
        """Per token, what one layer's part keeps for the backward (memory estimate)."""
        raise NotImplementedError

    @staticmethod
    def inference_activations(cfg, seq_len: int) -> int:
        """Per token, the elements of the part's largest live set in a forward without autograd,
        in the activation dtype (memory estimate)."""
        raise NotImplementedError

    @staticmethod
    def metric_columns() -> tuple:
        """The result columns this part's rows add (dsbench.metrics.Metric entries: row_columns'
        and the `metrics` hook's names), registered with the variant."""
        return ()


class Attention(Part):
    """An attention variant: forward(x, start_pos, cache) over (B, T, C), and its cache."""

    # A call at an earlier start_pos overwrites the cache correctly (speculative decoding rolls
    # back rejected drafts so); False where the cache carries state across positions (V4's
    # compressors fold tokens into entries as they arrive).
    cache_rewinds: ClassVar[bool] = True

    @classmethod
    def build(cls, cfg, layer_idx: int) -> nn.Module:
        return cls(cfg)

    @classmethod
    def active_param_count(cls, cfg, layer_idx: int = 0) -> int:
        return cls.param_count(cfg)

    @staticmethod
    def layer_config(cfg, layer_idx: int):
        """The model config layer `layer_idx`'s attention is built and priced from. A schedule
        (variants/v4_attention.py V4HybridAttention) returns another registered kind's config per
        layer; the harness asks every accounting hook of that kind, never this class's."""
        return cfg

    @staticmethod
    def param_count(cfg) -> int:
        raise NotImplementedError

    @staticmethod
    def flops_per_token(cfg, context_len: float, decode: bool = False) -> float:
        raise NotImplementedError

    @staticmethod
    def kv_cache_bytes_per_token(cfg, dtype_bytes: int) -> int:
        raise NotImplementedError

    @classmethod
    def kv_cache_bytes(cls, cfg, dtype_bytes: int, context_len: int) -> float:
        """One batch row's cache in this layer after context_len tokens. Default: a cache that
        grows by the same bytes every token; one with a constant part (a window, an open
        compression window) states it."""
        return context_len * cls.kv_cache_bytes_per_token(cfg, dtype_bytes)

    @staticmethod
    def part_costs(cfg, shape: PassShape) -> dict[str, PartCost]:
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int, dtype, device) -> nn.Module:
        raise NotImplementedError


class FeedForward(Part):
    """An FFN variant: forward(x) over (B, T, C). `routed` variants take the balance axis and
    state their experts (`layout`), the balance values they implement and their expert-parallel
    checks; a plain FFN keeps the defaults."""

    routed: ClassVar[bool] = False
    balances: ClassVar[tuple[str, ...]] = ("none",)  # the `balance` values it implements (registry.BALANCE)

    @staticmethod
    def layout(cfg) -> Layout | None:
        """A routed FFN's experts per routed layer; None: no routed experts."""
        return None

    @staticmethod
    def check_parallel(cfg, ep: int, redundant: int) -> str | None:
        """Can ep expert-parallel ranks (plus `redundant` EPLB replicas) hold this FFN? The first
        problem as one line, or None. A routed FFN that shards its experts overrides this."""
        return (f"ffn = {cfg.ffn.kind}: parallel.ep = {ep} needs expert parallelism, which this variant does not "
                f"implement (FeedForward.check_parallel); use parallel.ep = 1")

    @classmethod
    def rank_param_count(cls, cfg, layer_idx: int, ep: int, redundant: int) -> int:
        """The parameters one of ep expert-parallel ranks holds of this layer (default: all)."""
        return cls.param_count(cfg, layer_idx)

    @classmethod
    def build(cls, cfg, layer_idx: int) -> nn.Module:
        return cls(cfg, layer_idx)

    @staticmethod
    def param_count(cfg, layer_idx: int = 0) -> int:
        raise NotImplementedError

    @staticmethod
    def active_param_count(cfg, layer_idx: int = 0) -> int:
        raise NotImplementedError

    @staticmethod
    def flops_per_token(cfg, layer_idx: int = 0) -> float:
        raise NotImplementedError

    @staticmethod
    def part_costs(cfg, layer_idx: int, shape: PassShape) -> dict[str, PartCost]:
        raise NotImplementedError

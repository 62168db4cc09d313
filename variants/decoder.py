"""The decoder-only transformer assembled from a ModelConfig, and its exact accounting.

Legend: B batch, T tokens in this call, C model width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import mtp, registry
from .balance import combine_layers
from .block import Block
from .config import ModelConfig
from .layers import RMSNorm
from .profiling import part


@dataclass
class ModelOutput:
    """What a forward with targets gives every workload that takes a loss (train, eval, probes)."""

    logits: torch.Tensor  # (B, T, V)
    losses: dict[str, torch.Tensor]  # named scalars: "lm" (mean cross-entropy), "aux" (MoE balance), "mtp", …
    lm_loss_per_row: torch.Tensor  # (B,) fp32: the harness reports loss by each row's data domain
    observed: dict[str, torch.Tensor] = field(default_factory=dict)  # recorded, not trained on ("mtp.1", …)

    def total(self, weights: dict[str, float] | None = None) -> torch.Tensor:
        """The training objective: Σ weight·loss over the named losses (weight 1 unless given)."""
        weights = weights or {}
        terms = (weights[name] * loss if name in weights else loss for name, loss in self.losses.items())
        return functools.reduce(operator.add, terms)


def lm_loss_per_row(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) → (B,) mean cross-entropy per row, in fp32."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape).mean(dim=1)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.residual = registry.RESIDUAL[cfg.residual].ends(cfg)  # embeddings → streams → one state
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # The output head stays a plain high-precision linear in every recipe (DeepSeek-V3 §3.3.1).
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = mtp.MultiTokenPrediction(cfg) if cfg.mtp else None  # V3 §2.2; shares embed and head
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def new_caches(self, batch: int, max_len: int, dtype: torch.dtype, device) -> list:
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        return [block.attn.new_cache(batch, max_len, dtype, device) for block in self.blocks]

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches: list | None = None) -> torch.Tensor:
        """tokens (B, T) at positions start_pos… → logits (B, T, V); fills caches when given."""
        h = self.hidden(tokens, start_pos, caches)
        with part("lm_head", self.head):
            return self.head(h)  # (B, T, V)

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0, caches: list | None = None) -> torch.Tensor:
        """The final normed hidden states (B, T, C) the head reads (and MTP's first module)."""
        T = tokens.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(
                f"positions up to {start_pos + T} exceed max_seq_len {self.cfg.max_seq_len}; "
                "raise model.max_seq_len or shorten the context"
            )
        with part("embedding", self.embed):
            x = self.embed(tokens)  # (B, T, C)
        x = self.residual.enter(x)  # mHC: (B, T, N, C)
        for i, block in enumerate(self.blocks):
            with part("block.other", block):  # the block's call and glue; its parts open their own ranges
                x = block(x, start_pos, caches[i] if caches is not None else None)
        return self.norm(self.residual.leave(x))

    def forward_losses(self, tokens: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        """forward() from position 0 without caches, and the named losses against targets (B, T).

        A part that adds a training loss (MTP, an indexer's KL) adds its name here; train sums
        the dict, so no workload changes. "lm" is the main head's loss alone, whatever else trains.
        MTP: losses["mtp"] = (1/D)·Σ_k L_MTP^k, weighted by λ in the total (V3 eq. (25)); each
        depth's loss is in `observed` as "mtp.k"."""
        h = self.hidden(tokens)
        with part("lm_head", self.head):
            logits = self.head(h)
        with part("loss"):
            per_row = lm_loss_per_row(logits, targets)
        losses, observed = {"lm": per_row.mean()}, {}
        if self.mtp is not None:
            depth_losses = self.mtp.losses(h, tokens, targets, self.embed, self.head)
            observed = {f"mtp.{k}": loss.detach() for k, loss in enumerate(depth_losses, start=1)}
            losses["mtp"] = torch.stack(depth_losses).mean()
        aux = self.aux_loss()
        if aux is not None:
            losses["aux"] = aux
        losses.update(self.part_losses())
        return ModelOutput(logits, losses, per_row, observed)

    def part_losses(self) -> dict[str, torch.Tensor]:
        """Each named loss the parts left (Part.named_losses), averaged over the parts giving it."""
        by_name: dict[str, list[torch.Tensor]] = {}
        for _, p in self.parts():
            for name, loss in p.named_losses().items():
                by_name.setdefault(name, []).append(loss)
        return {name: torch.stack(values).mean() for name, values in by_name.items()}

    def freeze_for_training(self) -> None:
        """Where parts ask to train alone (Part.only_trains), every other parameter is frozen;
        where none asks, every parameter trains."""
        requested = [p.only_trains() for _, p in self.parts()]
        keep = None if all(r is None for r in requested) else {id(param) for r in requested if r is not None for param in r}
        for param in self.parameters():
            param.requires_grad_(keep is None or id(param) in keep)

    def begin_step(self, step: int) -> None:
        """Before each training step: parts with staged training switch stage, and what trains follows."""
        def training_sets():
            return [None if r is None else [id(param) for param in r] for r in (p.only_trains() for _, p in self.parts())]

        before = training_sets()
        for _, p in self.parts():
            p.begin_step(step)
        if training_sets() != before:
            self.freeze_for_training()

    def parts(self):
        """Every part module (attention and FFN of each block) with its layer index; the
        optional hooks of variants/base.py are called on these."""
        for i, block in enumerate(self.blocks):
            yield i, block.attn
            yield i, block.ffn
        if self.mtp is not None:
            yield from self.mtp.parts(self.cfg.n_layers)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the extra training losses the parts left from the last forward (MoE balance)."""
        losses = [p.aux_loss for _, p in self.parts() if p.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def set_token_domains(self, domains_B: torch.Tensor, names: tuple[str, ...]) -> None:
        """Tell the parts each row's data domain, for routing-by-domain metrics."""
        for _, p in self.parts():
            p.set_token_domains(domains_B, names)

    def collect_metrics(self) -> tuple[list[dict], dict]:
        """(series records {step, metric, value, layer?, index?, domain?}, cell columns) from
        the parts that observe themselves (routed FFNs); read once, at the end of a cell."""
        records, per_layer, own = [], [], {}
        for i, p in self.parts():
            if i >= self.cfg.n_layers:  # MTP's layers: balance columns stay comparable across mtp values
                continue
            observed = p.metrics(i)
            if observed is not None:
                layer_records, summary = observed
                records += layer_records
                summary = dict(summary)
                own_columns = summary.pop("columns", None)  # a part's own columns, combined over layers
                for name, value in (own_columns or {}).items():
                    own.setdefault(name, []).append(value)
                if own_columns is None or summary:
                    per_layer.append(summary)
        combined_records, columns = combine_layers(per_layer)
        columns.update({name: _over_layers(values) for name, values in own.items()})
        return records + combined_records, columns

    @contextlib.contextmanager
    def observing(self):
        """Forwards in which parts may measure what is too costly for a timed step (DSA's kept
        attention mass): the held-out evaluation."""
        for _, p in self.parts():
            p.set_observing(True)
        try:
            yield
        finally:
            for _, p in self.parts():
                p.set_observing(False)

    def after_optimizer_step(self) -> None:
        """Let parts with non-gradient state (e.g. a routing bias) update after each step."""
        for _, p in self.parts():
            p.after_optimizer_step()


def _over_layers(values: list):
    """A part's own column over the layers giving it: the mean of numbers; text that differs
    between layers is "mixed"."""
    if all(isinstance(v, str) for v in values):
        return values[0] if len(set(values)) == 1 else "mixed"
    return sum(values) / len(values)


def build_model(cfg: ModelConfig) -> Decoder:
    return Decoder(cfg)


# --- accounting: exact and analytic, summed from each part's own formula ---

FLOP_CONVENTION = (
    "2 FLOPs per multiply-add; forward = 2·(activated matmul params, LM head included, embedding "
    "lookup and norms excluded) + attention scores and AV per layer at the mean causal context "
    "(causal halving: a token at position p attends p+1 keys); train = 3 × forward; decode counts "
    "the path that runs (MLA absorbed: scores and AV over the latent)"
)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    attention = registry.attention_layers(cfg)
    ffn = registry.FFN[cfg.ffn.kind].module
    norm = RMSNorm.param_count(cfg.d_model)
    residual = registry.RESIDUAL[cfg.residual]
    # two connections per block, and the ends (mHC's HyperHead): the overhead a row shows
    mixing = 2 * cfg.n_layers * residual.connection.param_count(cfg) + residual.ends.param_count(cfg)
    embedding = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
    layers = range(cfg.n_layers)
    attn = [module.param_count(layer_cfg) for module, layer_cfg in attention]
    blocks_total = sum(attn[i] + ffn.param_count(cfg, i) + 2 * norm for i in layers)
    blocks_active = sum(attn[i] + ffn.active_param_count(cfg, i) + 2 * norm for i in layers)
    return {
        "params_total": embedding + blocks_total + mixing + norm + head,
        "params_active": embedding + blocks_active + mixing + norm + head,
        "params_embedding": embedding,
        "params_mtp": mtp.param_count(cfg),  # apart, as V3's 671B excludes its MTP module (§2.2)
    }


def forward_flops_per_token(cfg: ModelConfig, mean_context_len: float, decode: bool = False) -> float:
    """decode: the token is generated from the cache (MLA's absorbed path attends differently)."""
    ffn = registry.FFN[cfg.ffn.kind].module
    attn = [module.flops_per_token(layer_cfg, mean_context_len, decode) for module, layer_cfg in registry.attention_layers(cfg)]
    residual = registry.RESIDUAL[cfg.residual]
    mixing = 2 * residual.connection.flops_per_token(cfg)  # around attention and around the FFN
    per_layer = sum(attn[i] + ffn.flops_per_token(cfg, i) + mixing for i in range(cfg.n_layers))
    return per_layer + residual.ends.flops_per_token(cfg) + 2 * cfg.d_model * cfg.vocab_size


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> float:
    """What one more token of context adds to the cache, all layers (a cache with a constant
    part, V4's window, grows by this only: kv_cache_bytes has the whole)."""
    return sum(module.kv_cache_bytes_per_token(layer_cfg, dtype_bytes) for module, layer_cfg in registry.attention_layers(cfg))


def kv_cache_bytes(cfg: ModelConfig, dtype_bytes: int, context_len: int) -> float:
    """One batch row's cache after context_len tokens, all layers."""
    return sum(module.kv_cache_bytes(layer_cfg, dtype_bytes, context_len) for module, layer_cfg in registry.attention_layers(cfg))


def weight_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Bytes of every parameter held in one dtype (a tied head counted once)."""
    return param_counts(cfg)["params_total"] * dtype_bytes

"""Multi-Token Prediction (DeepSeek-V3 2412.19437 §2.2): D sequential modules, module k
predicting the token k+1 places ahead of each position; their training loss, their exact
accounting, and greedy self-speculative decoding with them (V3 §5.4.3).

The layout follows DeepSeek's released weights as vLLM and SGLang load them
(`model.layers.{n_layers + k - 1}`: enorm, hnorm, eh_proj, a decoder layer, shared_head.norm):
- module k's input is eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i^{k-1})]): the embedding half
  first, as the checkpoint's eh_proj is laid out (the paper writes the two halves the other way);
- h_i^0 is the main model's output after its final RMSNorm (what the served models pass on);
- the transformer block is the cell's own attention and FFN variants (a routed FFN: the MTP
  layer's index is past first_k_dense, so it is routed, as V3's is);
- the embedding and the output head are the main model's, shared; each module has its own
  norm before the head (shared_head.norm).
Module k's sequence is the main positions 0 … T−k−1, RoPE at those positions: position i holds
h_i^{k-1} and t_{i+k} and predicts t_{i+k+1}, so nothing at a position after i+k reaches it.

Legend: B batch, T tokens, C model width, V vocabulary, D = cfg.mtp modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .base import PassShape, PartCost, add_cost, linear_io
from .block import Block
from .layers import RMSNorm
from .profiling import part

if TYPE_CHECKING:
    from .config import ModelConfig

MAX_DEPTH = 8  # model.mtp's bound: V3 uses D = 1; a deeper chain is an experiment, not a default


class MTPModule(nn.Module):
    """Module k of V3 eq. (21)–(23): h'_i^k = M_k[RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})],
    h^k = TRM_k(h'^k), P^k = OutHead(RMSNorm(h^k))."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        C = cfg.d_model
        self.depth = depth
        self.enorm = RMSNorm(C, cfg.norm_eps)
        self.hnorm = RMSNorm(C, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * C, C, bias=False)  # M_k, V3 eq. (21)
        self.block = Block(cfg, layer_index(cfg, depth))  # TRM_k, V3 eq. (22)
        self.norm = RMSNorm(C, cfg.norm_eps)  # OutHead's norm, one per module (shared_head.norm)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        """h_prev (B, T, C) = h^{k-1} at positions start_pos…, emb (B, T, C) = Emb(t_{i+k}) → h^k (B, T, C)."""
        with part("mtp", self):
            x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.block(x, start_pos, cache)


def layer_index(cfg: ModelConfig, depth: int) -> int:
    """The MTP block's layer index (V3's MTP layer 61 follows its 61 main layers)."""
    return cfg.n_layers + depth - 1


class MultiTokenPrediction(nn.Module):
    """The D modules in their causal chain; the embedding and head are the caller's (shared)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.depths = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.mtp + 1))

    def logits(self, h0: torch.Tensor, tokens: torch.Tensor, embed: nn.Module, head: nn.Module) -> list[torch.Tensor]:
        """P^k for k = 1…D (V3 eq. (21)–(23)), each (B, T−k, V): module k at position i reads
        h_i^{k-1} and tokens[:, i+k] and predicts the token at i+k+1. h0 (B, T, C) is the main
        model's normed output."""
        T = tokens.shape[1]
        h, out = h0, []
        for k, module in enumerate(self.depths, start=1):
            with part("embedding", embed):
                emb = embed(tokens[:, k:])  # (B, T−k, C): Emb(t_{i+k})
            h = module(h[:, :T - k], emb)  # (B, T−k, C)
            with part("lm_head", head):
                out.append(head(module.norm(h)))
        return out

    def losses(self, h0: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, embed: nn.Module, head: nn.Module) -> list[torch.Tensor]:
        """L_MTP^k for k = 1…D (V3 eq. (24)): mean cross-entropy of module k over its T−k positions,
        against targets[:, k:] (targets[:, i] = t_{i+1})."""
        out = []
        for k, logits in enumerate(self.logits(h0, tokens, embed, head), start=1):
            with part("loss"):
                out.append(F.cross_entropy(logits.float().flatten(0, 1), targets[:, k:].flatten()))
        return out

    def parts(self, n_layers: int):
        """(layer index, part) of each module's attention and FFN, after the main layers'."""
        for k, module in enumerate(self.depths, start=1):
            yield n_layers + k - 1, module.block.attn
            yield n_layers + k - 1, module.block.ffn


@torch.no_grad()
def draft_agreement(model, tokens: torch.Tensor) -> list[float]:
    """Per depth k, on a text (B, T) read with its own tokens (teacher forcing): the share of
    positions i where module k's argmax (its draft of t_{i+k+1}) equals the main model's argmax
    after position i+k — the acceptance of draft k on that text, free of the loops that greedy
    generation of a small model falls into."""
    h0 = model.hidden(tokens)
    main = model.head(h0).argmax(dim=-1)  # (B, T): the main model's token after each position
    rates = []
    for k, logits in enumerate(model.mtp.logits(h0, tokens, model.embed, model.head), start=1):
        rates.append(float((logits.argmax(dim=-1) == main[:, k:]).float().mean()))
    return rates


def check_config(cfg: ModelConfig) -> str | None:
    if not 0 <= cfg.mtp <= MAX_DEPTH:
        return f"model.mtp: {cfg.mtp} is out of range; allowed: 0 (no MTP) to {MAX_DEPTH}"
    return None


# --- accounting: exact, from each part's own formula ---


def _parts(cfg: ModelConfig, depth: int):
    """Module `depth`'s attention class, the config it is priced from, and the FFN class."""
    return *registry.attention_layer(cfg, layer_index(cfg, depth)), registry.FFN[cfg.ffn.kind].module


def param_count(cfg: ModelConfig) -> int:
    """The MTP modules' own parameters; the shared embedding and head are the main model's.
    (V3's 14B MTP module counts its stored copies of both: dsbench.claims checks that figure.)"""
    norm = RMSNorm.param_count(cfg.d_model)
    total = 0
    for k in range(1, cfg.mtp + 1):
        attn, attn_cfg, ffn = _parts(cfg, k)
        total += 3 * norm + 2 * cfg.d_model * cfg.d_model + 2 * norm + attn.param_count(attn_cfg) + ffn.param_count(cfg, layer_index(cfg, k))
    return total


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the D modules per main-model token of a seq_len-token training row
    (decoder.FLOP_CONVENTION): module k runs T−k positions at mean causal context (T−k+1)/2."""
    total = 0.0
    for k in range(1, cfg.mtp + 1):
        attn, attn_cfg, ffn = _parts(cfg, k)
        n = seq_len - k
        per_position = (2 * 2 * cfg.d_model * cfg.d_model + attn.flops_per_token(attn_cfg, (n + 1) / 2)
                        + ffn.flops_per_token(cfg, layer_index(cfg, k)) + 2 * cfg.d_model * cfg.vocab_size)
        total += per_position * n / seq_len
    return total


def part_costs(cfg: ModelConfig, shape: PassShape, seq_len: int) -> dict[str, PartCost]:
    """Roofline FLOPs and bytes of the modules' forward over a step of shape.tokens main tokens
    in rows of seq_len: each module's attention and FFN priced by their variants, its eh_proj
    as `mtp`, its head as `lm_head`."""
    costs: dict[str, PartCost] = {}
    C, V = cfg.d_model, cfg.vocab_size
    for k in range(1, cfg.mtp + 1):
        attn, attn_cfg, ffn = _parts(cfg, k)
        tokens = shape.tokens * (seq_len - k) // seq_len
        sub = PassShape(tokens=tokens, mean_context_len=(seq_len - k + 1) / 2, decode=False, batch=shape.batch,
                        act_bytes=shape.act_bytes, weight_bytes=shape.weight_bytes)
        for layer_costs in (attn.part_costs(attn_cfg, sub), ffn.part_costs(cfg, layer_index(cfg, k), sub)):
            for name, cost in layer_costs.items():
                add_cost(costs, name, cost.flops, cost.bytes)
        add_cost(costs, "mtp", tokens * 2 * 2 * C * C, 2 * C * C * shape.weight_bytes + linear_io(sub, 2 * C, C))
        add_cost(costs, "lm_head", tokens * 2 * C * V, C * V * shape.weight_bytes + tokens * (C + V) * shape.act_bytes)
    return costs


# --- self-speculative decoding (V3 §5.4.3) ---


class SelfSpeculative:
    """Greedy decoding that drafts D tokens with the MTP modules and verifies them with one
    forward of the main model over [last token, drafts] (draft-then-verify with greedy
    acceptance: Stern et al. 1811.03115, Leviathan et al. 2211.17192). Its output is plain
    greedy decoding's, whatever the drafts: a draft is kept only where it equals the main
    model's argmax at that position, and the token after the last kept one is the main model's.

    Caches roll back by position: every cache is written at start_pos and attends only to the
    prefix it has just written up to, so the slots of rejected drafts are overwritten by the
    next forward before anything reads them. Rows of a batch advance together by the fewest
    drafts any row accepted (each row's own acceptance is still counted).

    State: `tokens` (B, ·) holds the verified tokens 0 … p+1 and then this round's drafts; the
    main caches and `hidden[0]` (h^0) hold positions 0 … p. Module k's cache and `hidden[k]`
    are exact for slots below `exact[k-1]` (inputs all verified), recomputed from there.
    """

    def __init__(self, model, batch: int, max_len: int, dtype: torch.dtype, device):
        self.model, D = model, model.cfg.mtp
        if D < 1:
            raise ValueError("self-speculative decoding needs model.mtp ≥ 1")
        slots = max_len + D + 1  # a verify forward writes D positions past the last accepted
        self.caches = model.new_caches(batch, slots, dtype, device)
        self.mtp_caches = [m.block.attn.new_cache(batch, slots, dtype, device) for m in model.mtp.depths]
        self.tokens = torch.zeros(batch, slots + 1, dtype=torch.long, device=device)
        self.hidden = [torch.zeros(batch, slots, model.cfg.d_model, dtype=dtype, device=device) for _ in range(D)]
        self.exact = [0] * D
        self.p = -1

    def prefill(self, context: torch.Tensor) -> torch.Tensor:
        """Fill the main caches with the context (B, L); return the first generated token (B,)."""
        L = context.shape[1]
        h = self.model.hidden(context, 0, self.caches)  # (B, L, C)
        self.hidden[0][:, :L] = h
        self.tokens[:, :L] = context
        with part("lm_head", self.model.head):
            logits = self.model.head(h[:, -1])
        with part("sample"):
            self.tokens[:, L] = logits.argmax(dim=-1)
        self.exact = [0] * len(self.exact)
        self.p = L - 1
        return self.tokens[:, L]

    @torch.no_grad()
    def draft(self) -> None:
        """Module k drafts the token at p+1+k from h^{k-1} and the tokens up to p+k (V3 eq. (21)–(23))."""
        p, model = self.p, self.model
        for k, module in enumerate(model.mtp.depths, start=1):
            start = self.exact[k - 1]
            with part("embedding", model.embed):
                emb = model.embed(self.tokens[:, start + k:p + 1 + k])  # t_{i+k} for i = start … p
            h = module(self.hidden[k - 1][:, start:p + 1], emb, start, self.mtp_caches[k - 1])
            if k < len(self.hidden):
                self.hidden[k][:, start:p + 1] = h
            with part("lm_head", model.head):
                logits = model.head(module.norm(h[:, -1]))
            with part("sample"):
                self.tokens[:, p + 1 + k] = logits.argmax(dim=-1)
            self.exact[k - 1] = p + 2 - k  # slots i ≤ p+1−k read only verified tokens

    @torch.no_grad()
    def verify(self) -> tuple[int, torch.Tensor]:
        """One main forward over [t_{p+1}, drafts]; keep the drafts its argmax agrees with and
        its next token. Returns (tokens each row emits: accepted + 1, each row's accepted drafts (B,))."""
        p, D, model = self.p, len(self.exact), self.model
        h = model.hidden(self.tokens[:, p + 1:p + 2 + D], p + 1, self.caches)  # (B, D+1, C)
        with part("lm_head", model.head):
            logits = model.head(h)
        with part("sample"):
            greedy = logits.argmax(dim=-1)  # (B, D+1): the main model's token after each position
            agree = greedy[:, :D] == self.tokens[:, p + 2:p + 2 + D]
            accepted_rows = agree.int().cumprod(dim=1).sum(dim=1)  # (B,) leading drafts that agree
            accepted = int(accepted_rows.min())
            self.tokens[:, p + 2 + accepted] = greedy[:, accepted]
        self.hidden[0][:, p + 1:p + 2 + accepted] = h[:, :accepted + 1]
        self.p = p + 1 + accepted
        return accepted + 1, accepted_rows

    def generated(self, context_len: int, n: int) -> torch.Tensor:
        """The first n generated tokens (B, n), the prefill's included."""
        return self.tokens[:, context_len:context_len + n]

    def emitted(self, context_len: int) -> int:
        """Tokens generated so far per row, the prefill's included."""
        return self.p + 2 - context_len

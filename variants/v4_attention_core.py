"""DeepSeek-V4's attention layer over a sliding window plus compressed entries (DeepSeek-V4
report §2.3; HF deepseek_v4 DeepseekV4Attention), over a whole sequence or a cache.

Legend: B batch, T tokens in this call, H query heads, D head_dim (one shared K=V head), R rope
dim, E compressed entries so far, G o_groups, L o_lora_rank, C model width, m compression ratio.

  q = RMSNorm_unweighted(W^QB · RMSNorm(W^QA h))   per head, RoPE'd on its last R channels
  kv = RoPE(RMSNorm(W^KV h))                       ONE head, read as key and as value
  o = softmax([q·k / √D ; sink_h]) minus the sink column, over the window's and the entries' keys
  o = RoPE(o, -position)                            undoes V's rotation on the rope slice
  u = W^OB · [W^OA_g o_g]_g                         grouped low-rank output projection
A token at position i sees window keys j with i - window < j ≤ i, and entry w once its window
has closed, (w + 1)·m ≤ i + 1 (HF DeepseekV4HCACompressor's block bias); under CSA only the
entries its indexer selects.

The cache (V4Cache) holds what a decode step reads and nothing more: the last window - 1 tokens'
KV, the entries so far (and CSA's indexer keys), and each compressor's open window. A whole
sequence runs the same code from an empty state; queries go in blocks of QUERY_BLOCK, each
against only the window keys it can see, so a long prefill holds QUERY_BLOCK × (QUERY_BLOCK +
window + E) scores, never T × T.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import _row_view
from .base import Attention
from .layers import RMSNorm
from .profiling import part
from .v4_compressor import CompressorState, KVCompressor, interleaved_rope, rope_inv_freq

QUERY_BLOCK = 256


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def closed_entries(query_positions: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """(t, E) bool: entry w is visible from position i once its window closed, (w + 1)·m ≤ i + 1."""
    return torch.arange(n_entries, device=query_positions.device)[None, :] < (query_positions[:, None] + 1) // ratio


class V4Indexer(nn.Module):
    """CSA's lightning indexer (report §2.3.1 eqs. 13-17; HF DeepseekV4Indexer): its own
    compressor at index_head_dim, queries from the query latent, score
    Σ_h w_{t,h}·ReLU(q_{t,h}·K_s), the top index_topk closed entries per query (ties: the earliest)."""

    def __init__(self, d_model: int, q_lora_rank: int, n_heads: int, head_dim: int, top_k: int, ratio: int,
                 rope_dim: int, rope_theta: float, eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.top_k, self.ratio = n_heads, head_dim, top_k, ratio
        self.compressor = KVCompressor(d_model, head_dim, ratio, True, rope_dim, rope_theta, eps)
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(d_model, n_heads, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope_dim, rope_theta), persistent=False)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor) -> torch.Tensor:
        """A whole sequence from position 0: (B, T, E) bool, the entries each query selects."""
        return self.select(x, q_latent, torch.arange(x.shape[1], device=x.device), self.compressor(x))

    def select(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Queries at `positions` (t,) over the indexer keys so far (B, E, Di) → (B, t, E) bool:
        the top index_topk closed entries of each (fewer where fewer are closed)."""
        B, T, _ = x.shape
        q = self.q_b_proj(q_latent).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = interleaved_rope(q, positions, self.inv_freq)  # (B, Hi, t, Di)
        scores = torch.relu(torch.matmul(q.float(), keys.float().unsqueeze(1).transpose(-1, -2))) * self.head_dim ** -0.5
        weights = self.weights_proj(x).float() * self.n_heads ** -0.5  # (B, t, Hi)
        index_scores = (scores * weights.transpose(1, 2).unsqueeze(-1)).sum(1)  # (B, t, E)
        closed = closed_entries(positions, keys.shape[1], self.ratio)
        index_scores = index_scores.masked_fill(~closed, float("-inf"))
        # Ties (several entries ReLU'd to the same score, 0 often) go to the earliest entry: a
        # stable sort, so the pick does not depend on how many entries exist yet (decode = prefill).
        chosen = index_scores.sort(dim=-1, descending=True, stable=True).indices[..., : self.top_k]
        selected = torch.zeros_like(index_scores, dtype=torch.bool).scatter_(-1, chosen, True)
        return selected & closed


class V4Cache(nn.Module):
    """One V4 layer's decode state (HF DeepseekV4HCACache / DeepseekV4CSACache, preallocated):
    the last window - 1 tokens' KV, the compressed entries (and CSA's indexer keys) so far, and
    each compressor's open window: its projected tokens and, under CSA, the last closed window's
    Ca half. Entries and window are stored in the cache dtype; the carried gate logits (softmax
    inputs, HF keeps them fp32 once the fp32 position bias is added) in fp32.

    How full each buffer is follows from the tokens seen (a call's start_pos), so the cache keeps
    no counters and a view of some batch rows (`rows`, to prefill in parts) is just as valid."""

    def __init__(self, batch: int, max_len: int, head_dim: int, window: int, compressors: dict[str, KVCompressor], dtype, device):
        super().__init__()
        self.window, self.max_len = window, max_len
        self.register_buffer("recent", torch.zeros(batch, window - 1, head_dim, dtype=dtype, device=device), persistent=False)
        self.compressors = {name: (c.ratio, c.overlap) for name, c in compressors.items()}
        for name, c in compressors.items():
            buffers = {"entries": (max_len // c.ratio, c.entry_dim, dtype), "pending_kv": (c.ratio, c.width, dtype),
                       "pending_gate": (c.ratio, c.width, dtype)}
            if c.overlap:
                buffers |= {"prev_kv": (c.ratio, c.entry_dim, dtype), "prev_gate": (c.ratio, c.entry_dim, torch.float32)}
            for what, (n, width, kind) in buffers.items():
                self.register_buffer(f"{name}_{what}", torch.zeros(batch, n, width, dtype=kind, device=device), persistent=False)

    def _buffer(self, name: str, what: str) -> torch.Tensor:
        return getattr(self, f"{name}_{what}")

    def state(self, name: str, seen: int) -> CompressorState:
        """The compressor's state after `seen` tokens."""
        ratio, overlap = self.compressors[name]
        n_entries, n_pending = seen // ratio, seen % ratio
        prev = (self._buffer(name, "prev_kv"), self._buffer(name, "prev_gate")) if overlap and n_entries else (None, None)
        return CompressorState(self._buffer(name, "entries")[:, :n_entries], self._buffer(name, "pending_kv")[:, :n_pending],
                               self._buffer(name, "pending_gate")[:, :n_pending], *prev, n_entries)

    def advance(self, name: str, state: CompressorState) -> torch.Tensor:
        """Keep what `state` carries; return every entry so far (B, E, D)."""
        stored, W = self._buffer(name, "entries"), state.entries.shape[1]
        end = state.first_entry
        if end > stored.shape[1]:
            raise ValueError(f"KV cache holds {stored.shape[1]} compressed entries; writing up to {end} needs a longer cache")
        stored[:, end - W:end] = state.entries
        n = state.pending_kv.shape[1]
        self._buffer(name, "pending_kv")[:, :n] = state.pending_kv
        self._buffer(name, "pending_gate")[:, :n] = state.pending_gate
        if self.compressors[name][1] and W:
            self._buffer(name, "prev_kv").copy_(state.prev_kv)
            self._buffer(name, "prev_gate").copy_(state.prev_gate)
        return stored[:, :end]

    def recent_kv(self, seen: int) -> torch.Tensor:
        """The KV of the last window - 1 tokens before position `seen` (fewer at the start)."""
        return self.recent[:, : min(seen, self.recent.shape[1])]

    def keep_recent(self, window_keys: torch.Tensor) -> None:
        """After a call: the last window - 1 of the keys it attended (B, n, D), for the next."""
        kept = window_keys[:, max(0, window_keys.shape[1] - self.recent.shape[1]):]
        self.recent[:, : kept.shape[1]] = kept

    def rows(self, start: int, stop: int) -> V4Cache:
        """The cache of batch rows start:stop, sharing this one's storage (to prefill in parts)."""
        return _row_view(self, start, stop)

    def live_bytes_per_token(self) -> float:
        """Bytes a token adds in this layer once its window closes: each compressor's entry
        bytes ÷ m (the window and the open windows are a constant; `filled_bytes`)."""
        return sum(self._buffer(n, "entries")[0, 0].numel() * self._buffer(n, "entries").element_size() / ratio
                   for n, (ratio, _) in self.compressors.items())

    def filled_bytes(self, seen: int) -> int:
        """Bytes one batch row holds after `seen` tokens, read off the live tensors."""
        def rows(t: torch.Tensor, n: int) -> int:
            return n * t[0, 0].numel() * t.element_size() if t.shape[1] else 0
        total = rows(self.recent, min(seen, self.recent.shape[1]))
        for name, (ratio, overlap) in self.compressors.items():
            total += rows(self._buffer(name, "entries"), seen // ratio)
            total += rows(self._buffer(name, "pending_kv"), seen % ratio) + rows(self._buffer(name, "pending_gate"), seen % ratio)
            if overlap and seen >= ratio:
                total += rows(self._buffer(name, "prev_kv"), ratio) + rows(self._buffer(name, "prev_gate"), ratio)
        return total


class V4AttentionCore(Attention):
    """One V4 attention layer; `compressor` None is a sliding-window-only layer."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, rope_dim: int, q_lora_rank: int, o_groups: int,
                 o_lora_rank: int, window: int, rope_theta: float, compressor: KVCompressor | None,
                 indexer: V4Indexer | None = None, eps: float = 1e-6):
        super().__init__()
        self.H, self.D, self.G, self.window, self.eps = n_heads, head_dim, o_groups, window, eps
        self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(q_lora_rank, eps)
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(d_model, head_dim, bias=False)
        self.kv_norm = RMSNorm(head_dim, eps)
        self.o_a_proj = nn.Linear(n_heads * head_dim // o_groups, o_groups * o_lora_rank, bias=False)  # G blocks
        self.o_b_proj = nn.Linear(o_groups * o_lora_rank, d_model, bias=False)
        self.sinks = nn.Parameter(torch.zeros(n_heads))  # one learned logit a head, joins every softmax
        self.compressor = compressor
        self.indexer = indexer  # CSA: a query sees only the entries it selects
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope_dim, rope_theta), persistent=False)

    def _compressors(self) -> dict[str, KVCompressor]:
        named = {"compressor": self.compressor} if self.compressor is not None else {}
        return named | ({"indexer": self.indexer.compressor} if self.indexer is not None else {})

    def new_cache(self, batch: int, max_len: int, dtype, device) -> V4Cache:
        return V4Cache(batch, max_len, self.D, self.window, self._compressors(), dtype, device)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: V4Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if cache is None and start_pos:
            raise ValueError(f"start_pos = {start_pos} without a cache: a V4 layer continues a sequence only from its cache")
        if cache is not None and start_pos + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; writing up to {start_pos + T} needs a longer cache")
        positions = torch.arange(start_pos, start_pos + T, device=x.device)
        with part("attn.proj", self):
            q_latent = self.q_a_norm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent).view(B, T, self.H, self.D).transpose(1, 2)  # (B, H, T, D)
            kv = self.kv_norm(self.kv_proj(x))  # (B, T, D)
        with part("attn.rope", self):
            q = interleaved_rope(unweighted_rms_norm(q, self.eps), positions, self.inv_freq)
            kv = interleaved_rope(kv, positions, self.inv_freq)
        window_keys = torch.cat([cache.recent_kv(start_pos), kv], dim=1) if cache is not None else kv
        entries = self._extend("compressor", self.compressor, x, start_pos, cache, "attn.compress")
        index_keys = self._extend("indexer", self.indexer.compressor if self.indexer is not None else None, x, start_pos, cache, "indexer")
        with part("attn.core", self):
            blocks = [self._attend_block(q[:, :, a:a + QUERY_BLOCK], positions[a:a + QUERY_BLOCK], window_keys, start_pos + T,
                                         entries, index_keys, x[:, a:a + QUERY_BLOCK], q_latent[:, a:a + QUERY_BLOCK])
                      for a in range(0, T, QUERY_BLOCK)]
            o = torch.cat(blocks, dim=2)  # (B, H, T, D)
            if cache is not None:
                cache.keep_recent(window_keys)
        with part("attn.rope", self):
            o = interleaved_rope(o, -positions, self.inv_freq)
        with part("attn.proj", self):
            return self._out(o.transpose(1, 2).reshape(B, T, self.H * self.D))

    def _extend(self, name: str, compressor: KVCompressor | None, x: torch.Tensor, start_pos: int, cache: V4Cache | None, label: str):
        """Every entry so far of one compressor (B, E, D) after x's tokens, or None."""
        if compressor is None:
            return None
        with part(label, self):
            empty = CompressorState.empty(x, compressor.width)
            state = compressor.extend(x, cache.state(name, start_pos) if cache is not None else empty)
            return cache.advance(name, state) if cache is not None else state.entries

    def _attend_block(self, q: torch.Tensor, positions: torch.Tensor, window_keys: torch.Tensor, end: int,
                      entries, index_keys, x: torch.Tensor, q_latent: torch.Tensor) -> torch.Tensor:
        """Queries q (B, H, t, D) at `positions` over the window keys they can see (window_keys
        ends at position end - 1) and the closed (CSA: selected) entries."""
        first = end - window_keys.shape[1]  # the position of window_keys[:, 0]
        lo = max(0, int(positions[0]) - self.window + 1 - first)
        keys = window_keys[:, lo: int(positions[-1]) + 1 - first]
        key_positions = torch.arange(first + lo, first + lo + keys.shape[1], device=q.device)
        p, k = positions[:, None], key_positions[None, :]
        visible = (k <= p) & (k > p - self.window)  # (t, S)
        if entries is not None:
            ratio = self.compressor.ratio
            seen = closed_entries(positions, entries.shape[1], ratio).expand(q.shape[0], -1, -1)  # (B, t, E)
            if self.indexer is not None:
                with part("indexer", self):
                    seen = self.indexer.select(x, q_latent, positions, index_keys)
            keys = torch.cat([keys, entries], dim=1)
            visible = torch.cat([visible.expand(q.shape[0], -1, -1), seen], dim=-1)
        return self._attend(q, keys, visible.unsqueeze(1) if visible.dim() == 3 else visible)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D) over keys = values (B, S, D) with a per-head sink logit."""
        logits = torch.matmul(q, keys.unsqueeze(1).transpose(-1, -2)) * self.D ** -0.5  # (B, H, T, S)
        logits = logits.masked_fill(~visible, float("-inf"))
        sink = self.sinks.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1).to(logits.dtype)
        combined = torch.cat([logits, sink], dim=-1)
        probs = (combined - combined.amax(-1, keepdim=True)).softmax(-1)[..., :-1]
        return torch.matmul(probs, keys.unsqueeze(1))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        """(B, T, H·D) → G groups each to L, then mixed to C."""
        B, T, _ = o.shape
        w = self.o_a_proj.weight.view(self.G, -1, o.shape[-1] // self.G)  # (G, L, H·D/G)
        grouped = torch.einsum("btgi,gli->btgl", o.view(B, T, self.G, -1), w)
        return self.o_b_proj(grouped.reshape(B, T, -1))

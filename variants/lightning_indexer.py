"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2-Exp, 2025): its scores, its
FP8 path, the top-k selection and the KL that trains it. The attention that reads the selection
is variants/dsa.py.

The indexer, as DeepSeek-V3.2-Exp's inference/model.py computes it (`Indexer`):
  q_{t,j} = W^IQ_j c^Q_t          index_n_heads queries from the query latent (from h_t without one)
  k_s     = LayerNorm(W^IK h_s)   one key per token, shared by the heads
  w_{t,j} = (W^W h_t)_j · n^-½ · d^-½                       per-head weights from the hidden state
  I(t,s)  = Σ_j w_{t,j} · ReLU(q_{t,j} · k_s)               (V3.2 report eq. 1)
RoPE on the first qk_rope_head_dim channels of q and k, NOT interleaved (pairs i, i + D/2), the
rest unrotated: the layout DeepSeek's code uses ([pe | nope], where MLA's main RoPE is the last
channels, interleaved). Under an fp8 precision q and k pass a Hadamard rotation (d^-½·H, Sylvester
order, as fast_hadamard_transform) and are quantised to E4M3 with one power-of-two (ue8m0) scale
per 128 channels, and the key cache holds E4M3 keys and their scales; otherwise they stay in the
activation dtype (the rotation is orthogonal, so it changes nothing there).

Legend as mla.py; I index_n_heads, Di index_head_dim, K = min(index_topk, keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsbench.kernels import dsa_indexer
from .layers import RotaryEmbedding
from .mla import mla_dims, yarn_inv_freq
from .precision import linear, precision_of

if TYPE_CHECKING:
    from .config import ModelConfig

# kernels/fp8_quant's constants, restated: importing it imports triton, which costs every cell's
# start ~85 MB of RSS (fp8.py imports it on first use for the same reason; a test holds them equal).
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128


@dataclass(frozen=True)
class IndexerDims:
    n: int  # index_n_heads
    D: int  # index_head_dim
    Dr: int  # its RoPE channels (MLA's qk_rope_head_dim)
    q_in: int  # the query latent's width (or d_model without query compression)
    K: int  # index_topk


def indexer_dims(cfg: ModelConfig) -> IndexerDims:
    a, d = cfg.attention, mla_dims(cfg)
    return IndexerDims(a.index_n_heads, a.index_head_dim, d.Dr, d.Dq or cfg.d_model, a.index_topk)


def fp8_indexer(cfg: ModelConfig) -> bool:
    return precision_of(cfg).fp8_recipe is not None


def hadamard(D: int, device=None) -> torch.Tensor:
    """The D×D Walsh–Hadamard matrix in Sylvester order, scaled by D^-½ (orthogonal)."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h * D ** -0.5


def quant_ue8m0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) → E4M3 (..., D) and FP32 power-of-two scales (..., ⌈D/128⌉): DeepSeek's act_quant
    with scale_fmt = "ue8m0" (the scale rounded up to 2^⌈log2(amax/448)⌉)."""
    *lead, D = x.shape
    groups = -(-D // GROUP)
    tiles = F.pad(x.float(), (0, groups * GROUP - D)).view(*lead, groups, GROUP)
    amax = tiles.abs().amax(dim=-1).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, groups * GROUP)[..., :D], scale


def dequant_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """quant_ue8m0's inverse: (..., D) FP32."""
    from dsbench.kernels.fp8_quant import to_float  # on first use: it imports triton

    D = q.shape[-1]
    # A fresh copy, scaled in place: whole groups, then the ragged tail. Never padded: padding a
    # 32-wide key cache to 128 channels cost 4× the work every decode step, and a strided result.
    x = to_float(q) if q.dtype == FP8_DTYPE else q.float().clone()
    full = D // GROUP * GROUP
    if full:
        x[..., :full].unflatten(-1, (-1, GROUP)).mul_(scale[..., :full // GROUP, None])
    if full < D:
        x[..., full:].mul_(scale[..., -1:])
    return x


class LightningIndexer(nn.Module):
    """The indexer's projections and its scores (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        i, C, p = indexer_dims(cfg), cfg.d_model, cfg.precision
        self.dims, self.fp8 = i, fp8_indexer(cfg)
        self.wq_b = linear(p, i.q_in, i.n * i.D)
        self.wk = linear(p, C, i.D)
        self.k_norm = nn.LayerNorm(i.D, eps=1e-6)  # DeepSeek's LayerNorm: weight and bias, in fp32
        self.weights_proj = nn.Linear(C, i.n, bias=False)  # kept in fp32 (DeepSeek: "for convenience")
        self.rope = RotaryEmbedding(i.Dr, cfg.attention.rope_theta, interleaved=False, inv_freq=yarn_inv_freq(cfg, i.Dr))  # MLA's freqs_cis
        self.register_buffer("rotation", hadamard(i.D) if self.fp8 else torch.empty(0), persistent=False)

    def _rotate(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """RoPE on the first Dr channels ([pe | nope]), x (B, ·, T, D)."""
        pe, nope = x.split([self.dims.Dr, self.dims.D - self.dims.Dr], dim=-1)
        return torch.cat([self.rope(pe, start_pos), nope], dim=-1)

    def keys(self, h: torch.Tensor, start_pos: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """h (B, T, C) → k (B, T, D); under fp8 (E4M3 keys, their scales)."""
        k = F.layer_norm(self.wk(h).float(), (self.dims.D,), self.k_norm.weight.float(), self.k_norm.bias.float(), 1e-6)
        k = self._rotate(k.unsqueeze(1), start_pos).squeeze(1)
        return quant_ue8m0(k @ self.rotation.float()) if self.fp8 else k.type_as(h)

    def queries(self, q_in: torch.Tensor, h: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (B, n, T, D) in fp32, as quantised under fp8; w (B, T, n)) for the T new tokens."""
        i = self.dims
        B, T, _ = h.shape
        q = self._rotate(self.wq_b(q_in).view(B, T, i.n, i.D).transpose(1, 2), start_pos)
        w = F.linear(h.float(), self.weights_proj.weight.float()) * (i.n ** -0.5 * i.D ** -0.5)  # fp32 whatever the weights' dtype
        return (dequant_rows(*quant_ue8m0(q.float() @ self.rotation.float())) if self.fp8 else q.float()), w

    def key_values(self, keys) -> torch.Tensor:
        """The keys as the scores read them: (B, S, D) fp32."""
        return dequant_rows(*keys) if self.fp8 else keys.float()

    def project(self, q_in: torch.Tensor, h: torch.Tensor, start_pos: int):
        """`keys(h)` and `queries(q_in, h)` of the T new tokens with one RoPE call for both (the
        same positions and frequencies; RoPE is elementwise, so the numbers are the same)."""
        i = self.dims
        B, T, _ = h.shape
        k = F.layer_norm(self.wk(h).float(), (i.D,), self.k_norm.weight.float(), self.k_norm.bias.float(), 1e-6)  # (B, T, D)
        q = self.wq_b(q_in).view(B, T, i.n, i.D).transpose(1, 2)  # (B, n, T, D)
        both = self._rotate(torch.cat([q.float(), k.unsqueeze(1)], dim=1), start_pos)  # (B, n + 1, T, D) fp32
        q, k = both[:, :i.n].contiguous().type_as(q), both[:, i.n].contiguous()  # the layouts keys() and queries() return
        w = F.linear(h.float(), self.weights_proj.weight.float()) * (i.n ** -0.5 * i.D ** -0.5)
        if self.fp8:
            keys = quant_ue8m0(k @ self.rotation.float())
            return keys, dequant_rows(*quant_ue8m0(q.float() @ self.rotation.float())), w
        return k.type_as(h), q.float(), w

    @staticmethod
    def score(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """I(t, s) = Σ_j w_{t,j}·ReLU(q_{t,j}·k_s): q (B, n, T, D), w (B, T, n), k (B, S, D) → (B, T, S) fp32,
        the reference (kernels/dsa_indexer.py; the module calls the family dsa_index_scores)."""
        return dsa_indexer.scores_reference(q, w, k, buffer)



def select(scores: torch.Tensor, start_pos: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K keys of each query under the causal mask: (indices (B, T, K), valid (B, T, K)), the
    reference (kernels/dsa_indexer.py select_reference; the module calls the family dsa_topk).
    A query with fewer than K earlier keys gets masked picks, marked invalid; equal scores at the
    K-th place go to the lower positions; indices come in ascending position."""
    return dsa_indexer.select_reference(scores, start_pos, K)


def kl_to_indexer(p: torch.Tensor, index_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(p ‖ softmax(I)) over the valid keys (V3.2 eq. 3 and 4): p (B, T, K)
    the main attention summed over heads and L1-normalised (detached), I the indexer's scores."""
    log_q = index_scores.masked_fill(~valid, float("-inf")).log_softmax(dim=-1)
    p = p.masked_fill(~valid, 0.0)
    terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1).mean()

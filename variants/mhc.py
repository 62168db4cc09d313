"""Manifold-constrained hyper-connections (mHC; Xie et al. arXiv 2512.24880, DeepSeek-V4 §2.2):
n residual streams instead of one. Before each sublayer the streams are collapsed by `pre`,
the sublayer's output is expanded back by `post`, and the old streams are mixed by `comb`, a
doubly-stochastic N×N matrix (Sinkhorn-Knopp), so the mixing cannot grow the residual's norm.

Written to Hugging Face's `DeepseekV4HyperConnection` / `DeepseekV4HyperHead`
(transformers.models.deepseek_v4), parameter names included, so a checkpoint's weights load as is.

Legend: B batch, T tokens, N streams (hc_mult), C model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HC_EPS = 1e-6  # HF DeepseekV4Config.hc_eps: added to pre and comb, and to Sinkhorn's denominators


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a gain, as HF's DeepseekV4UnweightedRMSNorm (normed over the N·C row)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """(…, N, N) positive → doubly stochastic: alternate column and row normalisation
    (Sinkhorn-Knopp; mHC 2512.24880 §3). HF's order: one column pass, then iters−1 (row, column)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """The mixing weights around one sublayer, from the N streams themselves (a one-layer
    perceptron on the normed, flattened streams)."""

    def __init__(self, d_model: int, hc_mult: int, sinkhorn_iters: int, eps: float = 1e-6, norm_eps: float = 1e-6,
                 init_std: float = 0.02):
        super().__init__()
        self.hc_mult, self.sinkhorn_iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, eps, norm_eps
        width = (2 + hc_mult) * hc_mult  # pre (N) + post (N) + comb (N·N)
        self.fn = nn.Parameter(torch.empty(width, hc_mult * d_model).normal_(0.0, init_std))  # HF _init_weights
        self.base = nn.Parameter(torch.zeros(width))
        self.scale = nn.Parameter(torch.ones(3))  # one scale each for pre, post, comb

    @staticmethod
    def param_count(d_model: int, hc_mult: int) -> int:
        width = (2 + hc_mult) * hc_mult
        return width * hc_mult * d_model + width + 3

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams (B, T, N, C) → post (B, T, N), comb (B, T, N, N) in fp32, and the collapsed
        sublayer input (B, T, C) in the streams' dtype."""
        B, T, N, _ = streams.shape
        flat = unweighted_rms_norm(streams.reshape(B, T, -1).float(), self.norm_eps)  # (B, T, N·C)
        mixes = F.linear(flat, self.fn.float())  # (B, T, (2+N)·N)
        pre_w, post_w, comb_w = mixes.split([N, N, N * N], dim=-1)
        pre_b, post_b, comb_b = self.base.split([N, N, N * N])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)  # in (0, 2), as HF and V4
        comb = torch.softmax(comb_w.view(B, T, N, N) * comb_s + comb_b.view(N, N), dim=-1) + self.hc_eps
        comb = sinkhorn(comb, self.sinkhorn_iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)  # (B, T, C)
        return post, comb, collapsed


def merge(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The new streams: post-expanded sublayer output plus the old streams mixed by combᵀ
    (HF sums over comb's first axis: new_k = Σ_j comb[j, k]·old_j). (B, T, N, C)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """The final collapse of the N streams into one before the model's last norm (no Sinkhorn,
    no post: only a `pre`)."""

    def __init__(self, d_model: int, hc_mult: int, eps: float = 1e-6, norm_eps: float = 1e-6, init_std: float = 0.02):
        super().__init__()
        self.hc_mult, self.eps, self.norm_eps = hc_mult, eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * d_model).normal_(0.0, init_std))
        self.hc_base = nn.Parameter(torch.zeros(hc_mult))
        self.hc_scale = nn.Parameter(torch.ones(1))

    @staticmethod
    def param_count(d_model: int, hc_mult: int) -> int:
        return hc_mult * hc_mult * d_model + hc_mult + 1

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """(B, T, N, C) → (B, T, C)."""
        flat = unweighted_rms_norm(streams.flatten(2).float(), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def expand(x: torch.Tensor, hc_mult: int) -> torch.Tensor:
    """The embeddings copied into N streams: (B, T, C) → (B, T, N, C), as HF's model entry."""
    return x.unsqueeze(2).expand(-1, -1, hc_mult, -1).contiguous()


def flops_per_token(d_model: int, hc_mult: int, sinkhorn_iters: int) -> float:
    """Forward FLOPs of one HyperConnection and its merge, per token (2 per multiply-add):
    the projection 2·(N·C)·(2+N)·N, the collapse 2·N·C, the merge 2·N·C (post) + 2·N·N·C (comb),
    and Sinkhorn's 2·iters − 1 normalisations of an N×N matrix (a sum and a divide per entry)."""
    N, C = hc_mult, d_model
    projection = 2 * N * C * (2 + N) * N
    collapse = 2 * N * C
    merge_flops = 2 * N * C + 2 * N * N * C
    sinkhorn_flops = (2 * sinkhorn_iters - 1) * 2 * N * N
    return float(projection + collapse + merge_flops + sinkhorn_flops)


def head_flops_per_token(d_model: int, hc_mult: int) -> float:
    """Forward FLOPs of the HyperHead per token: its projection and the collapse."""
    return float(2 * hc_mult * hc_mult * d_model + 2 * hc_mult * d_model)

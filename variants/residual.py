"""The residual stream a block's sublayers add into: `plain` (x + f(x), one stream) or `mhc`
(variants/mhc.py: N streams mixed by hyper-connections). Each is a pair of modules the block and
decoder hold without asking which: a `Connection` around each sublayer, and an `Ends` pair that
turns the embeddings into streams and the streams back into one hidden state for the head.

Legend: B batch, T tokens, N streams, C model width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import mhc
from .base import Activations
from .profiling import part

Sublayer = Callable[[torch.Tensor], torch.Tensor]  # (B, T, C) → (B, T, C): norm + attention or FFN


class PlainConnection(nn.Module):
    """x + f(x). No parameters, so a plain model's state dict and init order are as before."""

    def __init__(self, cfg):
        super().__init__()

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        h = sublayer(x)
        with part("residual", self):
            return x + h

    @staticmethod
    def param_count(cfg) -> int:
        return 0

    @staticmethod
    def flops_per_token(cfg) -> float:
        return 0.0  # the add is not a multiply-add (FLOP_CONVENTION counts matmuls and attention)

    @staticmethod
    def train_activations(cfg) -> Activations:
        """What one connection keeps for backward per token beyond the block's own norms."""
        return Activations()

    @staticmethod
    def inference_activations(cfg) -> int:
        """Elements per token live beyond a plain block's residual (variants/base.py contract)."""
        return 0


class PlainEnds(nn.Module):
    def __init__(self, cfg):
        super().__init__()

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def param_count(cfg) -> int:
        return 0

    @staticmethod
    def flops_per_token(cfg) -> float:
        return 0.0


class HyperConnection(nn.Module):
    """mHC around one sublayer: collapse the N streams by `pre`, run the sublayer, expand its
    output by `post` and add the streams mixed by the doubly-stochastic `comb` (mhc.merge).
    The connection's weights stay fp32 as HF keeps them (`.to(torch.float32)` in its layer)."""

    def __init__(self, cfg):
        super().__init__()
        self.hc = mhc.HyperConnection(cfg.d_model, cfg.hc_mult, cfg.hc_sinkhorn_iters, mhc.HC_EPS, cfg.norm_eps, cfg.init_std)

    def forward(self, streams: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        with part("residual", self):
            post, comb, collapsed = self.hc(streams)  # (B, T, N), (B, T, N, N), (B, T, C)
        h = sublayer(collapsed)
        with part("residual", self):
            return mhc.merge(streams, h, post, comb)  # (B, T, N, C)

    @staticmethod
    def param_count(cfg) -> int:
        return mhc.HyperConnection.param_count(cfg.d_model, cfg.hc_mult)

    @staticmethod
    def flops_per_token(cfg) -> float:
        return mhc.flops_per_token(cfg.d_model, cfg.hc_mult, cfg.hc_sinkhorn_iters)

    @staticmethod
    def train_activations(cfg) -> Activations:
        """The N·C streams each connection keeps (wide), and in fp32 their normed copy, the
        (2+N)·N projection and Sinkhorn's iterates (2·iters N×N matrices) for backward."""
        N, C = cfg.hc_mult, cfg.d_model
        return Activations(wide=N * C, fp32=N * C + (2 + N) * N + 2 * cfg.hc_sinkhorn_iters * N * N)

    @staticmethod
    def inference_activations(cfg) -> int:
        """The old and merged streams, each (N−1)·C wider than a plain residual."""
        return 2 * (cfg.hc_mult - 1) * cfg.d_model


class HyperEnds(nn.Module):
    """The embeddings copied into N streams; the HyperHead folds them into one at the end."""

    def __init__(self, cfg):
        super().__init__()
        self.hc_mult = cfg.hc_mult
        self.head = mhc.HyperHead(cfg.d_model, cfg.hc_mult, mhc.HC_EPS, cfg.norm_eps, cfg.init_std)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return mhc.expand(x, self.hc_mult)  # (B, T, N, C)

    def leave(self, streams: torch.Tensor) -> torch.Tensor:
        with part("residual", self):
            return self.head(streams)  # (B, T, C)

    @staticmethod
    def param_count(cfg) -> int:
        return mhc.HyperHead.param_count(cfg.d_model, cfg.hc_mult)

    @staticmethod
    def flops_per_token(cfg) -> float:
        return mhc.head_flops_per_token(cfg.d_model, cfg.hc_mult)

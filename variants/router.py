"""The router of a routed FFN: fp32 affinities, optional group-limited routing, top-k over the
(balancing-biased) scores, and the gate weights from the unbiased ones.

Legend: N tokens (batch × seq, flattened), C model width, E routed experts, K routed experts per
token, F expert width, G expert groups. Suffixes give shapes: scores_NE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .base import Layout
    from .config import ModelConfig
    from .moe import RoutedFFNConfig


def router_rule(ffn: RoutedFFNConfig) -> tuple[str, bool, float]:
    """(score function, renormalise top-k weights, routed scale) of the configured router."""
    if ffn.router == "v3":  # DeepSeek-V3 §2.1.2: sigmoid affinities, normalised, then scaled
        return "sigmoid", True, ffn.routed_scale
    if ffn.router == "sqrtsoftplus":  # DeepSeek-V4 (HF DeepseekV4TopKRouter): always normalised, then scaled
        return "sqrtsoftplus", True, ffn.routed_scale
    # Softmax gates (GShard, DeepSeekMoE §2) are not renormalised; sigmoid scores must be.
    return ffn.router, ffn.norm_topk or ffn.router == "sigmoid", 1.0



@dataclass
class Routing:
    expert_ids_NK: torch.Tensor  # chosen routed experts
    weights_NK: torch.Tensor  # gate values, from the unbiased scores
    scores_NE: torch.Tensor  # fp32 affinities (softmax, sigmoid or sqrtsoftplus), differentiable


def affinities(logits_NE: torch.Tensor, score_func: str) -> torch.Tensor:
    """The router's score function over fp32 logits."""
    if score_func == "softmax":
        return logits_NE.softmax(dim=-1)
    if score_func == "sqrtsoftplus":  # DeepSeek-V4 (HF ACT2FN["sqrtsoftplus"]): sqrt(softplus(x))
        return F.softplus(logits_NE).sqrt()
    return logits_NE.sigmoid()


def group_limited(select_NE: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """Keep the topk_group best of n_group expert groups per token; others get −inf, never 0.

    Group score: the sum of its highest top_k/topk_group scores (V3 §2.1.2, node-limited
    routing; V3's code sums the top 2 = 8/4).
    """
    N, E = select_NE.shape
    grouped_NGe = select_NE.view(N, n_group, E // n_group)
    per_group = min(max(1, top_k // topk_group), E // n_group)
    group_score_NG = grouped_NGe.topk(per_group, dim=-1).values.sum(dim=-1)
    keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
    keep_NG.scatter_(1, group_score_NG.topk(topk_group, dim=-1).indices, True)
    return grouped_NGe.masked_fill(~keep_NG[..., None], float("-inf")).view(N, E)


class Router(nn.Module):
    """Affinities in fp32 (the gate stays high precision, V3 §3.3.1), top-k over biased scores."""

    def __init__(self, cfg: ModelConfig, lay: Layout):
        super().__init__()
        f = cfg.ffn
        self.top_k, self.n_group, self.topk_group = lay.top_k, f.n_group, f.topk_group
        self.score_func, self.normalise, self.scale = router_rule(f)
        self.weight = nn.Parameter(torch.empty(lay.n_routed, cfg.d_model))
        # Auxiliary-loss-free balancing's bias (V3 §2.1.2): used only to choose experts.
        self.register_buffer("expert_bias_E", torch.zeros(lay.n_routed), persistent=True)
        self.use_bias = f.balance == "bias"

    def forward(self, x_NC: torch.Tensor) -> Routing:
        logits_NE = F.linear(x_NC.float(), self.weight.float())
        scores_NE = affinities(logits_NE, self.score_func)
        select_NE = scores_NE + self.expert_bias_E if self.use_bias else scores_NE
        if self.n_group > 1:
            select_NE = group_limited(select_NE, self.n_group, self.topk_group, self.top_k)
        expert_ids_NK = select_NE.topk(self.top_k, dim=-1).indices
        return Routing(expert_ids_NK, self.gate_weights(scores_NE, expert_ids_NK), scores_NE)

    def gate_weights(self, scores_NE: torch.Tensor, expert_ids_NK: torch.Tensor) -> torch.Tensor:
        weights_NK = scores_NE.gather(1, expert_ids_NK)  # unbiased: the bias never reaches the output
        if self.normalise:
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_NK * self.scale


def uniform_assignment(n_tokens: int, n_experts: int, top_k: int, device) -> torch.Tensor:
    """A perfectly balanced assignment: token t takes experts (tK + j) mod E, j < K."""
    slots = torch.arange(n_tokens * top_k, device=device)
    return (slots % n_experts).view(n_tokens, top_k)

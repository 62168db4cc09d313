"""Token dispatch for a routed FFN: sort the N·K assignments by expert (with GShard's capacity
drop), gather each assignment's token row, and sum the gate-weighted expert outputs back.

Legend: N tokens, K routed experts per token, E routed experts, C model width, M assignment rows
(N·K, or fewer after a capacity drop), in expert order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .balance import expert_load

if TYPE_CHECKING:
    from .experts import GroupedExperts


@dataclass
class Dispatch:
    """Assignments sorted by expert: which token each row is, its gate weight, expert bounds.
    Everything stays on the device (no host sync): dropped is a 0-d tensor."""

    token_M: torch.Tensor
    weight_M: torch.Tensor
    ends_E: torch.Tensor
    dropped: torch.Tensor  # assignments past their expert's capacity (0 when dropless)
    load_E: torch.Tensor | None = None  # assignments each expert was chosen for, before any drop


def plan_dispatch(expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor, n_experts: int, capacity: int | None) -> Dispatch:
    """Sort the N·K assignments by expert (stable, so token order holds within an expert).

    With a capacity, each expert keeps its first `capacity` tokens in token order (GShard's
    rule) and the rest are dropped: those tokens get no output from that expert.
    """
    K = expert_ids_NK.shape[1]
    flat_ids = expert_ids_NK.flatten()
    order_M = flat_ids.argsort(stable=True)
    load_E = counts_E = expert_load(flat_ids, n_experts)
    dropped = torch.zeros((), dtype=torch.int64, device=flat_ids.device)
    if capacity is not None:
        starts_E = counts_E.cumsum(0) - counts_E
        slot_M = torch.arange(order_M.numel(), device=order_M.device) - starts_E[flat_ids[order_M]]
        kept = slot_M < capacity
        dropped = order_M.numel() - kept.sum()
        order_M, counts_E = order_M[kept], counts_E.clamp(max=capacity)
    return Dispatch(order_M // K, weights_NK.flatten().index_select(0, order_M), counts_E.cumsum(0), dropped, load_E)


def gather_rows(x_NC: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """Each assignment's token row, in plan order. index_select, not x[token_M]: 3.5× faster on
    a CPU forward, and its backward is an index_add_, not an accumulating index_put_ (2×)."""
    return x_NC.index_select(0, plan.token_M)


def sum_rows(rows_MC: torch.Tensor, plan: Dispatch, n_tokens: int) -> torch.Tensor:
    """Sum gate-weighted rows back onto their tokens."""
    return rows_MC.new_zeros(n_tokens, rows_MC.shape[1]).index_add_(0, plan.token_M, rows_MC)


def combine(expert_out_MC: torch.Tensor, plan: Dispatch, n_tokens: int) -> torch.Tensor:
    """Scale each row by its gate weight and sum the rows back onto their tokens."""
    return sum_rows(expert_out_MC * plan.weight_M[:, None].to(expert_out_MC.dtype), plan, n_tokens)


def dispatch_reference(x_NC, expert_ids_NK, weights_NK, experts: GroupedExperts) -> torch.Tensor:
    """The naive loop over experts, kept only as the tests' and the benchmark's reference."""
    out_NC = torch.zeros_like(x_NC)
    for e in range(experts.w1_ECF.shape[0]):
        token_idx, slot = torch.nonzero(expert_ids_NK == e, as_tuple=True)
        if token_idx.numel():
            y = experts.expert(e, x_NC[token_idx]) * weights_NK[token_idx, slot, None].to(x_NC.dtype)
            out_NC = out_NC.index_add(0, token_idx, y)
    return out_NC

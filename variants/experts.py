"""A routed FFN's experts: E SwiGLU experts as stacked weights, applied to expert-sorted rows
through the moe_experts op family (kernels/grouped_mm.py) or FP8 grouped GEMMs.

Legend: E experts, C model width, F expert width, M assignment rows (sorted by expert).
"""

from __future__ import annotations

import torch
from torch import nn

from dsbench.kernels import choice
from dsbench.kernels.grouped_mm import MOE_EXPERTS, swiglu
from .fp8 import fp8_grouped_mm


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast does not cover grouped matmuls: follow it by hand, as nn.Linear would."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, applied to expert-sorted rows.

    Which implementation runs (kernels/grouped_mm.py: reference, grouped_mm, padded_bmm,
    expert_loop) is the active chooser's (kernels/choice.py: auto measures each shape once, or
    the cell's pin); every one this layer took is its moe_dispatch column."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, fp8_recipe: str | None = None,
                 swiglu_limit: float | None = None):
        super().__init__()
        self.swiglu_limit = swiglu_limit  # DeepSeek-V4's clamp of gate and up (None: no clamp)
        self.w1_ECF = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # gate
        self.w3_ECF = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # up
        self.w2_EFC = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # down
        self.fp8_recipe = fp8_recipe  # the experts' GEMMs in FP8 too (V3 §3.3), under fp8 precisions
        if fp8_recipe is not None:
            self.fp8_probe = None  # set by fp8.QuantisationProbe while it measures SQNR
        self.paths_run: set[str] = set()  # the moe_dispatch column: every implementation an eager call took
        self.compiled_path: str | None = None  # what compiled calls took (written, never read, in the trace)

    def _took(self, name: str) -> None:
        if torch.compiler.is_compiling():  # reading the set would make its contents a guard: a recompile
            self.compiled_path = name
        else:
            self.paths_run.add(name)

    def dispatch_label(self) -> str | None:
        """The implementation the calls took, "mixed" where they took more than one; None before any call."""
        paths = self.paths_run | ({self.compiled_path} if self.compiled_path else set())
        if not paths:
            return None
        return next(iter(paths)) if len(paths) == 1 else "mixed"

    def forward(self, x_MC: torch.Tensor, ends_E: torch.Tensor, weight_M: torch.Tensor | None = None) -> torch.Tensor:
        """Each row through its expert's SwiGLU, times its gate weight where one is given."""
        if self.fp8_recipe is not None:
            self._took("fp8_grouped_mm")
            return self._fp8(x_MC, ends_E, weight_M)
        dtype = compute_dtype(x_MC)
        args = (x_MC.to(dtype), self.w1_ECF.to(dtype), self.w3_ECF.to(dtype), self.w2_EFC.to(dtype), ends_E,
                None if weight_M is None else weight_M.to(dtype), self.swiglu_limit)
        impl = choice.active().pick(MOE_EXPERTS, *args)
        self._took(impl.name)
        return impl.fn(*args)

    def _fp8(self, x_MC, ends_E, weight_M) -> torch.Tensor:
        mm = lambda x, w: fp8_grouped_mm(x, w, ends_E, self.fp8_recipe, self.fp8_probe)  # noqa: E731
        out_MC = mm(swiglu(mm(x_MC, self.w1_ECF), mm(x_MC, self.w3_ECF), self.swiglu_limit), self.w2_EFC)
        return out_MC if weight_M is None else out_MC * weight_M[:, None].to(out_MC.dtype)

    def expert(self, e: int, x_MC: torch.Tensor) -> torch.Tensor:
        """One expert alone (the naive reference's building block)."""
        w1, w3, w2 = (w[e].to(x_MC.dtype) for w in (self.w1_ECF, self.w3_ECF, self.w2_EFC))
        return swiglu(x_MC @ w1, x_MC @ w3, self.swiglu_limit) @ w2

"""The train workload's optimizers: `adamw` for every parameter, or `muon` for the hidden
matrices with AdamW for the rest (train.optimizer).

Muon is torch's own `torch.optim.Muon` (Jordan et al. 2024, "Muon: an optimizer for hidden
layers"; torch's Newton–Schulz coefficients (3.4445, −4.775, 2.0315), 5 steps). As DeepSeek-V4
(§2.4) trains: Muon for the 2-D weights of the blocks (mHC's projections included), AdamW for the
embedding, the output head, norms, biases and mHC's static biases and scales (every < 2-D tensor).
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "muon")
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, FP32 each (Loshchilov & Hutter 1711.05101, Alg. 2)
MUON_STATES = 1  # one momentum buffer (torch.optim.Muon's momentum_buffer)
ADAMW_STATE_PASSES = 7  # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
MUON_STATE_PASSES = 5  # read param, grad, buffer; write param, buffer (Newton–Schulz runs on a copy)


def muon_split(model: torch.nn.Module) -> tuple[list, list]:
    """(Muon's parameters, AdamW's): Muon takes the 2-D matrices other than the embedding and
    the head (a tied head is the embedding); torch's Muon takes only 2-D tensors, so a stacked
    (E, ·, ·) expert weight stays with AdamW."""
    ends = {id(m.weight) for name, m in model.named_modules() if name in ("embed", "head")}
    muon, adamw = [], []
    for p in model.parameters():
        (muon if p.dim() == 2 and id(p) not in ends else adamw).append(p)
    return muon, adamw


def _adamw(params: list, settings: dict) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only, not on norms (as nanoGPT's configure_optimizers)."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings["lr"], betas=(settings["beta1"], settings["beta2"]))


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon on one set, AdamW on the other, stepped together; `param_groups` is both
    optimizers' groups, so the train loop's learning-rate schedule reaches each."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = (muon, adamw)
        self.param_groups = muon.param_groups + adamw.param_groups
        self.state = {}
        self.defaults = {}

    def step(self, closure=None):
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)


def make_optimizer(model: torch.nn.Module, settings: dict) -> torch.optim.Optimizer:
    """The optimizer settings["optimizer"] names (adamw where a cell predates the setting)."""
    if settings.get("optimizer", "adamw") == "adamw":
        return _adamw(list(model.parameters()), settings)
    muon, rest = muon_split(model)
    # adjust_lr_fn "match_rms_adamw" (Moonshot's Muon-is-scalable 2502.16982 §2.2, also torch's
    # option): Muon's update scaled to AdamW's RMS, so one lr serves both parts.
    muon_opt = torch.optim.Muon(muon, lr=settings["lr"], weight_decay=settings["weight_decay"],
                                adjust_lr_fn="match_rms_adamw")  # torch's momentum 0.95, Nesterov
    return MuonWithAdamW(muon_opt, _adamw(rest, settings))


def muon_share(model_cfg) -> float:
    """The fraction of a model's parameters Muon takes, counted on a meta-device build (no memory)."""
    from dsbench.variants.decoder import build_model  # the model is built only when asked

    with torch.device("meta"):
        model = build_model(model_cfg)
    muon, rest = muon_split(model)
    taken = sum(p.numel() for p in muon)
    return taken / (taken + sum(p.numel() for p in rest))


def state_floats(settings: dict, model_cfg, params: int) -> float:
    """FP32 optimizer-state elements for `params` parameters: AdamW's two moments on each, or
    under muon Muon's one buffer on its share and AdamW's two on the rest."""
    if settings.get("optimizer", "adamw") == "adamw":
        return params * ADAMW_STATES
    share = muon_share(model_cfg)
    return params * (share * MUON_STATES + (1 - share) * ADAMW_STATES)


def state_passes(settings: dict, model_cfg, params: int) -> float:
    """FP32 words the optimizer step reads and writes (the train step's `optimizer` cost)."""
    if settings.get("optimizer", "adamw") == "adamw":
        return params * ADAMW_STATE_PASSES
    share = muon_share(model_cfg)
    return params * (share * MUON_STATE_PASSES + (1 - share) * ADAMW_STATE_PASSES)

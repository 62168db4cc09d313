"""The model and batch tests/test_expert_parallel.py and its ranks (tests/ep_ranks.py) share."""

import torch

from dsbench.variants.config import config_from_size
from dsbench.variants.decoder import build_model


def build(case: dict) -> torch.nn.Module:
    """The case's model from seed 0; `bias` (expert → value) pins routing through the bias."""
    torch.manual_seed(0)
    cfg = config_from_size("debug", ffn=case["ffn"], **case.get("overrides", {}))
    model = build_model(cfg)
    for _, p in model.parts():
        for expert, value in case.get("bias", {}).items():
            if hasattr(p, "router"):
                p.router.expert_bias_E[int(expert)] = value
    return model


def batch(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(R·B, T) inputs and targets: the single process's whole batch, each rank's rows a slice."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (case["ranks"] * case["batch"], case["seq"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]

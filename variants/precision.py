"""Numeric precision of a model's compute: which dtype each part runs in, and which linear layer.

Training keeps FP32 master weights and optimizer states and runs matmuls in the compute dtype
under autocast (mixed precision, as DeepSeek-V3 §3.3 keeps master weights in FP32). Inference
casts the weights to the inference dtype, so the KV cache is stored in that dtype too.
Later precisions (fp8) register here with their own linear class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast, run in the weights' dtype
    inference_dtype: torch.dtype
    peak_key: str  # which peak FLOP/s MFU is taken against (never a narrower one than runs)
    linear_cls: type[nn.Linear] = nn.Linear
    fast_on_cpu: bool = True  # False: on a CPU the cell's speed is not representative

    def cpu_speed_note(self) -> str | None:
        if self.fast_on_cpu:
            return None
        return f"{self.name} on CPU: for numerics; its speed depends on the CPU's ISA and does not predict a GPU"


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", None, torch.float32, peak_key="fp32"),
    "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16, peak_key="bf16", fast_on_cpu=False),
}


def linear(precision: str, in_features: int, out_features: int) -> nn.Linear:
    """The linear layer every matmul-bearing module builds; bias-free as in LLaMA/DeepSeek."""
    return PRECISIONS[precision].linear_cls(in_features, out_features, bias=False)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

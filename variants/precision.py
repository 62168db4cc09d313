"""Numeric precision of a model's compute: which dtype each part runs in, and which linear layer.

Training keeps FP32 master weights and optimizer states and runs matmuls in the compute dtype
under autocast (mixed precision, as DeepSeek-V3 §3.3 keeps master weights in FP32). Inference
casts the weights to the inference dtype, so the KV cache is stored in that dtype too.
FP8 precisions register here with their own linear class (variants/fp8.py): `fp8` is
DeepSeek-V3's fine-grained recipe (§3.3: 1×128 activation tiles, 128×128 weight blocks),
`fp8-tensorwise` one dynamic scale per tensor; the rest of the model runs under BF16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from dsbench.errors import SpecError

from .fp8 import Fp8Linear


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast, run in the weights' dtype
    inference_dtype: torch.dtype
    peak_key: str  # which peak FLOP/s MFU is taken against (never a narrower one than runs)
    linear_cls: Callable[..., nn.Linear] = nn.Linear  # called as linear_cls(in, out, bias=False)
    fast_on_cpu: bool = True  # False: on a CPU the cell's speed is not representative
    fp8_recipe: str | None = None  # "blockwise" | "tensorwise": matmuls in FP8 (variants/fp8.py)
    kernel_families: tuple[str, ...] = ()  # op families its matmuls call (dsbench/kernels/choice.py)

    def cpu_speed_note(self) -> str | None:
        if self.fast_on_cpu:
            return None
        return f"{self.name} on CPU: for numerics; its speed depends on the CPU's ISA and does not predict a GPU"

    def emulated_on(self, device: torch.device) -> bool:
        """True where the arithmetic has no hardware: the numbers are right, the speed is not."""
        if self.fp8_recipe is None:
            return False  # FP8 is real only on FP8 tensor cores (compute capability ≥ 8.9)
        return device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)

    def speed_note(self, device: torch.device) -> str | None:
        if self.emulated_on(device):
            return (f"{self.name} emulated on {device.type} (no FP8 tensor cores): true FP8 E4M3 numerics, "
                    "FP32 accumulation; its speed means nothing")
        return self.cpu_speed_note() if device.type == "cpu" else None


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", None, torch.float32, peak_key="fp32"),
    "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16, peak_key="bf16", fast_on_cpu=False),
    # FP8 GEMMs, BF16 for the rest (autocast in training, BF16 weights and KV cache in inference).
    "fp8": Precision("fp8", torch.bfloat16, torch.bfloat16, peak_key="fp8", fast_on_cpu=False, fp8_recipe="blockwise",
                     kernel_families=("fp8_gemm",), linear_cls=partial(Fp8Linear, recipe="blockwise")),
    "fp8-tensorwise": Precision("fp8-tensorwise", torch.bfloat16, torch.bfloat16, peak_key="fp8", fast_on_cpu=False,
                                fp8_recipe="tensorwise", linear_cls=partial(Fp8Linear, recipe="tensorwise")),
}


def linear(precision: str, in_features: int, out_features: int) -> nn.Linear:
    """The linear layer every matmul-bearing module builds; bias-free as in LLaMA/DeepSeek."""
    return precision_of(precision).linear_cls(in_features, out_features, bias=False)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def precision_of(config_or_name) -> Precision:
    """The one place a precision name (axes.precision, ModelConfig.precision) becomes its Precision:
    of a model config (anything with `.precision`) or of a name; an unknown name is a one-line error."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.precision
    if name not in PRECISIONS:
        raise SpecError(f"precision: {name!r} is not available; allowed: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]

"""Named profiler ranges that the model parts and workloads open around their own work.

`dsbench profile` attributes time to parts by these ranges, never by guessing from kernel
names: a range is named `dsbench/<part>@<module path>` (e.g. `dsbench/attn.proj@blocks.3.attn`),
and ops inside it (their backward too, matched by autograd sequence number) belong to it.

Ranges cost nothing unless enabled: `part()` hands back one shared null context while
ENABLED is False, so a measured (unprofiled) step pays one global read per range. Set
DSBENCH_RANGES=1 to keep them on for an outside profiler (Nsight, a custom torch.profiler).
"""

from __future__ import annotations

import contextlib
import os

from torch.autograd.profiler import record_function

PREFIX = "dsbench/"
ENABLED = os.environ.get("DSBENCH_RANGES") == "1"
_NULL = contextlib.nullcontext()

# The parts a step can be split into, in display order, with what each covers.
PARTS = {
    "embedding": "token embedding lookup",
    "norm": "RMSNorm (block, final, MLA latent)",
    "attn.proj": "attention weight matmuls: Q/K/V/O, MLA down/up projections and absorbed W^UK/W^UV",
    "attn.rope": "rotary position embedding of q and k",
    "attn.core": "KV-cache write, scores, softmax, weighted sum of values",
    "indexer": "a lightning indexer (DSA's, V4 CSA's): its projections, key cache or compressor, scores and the top-k selection",
    "attn.compress": "DeepSeek-V4 CSA/HCA KV compressor: its projections, gated pooling of each window, norm and RoPE",
    "attn.other": "the attention module's call, reshapes and Python outside the parts above",
    "ffn": "dense SwiGLU FFN",
    "router": "gate matmul, affinities, top-k, gate weights",
    "dispatch": "sort tokens by expert, gather rows, scatter-add back (combine)",
    "experts": "routed experts' GEMMs, SiLU and gate weights (op family moe_experts)",
    "shared_experts": "DeepSeekMoE shared experts",
    "ffn.other": "the FFN module's call, reshapes and Python outside its named parts",
    "balance": "auxiliary balance losses; the routing-bias update (aux-loss-free)",
    "routing_stats": "dsbench's own routing counters (load, MaxVio, by domain)",
    "fp8_quant": "FP8 quantisation of activations, weights and gradients",
    "residual": "the blocks' residual additions",
    "block.other": "a block's call and Python outside its attention, FFN, norms and residuals",
    "lm_head": "output projection to the vocabulary (the MTP modules' too: the head is shared)",
    "mtp": "MTP modules' input: enorm, hnorm and eh_proj (their blocks' parts are named as the main blocks')",
    "loss": "cross-entropy and its reduction",
    "autograd": "autograd engine time outside any node (scheduling, accumulate-grad)",
    "grad_clip": "gradient-norm clipping",
    "optimizer": "AdamW step and zero_grad",
    "sample": "greedy next-token argmax (decode)",
}
STEP, WARMUP, PREFILL = "step", "warmup", "prefill"  # the step-level ranges StepTimer opens
STEP_HOOK = None  # set by a profiling session: kind → context manager that opens the step's range
# Work a part does once, not every step (the MoE dispatch timing its two paths): a step in which
# it happened is no sample (dsbench.measure.StepTimer compares the count around each step).
_untimed_work = 0


def note_untimed_work() -> None:
    global _untimed_work
    _untimed_work += 1


def untimed_work() -> int:
    return _untimed_work


def part(name: str, module=None):
    """`with part("attn.proj", self):` — a profiler range for `name` at `module`'s path."""
    if not ENABLED:
        return _NULL
    path = getattr(module, "_dsbench_path", "") if module is not None else ""
    return record_function(f"{PREFIX}{name}@{path}")


def step_range(kind: str):
    """The range around one whole step (STEP, WARMUP or PREFILL), opened by measure.StepTimer."""
    if not ENABLED:
        return _NULL
    if STEP_HOOK is not None:
        return STEP_HOOK(kind)
    return record_function(f"{PREFIX}{kind}")


def label_modules(model) -> None:
    """Give every submodule its path (`blocks.3.ffn`), which its ranges carry."""
    for path, module in model.named_modules():
        module._dsbench_path = path or "model"


def parse(name: str) -> tuple[str, str] | None:
    """`dsbench/attn.proj@blocks.3.attn` → ("attn.proj", "blocks.3.attn"); None if not ours."""
    if not name.startswith(PREFIX):
        return None
    part_name, _, path = name[len(PREFIX):].partition("@")
    return part_name, path


@contextlib.contextmanager
def enabled(on: bool = True):
    """Turn the ranges on (for a profiled pass) and restore the previous setting after."""
    global ENABLED
    before, ENABLED = ENABLED, on
    try:
        yield
    finally:
        ENABLED = before

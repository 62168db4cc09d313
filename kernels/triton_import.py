"""Triton, imported only where a Triton kernel can run: a CUDA device, or TRITON_INTERPRET=1
(the CPU interpreter, for tests). Elsewhere importing it would cost every cell's process
~0.9 s (triton._C and triton.language, measured with `python -X importtime`) for kernels it
can never launch; there `load()` gives (None, None) and each family's Triton implementation
says why it does not run (kernels/choice.py triton_device_ok).
"""

from __future__ import annotations

import os


def usable() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def load():
    """(triton, triton.language), or (None, None) where no Triton kernel can run or it is absent."""
    if not usable():
        return None, None
    try:
        import triton
        import triton.language as tl
    except ImportError:  # triton is a Linux-only dependency
        return None, None
    return triton, tl

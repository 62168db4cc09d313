"""Parts that run eager under torch.compile: `@eager_under_compile` on a function makes dynamo
call it as it is (a graph break, which a compiled cell's row counts) instead of tracing it.

Not `torch.compiler.disable` at import: that loads torch._dynamo (1.2 s, and triton) in every
cell's process, eager ones too. Eager code calls the function itself; dsbench.compiled calls
`prepare()` before it compiles anything, which makes the disabled twins dynamo calls instead.
"""

from __future__ import annotations

import functools

import torch

_REGISTERED: list = []
_DISABLED: dict = {}


def eager_under_compile(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _DISABLED[fn](*args, **kwargs)
        return fn(*args, **kwargs)

    _REGISTERED.append(fn)
    return wrapper


def prepare() -> None:
    """Make the disabled twin of every registered function (imports torch._dynamo)."""
    for fn in _REGISTERED:
        if fn not in _DISABLED:
            _DISABLED[fn] = torch.compiler.disable(fn)

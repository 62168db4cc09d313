"""The one place the harness turns a precision name (axes.precision, ModelConfig.precision) into
its Precision: the dtypes, the FP8 recipe, the op families and the peak a cell of it runs against."""

from __future__ import annotations

from dsbench.errors import SpecError
from dsbench.variants.precision import PRECISIONS, Precision


def precision_of(config_or_name) -> Precision:
    """The Precision of a model config (anything with `.precision`) or of a precision name."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.precision
    if name not in PRECISIONS:
        raise SpecError(f"precision: {name!r} is not available; allowed: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]

"""A variant's hook called at spec time, with a plug-in's bug reported as one line."""

from __future__ import annotations

from dsbench.errors import SpecError
from dsbench.variants import registry


def part_hook(section: str, cfg, hook: str, returns: type, *args):
    """A variant's hook called at spec time: what it returns (None, or a `returns`), or a SpecError
    naming the variant and its hook where it raises or returns something else (a plug-in's bug
    reaches the user as one line, not a traceback)."""
    module = registry.module_of(section, cfg)
    where = f"{section} = {getattr(cfg, section).kind} ({module.__module__}.{module.__name__}.{hook})"
    try:
        value = getattr(module, hook)(*args)
    except Exception as e:  # noqa: BLE001 — any failure of the plug-in's code is reported as its own
        raise SpecError(f"{where} raised {type(e).__name__}: {e}") from None
    if value is not None and (not isinstance(value, returns) or isinstance(value, bool)):
        raise SpecError(f"{where} returned {value!r}; it must return None or a {returns.__name__}")
    return value

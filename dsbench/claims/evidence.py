"""The claims' vocabulary: verdicts, the Evidence a check returns, and the helpers every check
shares (what to run when evidence is missing, number formats)."""

from __future__ import annotations

from dataclasses import dataclass

REPRODUCED, NOT_REPRODUCED, DIRECTION, NOT_CHECKABLE = "reproduced", "not reproduced", "direction only", "not checkable here"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, DIRECTION, NOT_CHECKABLE)
RUN_PRESET = "run `dsbench run sweep --preset paper-cpu` (paper-gpu on a GPU) and pass its folder"


@dataclass(frozen=True)
class Evidence:
    measured: str
    verdict: str
    detail: str


def missing(what: str, hint: str = RUN_PRESET) -> Evidence:
    return Evidence("–", NOT_CHECKABLE, f"{what} in these results; {hint}")


class NotCheckable:
    """A check that no results can answer here; `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, _results) -> Evidence:
        return Evidence("–", NOT_CHECKABLE, self.reason)


# --- formatting ---


def billions(n: float) -> str:
    return f"{n / 1e9:,.2f}B"


def pct(x: float, signed: bool = True) -> str:
    return f"{100 * x:+.2f}%" if signed else f"{100 * x:.1f}%"

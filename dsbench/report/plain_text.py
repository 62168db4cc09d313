"""Every text a figure shows is drawn as plain text: user text (run ids, labels, axis values) may
hold `$…$`, which matplotlib would parse as mathtext and raise on, or render as math.

Only `$` opens mathtext outside usetex, so each `$` of a text the report set (titles, labels,
legends, annotations, fixed and categorical tick labels) is escaped as `\\$` just before saving.
The number formatters' own tick labels (a log axis's 10^k) keep their mathtext. save_figure
writes the PNG every figure and card goes through.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.category import StrCategoryFormatter
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import FixedFormatter, Formatter
from PIL import Image  # a matplotlib dependency

TEXT_FORMATTERS = (FixedFormatter, StrCategoryFormatter)  # they print given strings, not numbers


def escape(text: str) -> str:
    return text.replace("$", "\\$")


class PlainFormatter(Formatter):
    """A text formatter whose labels are escaped as they are drawn."""

    def __init__(self, inner: Formatter):
        self.inner = inner

    def __call__(self, x, pos=None):
        return escape(str(self.inner(x, pos)))

    def set_axis(self, axis):
        super().set_axis(axis)
        self.inner.set_axis(axis)

    def set_locs(self, locs):
        super().set_locs(locs)
        self.inner.set_locs(locs)


def plain(fig: Figure) -> Figure:
    for text in fig.findobj(Text):
        if "$" in text.get_text():
            text.set_text(escape(text.get_text()))
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for getter, setter in ((axis.get_major_formatter, axis.set_major_formatter),
                                   (axis.get_minor_formatter, axis.set_minor_formatter)):
                formatter = getter()
                if isinstance(formatter, TEXT_FORMATTERS):
                    setter(PlainFormatter(formatter))
    return fig


def save_figure(fig: Figure, path: Path, dpi: int) -> None:
    """A PNG of 256 colours (a palette, no dithering): plots are flat colours and anti-aliased
    edges, so it reads the same at about a third of the bytes, and committed reports stay small."""
    buffer = io.BytesIO()
    plain(fig).savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.save(path, format="png", optimize=True)

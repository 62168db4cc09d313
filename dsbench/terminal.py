"""What dsbench prints to a terminal: every string is literal text, never rich markup.

User text (names, paths, labels, error messages quoting a spec) can hold brackets, which rich
would read as markup ("[/x]" raises MarkupError, "[bold]fp32" loses its tag). So the consoles
are built with markup off, and styles are attached to known text through `styled()`, never
written into a string.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text


def stdout_console() -> Console:
    # Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns; give them room.
    return Console(width=None if sys.stdout.isatty() else 200, markup=False)


def stderr_console() -> Console:
    return Console(stderr=True, markup=False)


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line from plain strings and (text, style) pairs, all literal: styled(("error:", "red"), " ", message)."""
    return Text.assemble(*parts)

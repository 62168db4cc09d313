"""A command's new output folder (`dsbench ab --out`, `dsbench baseline --out`): checked once,
in one line, and gone again if the command is refused before it wrote anything worth keeping.

    with new_folder(out, "--out") as folder:      # out None: a fresh temporary folder
        ...                                       # a UserError here removes what new_folder made
        folder.keep()                             # from here on, the folder stays whatever happens
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dsbench.errors import UsageError


class Folder:
    def __init__(self, path: Path, created: Path | None):
        self.path = path
        self._created = created  # the topmost folder new_folder made (None: it was there, empty)
        self.kept = False

    def keep(self) -> None:
        self.kept = True

    def discard(self) -> None:
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
        elif self.path.is_dir():  # it was there, empty: leave it empty
            for p in self.path.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def check_new_folder(path: Path, flag: str) -> None:
    """Refuse, in one line, a path that cannot be a new output folder: a file, a folder with
    something in it, or a place that cannot be written."""
    if str(path).strip() in ("", "."):
        raise UsageError(f"{flag}: {str(path)!r} is empty or the current folder; give a new folder")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {str(path)!r} is a file; give a new folder")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{flag}: {str(path)!r} is not empty; choose a new folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag}: {str(path)!r} cannot be created: {str(existing)!r} is a file; give a new folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: {str(path)!r} cannot be created or written ({str(existing)!r} is not writable); "
                         "choose a writable place")


@contextlib.contextmanager
def new_folder(path: str | Path | None, flag: str = "--out", prefix: str = "dsbench-") -> Iterator[Folder]:
    """The folder for a command's output; removed again if the block raises before `keep()`."""
    if path is None:
        made = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
        folder = Folder(made, made)
    else:
        path = Path(path)
        check_new_folder(path, flag)
        top = next((p for p in reversed((path, *path.parents)) if not p.exists()), None)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only mount, /proc: what os.access could not tell
            raise UsageError(f"{flag}: cannot create {str(path)!r} ({e.strerror or type(e).__name__}); choose a writable place") from None
        folder = Folder(path.resolve(), top.resolve() if top is not None else None)
    try:
        yield folder
    except BaseException:
        if not folder.kept:
            folder.discard()
        raise

"""A built (non-editable) install holds every package: pyproject lists them by hand, so a new
package folder that is not listed works from the checkout and is missing from `pip install .`
(dsbench ab installs the base commit that way)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    found = set()
    for top, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((top, *rel)))
    assert sorted(found - set(setuptools["packages"])) == []
    assert sorted(set(setuptools["packages"]) - found) == []

"""Hugging Face transformers' DeepSeek-V4 modules (`transformers.models.deepseek_v4`), the
reference every V4 part of dsbench is tested against with the same weights.

transformers imports a top-level module named `kernels` (Hugging Face's hub-kernels package).
`python -m pytest` run from the repository root puts the root on sys.path, where our kernels/
folder (shipped as `dsbench.kernels`, never as top-level `kernels`) would shadow it; so the
reference is imported with the root off the path. Tests skip, with that reason, where
transformers or its deepseek_v4 model is absent (it is in the `test` extra)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE = "transformers.models.deepseek_v4.modeling_deepseek_v4"


def _is_root(entry: str) -> bool:
    return Path(os.path.abspath(entry or os.getcwd())) == ROOT


def _import_without_root(name: str):
    shadow = sys.modules.get("kernels")
    if shadow is not None and Path(getattr(shadow, "__file__", "") or "").resolve().is_relative_to(ROOT):
        del sys.modules["kernels"]
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if not _is_root(entry)]
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


def modeling():
    """`modeling_deepseek_v4`, or a pytest skip naming what is missing."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install -e '.[test]'): no HF deepseek_v4 reference")
    try:
        return _import_without_root(MODULE)
    except ModuleNotFoundError as error:
        pytest.skip(f"this transformers has no deepseek_v4 model ({error}); it needs transformers >= 5.25")


def configuration():
    modeling()
    return _import_without_root("transformers.models.deepseek_v4.configuration_deepseek_v4")

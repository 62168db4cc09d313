"""Shared fixtures: tiny sweep specs that run in about a second per cell on a CPU."""

from __future__ import annotations

import os

# Triton kernels run under Triton's CPU interpreter in the tests. The variable must be set before
# anything imports triton, and some imports do so indirectly (torch.utils.flop_counter), so it is
# set here, before any test module loads. setdefault: export TRITON_INTERPRET=0 on a GPU to test
# the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Calibrations keep the best ceiling per machine fingerprint (dsbench/hardware.py with_best_known):
# the tests' go to a file of this session's, not the user's ~/.cache.
import tempfile  # noqa: E402

os.environ.setdefault("DSBENCH_CALIBRATION_CACHE", os.path.join(tempfile.mkdtemp(prefix="dsbench-calib-"), "calibrations.json"))

import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_SPEC = """
name = "{name}"
device = "cpu"
seed = 0

[model]
size = "debug"
n_layers = 1

[axes]
workload = {workloads}

[train]
steps = 6
batch_size = 2
seq_len = 16
eval_batches = 1

[prefill]
batch_size = 2
seq_lens = {seq_lens}

[decode]
batch_size = 2
context_lens = {context_lens}
new_tokens = 4

[measure]
warmup = 1
repeats = 3
timeout_s = {timeout_s}
calibrate = false
"""


def tiny_spec_text(name="tiny", workloads=("train", "prefill", "decode"), seq_lens=(16,), context_lens=(16,), timeout_s=60) -> str:
    as_toml = lambda xs: "[" + ", ".join(repr(x) if isinstance(x, int) else f'"{x}"' for x in xs) + "]"  # noqa: E731
    return textwrap.dedent(
        TINY_SPEC.format(name=name, workloads=as_toml(workloads), seq_lens=as_toml(seq_lens), context_lens=as_toml(context_lens), timeout_s=timeout_s)
    )


@pytest.fixture
def tiny_spec_file(tmp_path: Path):
    def make(**kwargs) -> Path:
        path = tmp_path / f"{kwargs.get('name', 'tiny')}.toml"
        path.write_text(tiny_spec_text(**kwargs))
        return path

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

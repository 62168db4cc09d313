"""Expert parallelism (variants/expert_parallel.py, dsbench/distributed.py): 2 ranks on CPU (gloo)
against one process with the same weights and the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ep_case import batch, build

HERE = Path(__file__).parent
RMS_TOL = 1e-5  # fp32: the EP path sums the same products in another order (index_add over ranks' rows)


def run_ranks(case: dict, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={case['ranks']}",
           str(HERE / "ep_ranks.py"), json.dumps(case), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(case["ranks"])]


def single_process(case: dict) -> tuple[torch.Tensor, dict]:
    model = build(case)
    inputs, targets = batch(case)
    out = model.forward_losses(inputs, targets)
    out.total().backward()
    return out.losses["lm"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def rms_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_matches_single_process(case: dict, ranks: list[dict]) -> None:
    loss, grads = single_process(case)
    R = case["ranks"]
    assert abs(float(sum(r["loss"] for r in ranks)) / R - float(loss)) < 1e-5 * abs(float(loss))
    for name, grad in grads.items():
        if ".experts." in name:  # rank r holds the r-th contiguous block of experts
            got = torch.cat([r["grads"][name] for r in ranks])
        else:
            got = ranks[0]["grads"][name]
            assert torch.equal(got, ranks[1]["grads"][name]), f"{name}: replicated gradients differ between ranks"
        assert got.shape == grad.shape, name
        assert rms_rel(got, grad) < RMS_TOL, f"{name}: {rms_rel(got, grad):.2e}"


MOE = {"ffn": "moe", "ranks": 2, "batch": 2, "seq": 16}
# deepseekmoe at debug size has 4·16 − n_shared routed experts: 2 shared leave 62, which 2 ranks split.
DEEPSEEKMOE = {**MOE, "ffn": "deepseekmoe", "overrides": {"n_shared": 2}}


@pytest.mark.parametrize("case", [DEEPSEEKMOE, MOE], ids=["deepseekmoe", "moe"])
def test_forward_and_backward_equal_the_single_process(tmp_path, case):
    ranks = run_ranks(case, tmp_path)
    assert_matches_single_process(case, ranks)
    assert all(r["bytes_sent"][0] > 0 for r in ranks)


def test_an_idle_expert_and_every_token_on_one_rank(tmp_path):
    """Expert 0 gets no token, and rank 1's experts none either: zero-size splits both ways."""
    E = 16  # moe at debug size; rank 0 holds experts 0–7, rank 1 experts 8–15
    case = {**MOE, "overrides": {"balance": "bias"}, "bias": {0: -10.0, **{e: -10.0 for e in range(E // 2, E)}}}
    ranks = run_ranks(case, tmp_path)
    assert_matches_single_process(case, ranks)
    assert all(n > 0 for n in ranks[0]["rows_received"]) and ranks[1]["rows_received"] == [0, 0]
    for layer in (0, 1):
        assert not ranks[0]["grads"][f"blocks.{layer}.ffn.experts.w1_ECF"][0].any()  # expert 0 saw no token
        assert ranks[0]["grads"][f"blocks.{layer}.ffn.experts.w1_ECF"][1].any()


def test_device_limited_routing_reaches_at_most_topk_group_ranks(tmp_path):
    case = {**MOE, "overrides": {"n_group": 2, "topk_group": 1}}
    ranks = run_ranks(case, tmp_path)
    assert_matches_single_process(case, ranks)
    assert all(v == 1.0 for r in ranks for v in r["ranks_per_token"])

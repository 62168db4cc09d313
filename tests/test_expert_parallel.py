"""Expert parallelism (variants/expert_parallel.py, dsbench/distributed.py): 2 ranks on CPU (gloo)
against one process with the same weights and the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dsbench import spec as spec_lib
from dsbench.errors import SpecError
from dsbench.results import load_results
from dsbench.runner import run_sweep, worker_command
from ep_case import batch, build

HERE = Path(__file__).parent
RMS_TOL = 1e-5  # fp32: the EP path sums the same products in another order (index_add over ranks' rows)


def run_ranks(case: dict, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={case['ranks']}",
           str(HERE / "ep_ranks.py"), json.dumps(case), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
        if ".experts." in name:  # rank r holds the r-th contiguous block of experts (or slots of a placement)
            got = torch.cat([r["grads"][name] for r in ranks])
            phy2log = ranks[0]["phy2log"][int(name.split(".")[1])]
            if phy2log is not None:  # a replicated expert's gradient is the sum of its replicas'
                got = torch.zeros_like(grad).index_add_(0, phy2log, got)
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


def test_redundant_experts_placed_by_eplb_leave_outputs_and_gradients_unchanged(tmp_path):
    """Expert 0 hot (bias +1): EPLB gives it replicas on both ranks; outputs are those of one
    process, the replicas' gradients sum to its gradient, and the ranks' load evens out."""
    case = {**MOE, "overrides": {"balance": "bias"}, "bias": {0: 1.0, 1: 1.0}, "redundant": 2}
    ranks = run_ranks(case, tmp_path)
    assert_matches_single_process(case, ranks)
    for layer in (0, 1):
        phy2log = ranks[0]["phy2log"][layer]
        assert phy2log.numel() == 18 and set(phy2log.tolist()) == set(range(16))
        hot = phy2log.view(2, 9)  # rank r holds slots 9r … 9r + 8
        assert (hot == 0).any(dim=1).all() and (hot == 1).any(dim=1).all()  # the hot experts on both ranks
    received = [r["rows_received"] for r in ranks]
    plain = run_ranks({**case, "redundant": 0}, tmp_path)
    plain_received = [r["rows_received"] for r in plain]
    spread = lambda rows: max(max(layer) / (sum(layer) / 2) for layer in zip(*rows))  # noqa: E731
    assert spread(received) < spread(plain_received)


def test_device_limited_routing_reaches_at_most_topk_group_ranks(tmp_path):
    case = {**MOE, "overrides": {"n_group": 2, "topk_group": 1}}
    ranks = run_ranks(case, tmp_path)
    assert_matches_single_process(case, ranks)
    assert all(v == 1.0 for r in ranks for v in r["ranks_per_token"])


# --- the [parallel] section, cell identity, and cells run under torchrun ---


EP_SPEC = {
    "name": "ep", "device": "cpu", "model": {"size": "debug", "n_layers": 1},
    "axes": {"workload": ["train", "prefill"], "ffn": ["dense", "moe"]},
    "train": {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_batches": 1},
    "prefill": {"batch_size": 2, "seq_lens": [16]},
    "measure": {"warmup": 1, "repeats": 2, "calibrate": False, "timeout_s": 90},
}


def ep_spec(**changes) -> spec_lib.SweepSpec:
    return spec_lib.parse_spec({**EP_SPEC, **changes})


@pytest.mark.parametrize("changes, words", [
    ({"parallel": {"ep": 3}}, ["parallel.ep", "3", "16 routed experts", "moe"]),
    ({"parallel": {"ep": 0}}, ["parallel.ep", "0"]),
    ({"parallel": {"ep": 2}, "axes": {"ffn": ["dense"]}}, ["parallel.ep", "routed FFN", "axes.ffn = dense"]),
    ({"parallel": {"redundant_experts": 2}}, ["parallel.redundant_experts", "parallel.ep > 1"]),
    ({"parallel": {"ep": 2}, "ffn": {"aux_device_alpha": 0.01}, "axes": {"ffn": ["moe"], "balance": ["aux"]}},
     ["ffn.n_devices", "1", "parallel.ep = 2", "set ffn.n_devices = 2"]),
    ({"parallel": {"gpus": 2}}, ["parallel.gpus", "unknown"]),
    ({"parallel": {"ep": 2, "redundant_experts": 2}, "axes": {"workload": ["train"], "ffn": ["moe"]}},
     ["parallel.redundant_experts", "prefill cells only"]),
    ({"parallel": {"ep": 2, "redundant_experts": 1}}, ["parallel.redundant_experts", "1", "16 routed experts", "multiple of 2"]),
])
def test_bad_parallel_settings_are_one_line_naming_the_key(changes, words):
    with pytest.raises(SpecError) as e:
        ep_spec(**changes)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_one_process_cells_keep_their_ids_and_ep_applies_to_routed_cells_only():
    plain = {c.label(): c.cell_id for c in spec_lib.expand(ep_spec(), "cpu")}
    assert {c.label(): c.cell_id for c in spec_lib.expand(ep_spec(parallel={"ep": 1}), "cpu")} == plain
    cells = spec_lib.expand(ep_spec(axes={**EP_SPEC["axes"], "parallel.ep": [1, 2]}), "cpu")
    by_ep = {}
    for c in cells:
        by_ep.setdefault(c.ep, []).append(c)
    assert sorted(c.axes["ffn"] for c in by_ep[2]) == ["moe", "moe"]  # dense cells: n/a, run once
    assert {c.cell_id for c in by_ep[1]} == set(plain.values())
    assert not {c.cell_id for c in by_ep[2]} & set(plain.values())
    ep2 = by_ep[2][0]
    assert worker_command(ep2, Path("t.json"), Path("r.json"))[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert worker_command(by_ep[1][0], Path("t.json"), Path("r.json"))[1:3] == ["-m", "dsbench.worker"]


def test_a_sweep_runs_ep_cells_under_torchrun_and_a_crashing_rank_fails_its_cell(tmp_path, monkeypatch):
    spec = ep_spec(parallel={"ep": 2, "redundant_experts": 2}, axes={**EP_SPEC["axes"], "ffn": ["moe"]})
    monkeypatch.setenv("DSBENCH_INJECT_FAULT", "raise@train/moe@rank=1")
    outcome = run_sweep(spec, out=tmp_path / "run")
    cells = load_results(tmp_path / "run").cells.set_index("workload")
    assert outcome.ran == 2 and outcome.failed == 1
    crashed = cells.loc["train"]
    assert crashed["status"] == "error" and crashed["error"].startswith("rank 1: RuntimeError: injected fault")
    prefill = cells.loc["prefill"]  # redundant experts: prefill cells only
    assert prefill["status"] == "ok" and prefill["ep"] == 2 and prefill["redundant_experts"] == 2, prefill["error"]
    assert crashed["redundant_experts"] == 0 and "ep=2" in prefill["label"]
    assert 0 < prefill["a2a_share"] < 1 and prefill["a2a_dispatch_ms"] > 0 and prefill["a2a_combine_ms"] > 0
    assert 1 <= prefill["ranks_per_token"] <= 2 and prefill["a2a_bytes_per_token"] > 0
    assert 1 <= prefill["ep_straggler_factor"] <= 2 and 1 <= prefill["ep_straggler_factor_eplb"] <= 2
    # The cell's throughput counts both ranks' batches; per rank, one's own.
    assert prefill["tokens_per_s_median"] == pytest.approx(2 * prefill["tokens_per_step"] / (prefill["step_time_ms_median"] / 1e3))


def test_a_rank_that_dies_without_a_word_fails_its_cell_through_the_survivor(tmp_path, monkeypatch):
    """os._exit on rank 1: rank 0's collective loses its peer and its error (gloo's source-location
    prefix stripped: the sweep's console would read it as markup) becomes the cell's."""
    spec = ep_spec(parallel={"ep": 2}, axes={"workload": ["prefill"], "ffn": ["moe"]})
    monkeypatch.setenv("DSBENCH_INJECT_FAULT", "exit@prefill/moe@rank=1")
    run_sweep(spec, out=tmp_path / "run")
    row = load_results(tmp_path / "run").cells.iloc[0]
    # Whichever comes first: rank 0's own error (its peer gone), or torchrun ending rank 0 before
    # it noticed, which then names rank 1 as the first failure. Both race on a loaded machine.
    survivor = row["error"].startswith("rank 0: ") and "peer" in row["error"]
    root_cause = row["error"] == "rank 1 exited with code 3 before the cell's result was written (torchrun's first observed failure)"
    assert row["status"] == "error" and (survivor or root_cause), row["error"]
    assert "[/" not in row["error"] and "\n" not in row["error"]


def test_a_hanging_rank_times_out_and_no_rank_outlives_the_cell(tmp_path, monkeypatch):
    spec = ep_spec(parallel={"ep": 2}, axes={"workload": ["prefill"], "ffn": ["moe"]},
                   measure={**EP_SPEC["measure"], "timeout_s": 10})
    monkeypatch.setenv("DSBENCH_INJECT_FAULT", "hang@prefill/moe@rank=1")
    run_sweep(spec, out=tmp_path / "run")
    row = load_results(tmp_path / "run").cells.iloc[0]
    assert row["status"] == "timeout"
    time.sleep(1)  # PR_SET_PDEATHSIG: the ranks get SIGKILL as torchrun dies
    survivors = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_mentions(p, str(tmp_path))]
    assert not survivors


def _cmdline_mentions(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_an_ep_train_cell_trains_as_one_process_on_the_global_batch(tmp_path):
    """2 ranks × batch 2 = one process × batch 4, step for step: losses, held-out loss and balance
    (bias balancing: the bias update sees both ranks' loads), through AdamW and global clipping."""
    spec = spec_lib.parse_spec({
        **EP_SPEC, "axes": {"workload": ["train"], "ffn": ["deepseekmoe"], "balance": ["bias"]},
        "ffn": {"n_shared": 2}, "train": {**EP_SPEC["train"], "grad_clip": 0.05},
        "sweep": [{"train": {"batch_size": 2}, "parallel": {"ep": 2}}, {"train": {"batch_size": 4}}],
    })
    run_sweep(spec, out=tmp_path / "run")
    cells = load_results(tmp_path / "run").cells.set_index("ep")
    assert (cells["status"] == "ok").all(), cells["error"].tolist()
    for column in ("first_loss", "final_loss", "eval_loss", "maxvio_batch_mean", "maxvio_global"):
        assert cells.loc[2, column] == pytest.approx(cells.loc[1, column], rel=1e-5), column
    ep2 = cells.loc[2]
    assert 0 < ep2["a2a_share"] < 1 and ep2["a2a_dispatch_ms"] > 0 and ep2["a2a_combine_ms"] > 0
    assert 1 <= ep2["ranks_per_token"] <= 2 and 1 <= ep2["ep_straggler_factor"] <= 2
    assert ep2["a2a_bytes_per_token"] > 0 and pd.isna(ep2["ep_straggler_factor_eplb"])

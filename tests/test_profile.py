"""`dsbench profile`: attribution of step time to the parts' ranges, memory, roofline, CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch.autograd.profiler import record_function

from dsbench import accounting, roofline
from dsbench import profile as profile_lib
from dsbench.profile import OTHER, attribute, read_trace
from dsbench.results import load_results
from dsbench.spec import available_axis_values
from dsbench.spec import expand, parse_spec
from dsbench.task import ProfileRequest, Runtime
from dsbench.variants import profiling, registry
from dsbench.variants.decoder import build_model
from dsbench.worker import measure_cell
from tests.test_cli import assert_usage_error, dsbench, dsbench_in_process

WORKLOADS = ("train", "prefill", "decode", "speculative")


V4_SMALL = {"window": 8, "hca_ratio": 8, "index_topk": 4, "schedule": "v4-window|csa,hca"}  # entries close within 32 tokens


def tiny_cell(workload="train", ffn="dense", attention="mha", precision="fp32", balance="none", ffn_settings=None):
    v4 = {k: v for k, v in V4_SMALL.items() if k in registry.config_fields("attention", attention)}
    raw = {
        "name": "p", "device": "cpu", "model": {"size": "debug", "n_layers": 2}, "ffn": ffn_settings or {}, "attention": v4,
        "axes": {"workload": workload, "ffn": ffn, "attention": attention, "precision": precision, "balance": balance},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 32, "eval_batches": 0},
        "prefill": {"batch_size": 2, "seq_lens": [32]},
        "decode": {"batch_size": 2, "context_lens": [32], "new_tokens": 6},
        "speculative": {"batch_size": 2, "context_lens": [32], "new_tokens": 6, "train_steps": [2]},
        "measure": {"warmup": 1, "repeats": 3, "calibrate": False},
    }
    if workload == "speculative":  # it drafts with an MTP module
        raw["model"]["mtp"] = 1
    [cell] = expand(parse_spec(raw), "cpu")
    return cell


def profiled(tmp_path, cell) -> tuple[dict, dict]:
    """(results row, profile summary) of one cell measured and profiled in this process."""
    request = ProfileRequest(str(tmp_path), profile_lib.ProfileOptions(steps=2))
    row, _ = measure_cell(cell, Runtime(), request)
    return row, profile_lib.load_profile(tmp_path / row["profile_dir"])


# Every variant of every axis appears at least once; each routed one with the parts it must show.
# Four experts (8 fine-grained) keep FP8's per-expert quantisation quick on a CPU.
CASES = [
    ("train", "dense", "mha", "fp32", "none", {"ffn", "attn.proj", "attn.core", "loss", "optimizer"}),
    ("train", "moe", "gqa", "fp32", "aux", {"router", "dispatch", "experts", "balance", "routing_stats"}),
    ("train", "deepseekmoe", "mla", "fp8", "bias", {"router", "experts", "shared_experts", "fp8_quant", "attn.rope"}),
    ("prefill", "moe", "mqa", "fp8-tensorwise", "bias", {"experts", "fp8_quant", "lm_head"}),
    ("decode", "dense", "mla", "bf16", "none", {"attn.proj", "attn.core", "sample"}),
    ("decode", "deepseekmoe", "mla-naive", "fp32", "aux", {"shared_experts", "attn.core", "sample"}),
    ("speculative", "dense", "mha", "fp32", "none", {"mtp", "attn.core", "lm_head", "sample"}),
    ("train", "dense", "dsa", "fp32", "none", {"indexer", "attn.proj", "attn.core"}),
    ("decode", "dense", "csa", "fp32", "none", {"attn.compress", "indexer", "attn.core"}),
    ("prefill", "dense", "hca", "fp32", "none", {"attn.compress", "attn.core"}),
    ("train", "dense", "v4-window", "fp32", "none", {"attn.proj", "attn.core"}),
    ("train", "dense", "v4-hybrid", "bf16", "none", {"attn.compress", "indexer", "attn.core"}),
]
FEW_EXPERTS = {"n_experts": 4, "granularity": 2}


def few_experts(ffn: str) -> dict | None:
    """FEW_EXPERTS as far as this FFN reads it (a key the sweep's variant does not read is an error)."""
    if ffn == "dense":
        return None
    return {k: v for k, v in FEW_EXPERTS.items() if k in registry.config_fields("ffn", ffn)}


def test_cases_cover_every_variant():
    values = available_axis_values()
    for axis, i in (("workload", 0), ("ffn", 1), ("attention", 2), ("precision", 3), ("balance", 4)):
        assert {case[i] for case in CASES} >= set(values[axis]) - {"n/a"}, axis


@pytest.mark.parametrize("workload,ffn,attention,precision,balance,expected", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_named_parts_cover_the_step(tmp_path, workload, ffn, attention, precision, balance, expected):
    row, summary = profiled(tmp_path, tiny_cell(workload, ffn, attention, precision, balance, few_experts(ffn)))
    parts = {p["part"]: p for p in summary["parts"]}
    assert expected <= set(parts), sorted(parts)
    assert set(parts) <= set(profiling.PARTS) | {"autograd", OTHER}
    # Named parts explain ≥ 90% of the step; the rest is the step's own glue ("other").
    assert summary["coverage"] >= profile_lib.COVERAGE_TARGET, parts.get(OTHER)
    # The parts partition the step: they sum to the profiler's step total, which matches the
    # StepTimer's total for the same steps within TIMER_TOLERANCE.
    assert sum(p["total_ms"] for p in parts.values()) == pytest.approx(summary["breakdown_ms_per_step"], rel=1e-9)
    assert abs(summary["breakdown_vs_timer"] - 1) <= profile_lib.TIMER_TOLERANCE
    assert all(p["total_ms"] >= 0 for p in parts.values())
    if workload == "train":  # every module's backward lands on the module, not on the engine
        assert parts["attn.proj"]["backward_ms"] > 0 and parts["lm_head"]["backward_ms"] > 0
    else:
        assert all(p["backward_ms"] == 0 for p in parts.values())
    assert summary["step_ms_unprofiled"] > 0 and summary["overhead"] is not None
    assert parts["attn.proj"]["ops_per_step"] > 0 and summary["ops_per_step"] >= sum(p["ops_per_step"] for p in parts.values()) - 1e-9
    assert row["profile_coverage"] == summary["coverage"]


def test_trace_is_json_and_ranges_nest(tmp_path):
    cell = tiny_cell("train", "deepseekmoe", "mla", balance="bias", ffn_settings=FEW_EXPERTS)
    row, summary = profiled(tmp_path, cell)
    trace = read_trace(tmp_path / row["profile_dir"] / summary["trace"])
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert len(events) > 100
    ours = [e for e in events if e["name"].startswith(profiling.PREFIX)]
    steps = [e for e in ours if e["name"] == profiling.PREFIX + profiling.STEP]
    assert len(steps) == summary["steps_profiled"] == 2
    paths = {path for path, _ in build_model(cell.model).named_modules()}
    by_thread: dict[int, list] = {}
    for e in ours:
        by_thread.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
        parsed = profiling.parse(e["name"])
        if parsed[0] not in (profiling.STEP, profiling.WARMUP, profiling.PREFILL):
            assert parsed[0] in profiling.PARTS or parsed[0] == "autograd", e["name"]
            assert parsed[1] in paths | {"", "model"}, e["name"]
    for spans in by_thread.values():  # any two ranges: disjoint, or one inside the other
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple] = []
        for start, end, name in spans:
            while stack and stack[-1][1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1][1] + 1e-3, (name, stack[-1])
            stack.append((start, end, name))
    # Every part range inside a step sits under a step range, never across one's edge.
    for start, end, name in (s for spans in by_thread.values() for s in spans):
        inside = [st for st in steps if st["ts"] <= start < st["ts"] + st["dur"]]
        assert all(end <= st["ts"] + st["dur"] + 1e-3 for st in inside), name


def test_backward_goes_to_the_forward_range_not_to_a_no_grad_neighbour():
    """A no_grad op shows the sequence number the next autograd node will take: the node must
    still be credited to the op that created it, not to the no_grad range that ran first."""
    linear = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256)
    with profiling.enabled(), torch.profiler.profile() as prof:
        for _ in range(2):
            with record_function(profiling.PREFIX + profiling.STEP):
                with torch.no_grad(), profiling.part("grad_clip"):
                    x.detach().mul(2)
                with profiling.part("ffn", linear):
                    y = linear(x).square().sum()
                with profiling.part("autograd"):
                    y.backward()
    split = attribute(prof.events())
    assert split.n_steps == 2
    backward = {part: us for (part, _, bwd), us in split.time_us.items() if bwd}
    assert backward.get("ffn", 0) > 0
    assert "grad_clip" not in backward
    # The linear's backward (two matmuls, the bias sum, square's backward) is credited to ffn: far
    # more of the backward's ops than autograd's own seed. Op counts, not times: a loaded machine
    # can stretch any one range, so a time comparison here failed under load.
    backward_ops = {part: n for (part, _, bwd), n in split.ops.items() if bwd}
    assert backward_ops.get("ffn", 0) > 2 * backward_ops.get("autograd", 0)


def test_memory_breakdown_reads_live_sizes(tmp_path):
    cell = tiny_cell("train")
    _, summary = profiled(tmp_path, cell)
    memory = {m["category"]: m["bytes"] for m in summary["memory"]}
    params = accounting.accounting(cell)["params_total"] * 4  # fp32, a tied head counted once
    assert memory["parameters"] == params
    assert memory["gradients"] == params  # every parameter trains
    assert memory["optimizer_state"] >= 2 * params  # AdamW: exp_avg and exp_avg_sq (plus step counters)
    assert memory["activations"] > 0 and memory["step_peak"] > 0
    assert memory["kv_cache"] is None

    decode = tiny_cell("decode", attention="mla")
    _, summary = profiled(tmp_path / "d", decode)
    memory = {m["category"]: m["bytes"] for m in summary["memory"]}
    w = decode.workload
    assert memory["kv_cache"] == accounting.accounting(decode)["kv_cache_bytes_per_token"] * w["batch_size"] * (w["context_len"] + w["new_tokens"])
    assert memory["gradients"] is None and memory["activations"] == 0


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("ffn,attention,precision", [("dense", "mha", "fp32"), ("moe", "gqa", "bf16"), ("deepseekmoe", "mla", "fp8"),
                                                     ("deepseekmoe", "mla-naive", "fp32"), ("dense", "mqa", "fp8-tensorwise")])
def test_part_flops_sum_to_the_cells_flops(workload, ffn, attention, precision):
    routed = ffn != "dense"
    cell = tiny_cell(workload, ffn, attention, precision, "aux" if routed else "none", {"first_k_dense": 1} if routed else None)
    costs = roofline.part_costs(cell)
    total = sum(c.flops for c in costs.values())
    assert total == pytest.approx(accounting.flops_per_token(cell) * accounting.tokens_per_step(cell), rel=1e-12)
    assert all(c.bytes is None or c.bytes > 0 for c in costs.values())


def test_roofline_places_parts_by_intensity():
    roof = roofline.Ceilings(peak_flops_per_s=100e9, bandwidth_bytes_per_s=10e9, source="test")  # ridge 10 FLOP/B
    compute = roofline.place(roofline.PartCost(flops=1e9, bytes=1e7), seconds=0.02, roof=roof)  # 100 FLOP/B
    assert compute["bound"] == "compute" and compute["roof_fraction"] == pytest.approx(0.5)  # 50 of 100 GFLOP/s
    memory = roofline.place(roofline.PartCost(flops=1e8, bytes=1e8), seconds=0.05, roof=roof)  # 1 FLOP/B
    assert memory["bound"] == "memory" and memory["roof_fraction"] == pytest.approx(0.2)  # 2 of the 10 GFLOP/s attainable
    copy = roofline.place(roofline.PartCost(flops=0, bytes=5e8), seconds=0.1, roof=roof)
    assert copy["bound"] == "memory" and copy["roof_fraction"] == pytest.approx(0.5)  # 5 of 10 GB/s
    assert roofline.place(roofline.PartCost(0.0, None), 0.1, roof)["bound"] is None


@pytest.mark.slow
def test_sweep_profile_report_and_cli(tmp_path, tiny_spec_file):
    spec = tiny_spec_file(workloads=("train", "decode"))
    out = tmp_path / "run"
    done = dsbench("run", "sweep", str(spec), "--out", str(out), "--profile", "--profile-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    cells = load_results(out).cells
    assert cells["profile_dir"].notna().all() and (cells["profile_coverage"] >= profile_lib.COVERAGE_TARGET).all()
    for folder in cells["profile_dir"]:
        for name in ("parts.csv", "parts_by_path.csv", "memory.csv", "profile.json", profile_lib.TRACE_FILE):
            assert (out / folder / name).exists(), name
        assert not pd.read_csv(out / folder / "parts.csv").empty
    report = tmp_path / "report"
    done = dsbench("report", str(out), "--out", str(report))
    assert done.returncode == 0, done.stderr
    md = (report / "index.md").read_text()
    assert "## Profiles" in md and profile_lib.TRACE_FILE in md
    assert (report / "figures" / "profile_breakdown.png").exists()
    # `dsbench profile --results … --cell …` profiles the recorded cell again.
    cell_id = cells["cell_id"].iloc[0]
    done = dsbench("profile", "--results", str(out), "--cell", cell_id[:6], "--out", str(tmp_path / "again"), "--profile-steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "named parts cover" in done.stdout and "profiling overhead" in done.stdout
    summary = json.loads((tmp_path / "again" / "profiles" / cell_id / "profile.json").read_text())
    assert summary["cell_id"] == cell_id


def test_bad_selection_is_one_line_and_exit_2(tmp_path, tiny_spec_file):
    spec = tiny_spec_file()
    assert_usage_error(dsbench_in_process("profile", str(spec), "--cell", "ffffffff"), "--cell", "ffffffff", "no cell")
    assert_usage_error(dsbench_in_process("profile", str(spec)), "--cell", "choose one")
    assert_usage_error(dsbench_in_process("profile", "--cell", "abc"), "--cell", "--results")
    assert_usage_error(dsbench_in_process("profile", "--results", str(tmp_path), "--cell", "abc"), "--results", "not a dsbench results folder")
    assert_usage_error(dsbench_in_process("profile", "--ffn", "nope"), "ffn", "nope")
    assert_usage_error(dsbench_in_process("profile", "--profile-steps", "0"), "--profile-steps", "0", "≥ 1")
    assert_usage_error(dsbench_in_process("run", "sweep", str(spec), "--profile", "--profile-steps", "0", "--out", str(tmp_path / "x")),
                       "--profile-steps", "0")
    assert not (tmp_path / "x").exists()  # nothing ran

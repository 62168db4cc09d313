"""The implementation seam (dsbench/kernels/choice.py): pins, auto's measured pick and its check
against the reference, the kernels.* spec keys and axes, and what a row records."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dsbench.kernels import choice
from dsbench.spec import expand, kernel_plan, parse_spec
from tests.test_cli import assert_usage_error, dsbench_in_process


def _toy_family(name: str, wrong_by: float = 0.0, broken: bool = False) -> choice.Family:
    """x ↦ 2x three ways: the reference, a correct copy that is slower, and one off by `wrong_by`."""
    def slow(x):
        for _ in range(20):
            y = x * 2
        return y

    def fast_but(x):
        if broken:
            raise RuntimeError("No available kernel. Aborting execution.")
        return x * (2 + wrong_by)

    return choice.register(choice.Family(
        name=name, reference="reference",
        implementations={"reference": choice.Implementation("reference", slow),
                         "fast": choice.Implementation("fast", fast_but),
                         "gpu_only": choice.Implementation("gpu_only", lambda x: x * 2, lambda x: "needs a GPU",
                                                           lambda device: None if device == "cuda" else "needs a GPU")},
        key=lambda x: (x.shape,), tolerance=1e-6))


@pytest.fixture
def toy():
    yield _toy_family("toy")
    choice.FAMILIES.pop("toy")


def test_auto_takes_the_fastest_correct_and_records_why(toy):
    chooser = choice.Chooser(reps=3)
    x = torch.randn(256, 256)
    with choice.use(chooser):
        out = choice.run("toy", x)
        choice.run("toy", x)  # the same key: decided once
    torch.testing.assert_close(out, 2 * x)
    assert chooser.ran == {"toy": {"fast"}}
    [(key, decision)] = chooser.decisions.items()
    assert decision.name == "fast" and decision.why.startswith("auto: fast ")
    assert "gpu_only (needs a GPU)" in decision.why
    row = chooser.columns()
    assert row["kernel_toy"] == "fast" and "max error" in row["kernel_toy_why"]


@pytest.mark.parametrize("wrong_by,broken,reason", [(1e-3, False, "error 5.0e-04 > 1e-06"), (0.0, True, "No available kernel")])
def test_auto_leaves_out_a_wrong_or_refusing_implementation(wrong_by, broken, reason):
    _toy_family("toy_bad", wrong_by, broken)
    try:
        chooser = choice.Chooser(reps=2)
        with choice.use(chooser):
            out = choice.run("toy_bad", torch.ones(64))
        torch.testing.assert_close(out, torch.full((64,), 2.0))
        assert chooser.ran == {"toy_bad": {"reference"}}
        assert reason in next(iter(chooser.decisions.values())).why
    finally:
        choice.FAMILIES.pop("toy_bad")


def test_a_nonfinite_reference_decides_nothing(toy):
    chooser = choice.Chooser()
    with choice.use(chooser):
        choice.run("toy", torch.full((4,), float("nan")))
    assert chooser.decisions == {} and chooser.ran == {"toy": {"reference"}}


def test_a_pin_runs_as_asked_and_refuses_where_it_cannot(toy):
    with choice.use(choice.Chooser(pins={"toy": "reference"})) as chooser:
        choice.run("toy", torch.ones(3))
    assert chooser.columns() == {"kernel_toy": "reference", "kernel_toy_why": "pinned"}
    with choice.use(choice.Chooser(pins={"toy": "gpu_only"})), pytest.raises(choice.KernelUnavailable, match="kernels.toy: 'gpu_only'"):
        choice.run("toy", torch.ones(3))


def test_trials_are_not_counted_by_an_enclosing_flop_counter(toy):
    from torch.utils.flop_counter import FlopCounterMode

    a, b = torch.randn(32, 64), torch.randn(64, 16)
    fam = choice.register(choice.Family("toy_mm", "reference", {
        "reference": choice.Implementation("reference", torch.mm), "also": choice.Implementation("also", lambda x, y: x @ y)},
        key=lambda x, y: (x.shape, y.shape), tolerance=1e-5))
    try:
        with choice.use(choice.Chooser()), FlopCounterMode(display=False) as counter:
            choice.run(fam.name, a, b)
        assert counter.get_total_flops() == 2 * 32 * 64 * 16  # one call, not 1 + 2 × (1 + reps) trials
    finally:
        choice.FAMILIES.pop("toy_mm")


def test_builtin_families_name_a_reference_that_runs_on_cpu():
    for name in choice.families():
        fam = choice.family(name)
        assert fam.implementations[fam.reference].device_ok("cpu") is None, name
        assert all(impl.name == key for key, impl in fam.implementations.items()), name
    assert {"attention", "fp8_gemm", "mla_decode"} <= set(choice.families())


# --- the spec: [kernels] and kernels.* axes ---


def _spec(**extra) -> dict:
    return {"name": "k", "device": "cpu", "axes": {"workload": ["train"], "precision": ["fp32", "fp8"]},
            "train": {"steps": 2, "batch_size": 1, "seq_len": 16}, "measure": {"warmup": 1}, **extra}


def test_a_kernels_axis_applies_only_to_cells_that_call_the_family():
    spec = parse_spec(_spec(axes={"workload": ["train"], "precision": ["fp32", "fp8"],
                                  "kernels.fp8_gemm": ["reference", "scaled_mm_loop"]}))
    cells = expand(spec, "cpu")
    by = {(c.axes["precision"], c.axes["kernels.fp8_gemm"]): c for c in cells}
    assert set(by) == {("fp32", "n/a"), ("fp8", "reference"), ("fp8", "scaled_mm_loop")}
    assert by[("fp8", "reference")].measure["kernels"] == {"fp8_gemm": "reference"}
    assert "kernels" not in by[("fp32", "n/a")].measure
    assert kernel_plan(by[("fp8", "scaled_mm_loop")])["fp8_gemm"] == "scaled_mm_loop"


def test_auto_keeps_every_cell_id(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite's interpreter lets triton run on a CPU
    plain = {c.label(): c.cell_id for c in expand(parse_spec(_spec()), "cpu")}
    auto = {c.label(): c.cell_id for c in expand(parse_spec(_spec(kernels={"fp8_gemm": "auto", "attention": "auto"})), "cpu")}
    assert plain == auto
    fp8 = next(c for c in expand(parse_spec(_spec()), "cpu") if c.axes["precision"] == "fp8")
    assert kernel_plan(fp8)["fp8_gemm"] == "auto(reference|scaled_mm_loop)"


@pytest.mark.parametrize("kernels,needles", [
    ({"fp8_gem": "auto"}, ("kernels.fp8_gem", "unknown op family", "fp8_gemm")),
    ({"fp8_gemm": "cutlass"}, ("kernels.fp8_gemm", "'cutlass'", "allowed: auto, reference")),
    ({"fp8_gemm": 3}, ("kernels.fp8_gemm", "expected a string")),
    ({"mla_decode": "triton"}, ("kernels.mla_decode", "'triton' cannot run on cpu", "GPU")),
])
def test_bad_kernels_keys_are_one_line(tmp_path, monkeypatch, kernels, needles):
    import tomllib  # noqa: F401  (the file is written by hand below)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite's interpreter would let triton run on a CPU
    lines = ['name = "k"', 'device = "cpu"', "[kernels]"] + [f"{k} = {v!r}".replace("'", '"') for k, v in kernels.items()]
    spec = tmp_path / "k.toml"
    spec.write_text("\n".join(lines) + "\n")
    assert_usage_error(dsbench_in_process("run", "sweep", str(spec), "--dry-run"), *needles)


def test_a_sweep_row_records_its_implementations_and_its_light(tmp_path):
    spec = tmp_path / "k.toml"
    spec.write_text('name = "k"\ndevice = "cpu"\n[axes]\nworkload = ["train", "decode"]\nprecision = ["fp32", "fp8"]\n'
                    '"kernels.fp8_gemm" = ["scaled_mm_loop"]\n[train]\nsteps = 3\nbatch_size = 2\nseq_len = 32\n'
                    '[decode]\nbatch_size = 2\ncontext_lens = [32]\nnew_tokens = 4\n[measure]\nwarmup = 1\nrepeats = 2\n')
    done = dsbench_in_process("run", "sweep", str(spec), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    cells = pd.read_parquet(tmp_path / "run" / "cells.parquet")
    assert (cells["status"] == "ok").all(), cells[["label", "error"]]
    fp8, fp32 = cells[cells["precision"] == "fp8"], cells[cells["precision"] == "fp32"]
    assert (fp8["kernel_fp8_gemm"] == "scaled_mm_loop").all() and (fp8["kernel_fp8_gemm_why"] == "pinned").all()
    assert fp32["kernel_fp8_gemm"].isna().all()
    assert cells["kernel_attention"].notna().all() and cells["kernel_attention_why"].str.contains("auto: ").all()
    # fp32 rows have a bound; emulated FP8 has no ceiling on a CPU, and says so
    assert set(fp32["sol_bound"]) <= {"compute", "memory"} and (fp32["sol_fraction"] > 0).all()
    light_ms = fp32["step_time_ms_median"] * fp32["sol_fraction"]
    assert ((fp32["sol_step_ms"] - light_ms).abs() <= 1e-9 * light_ms).all()
    assert fp8["sol_bound"].isna().all() and fp8["sol_note"].str.contains("emulated").all()
    from dsbench.report import build_report
    from dsbench.results import load_results

    md = (build_report([load_results(tmp_path / "run")], out=tmp_path / "report") / "index.md").read_text()
    section = md.split("## Implementations and speed of light")[1].split("\n## ")[0]
    assert "| run | cell | attention | fp8_gemm | bound | light ms | step ms | of light | MBU | note |" in section
    assert section.count("| scaled_mm_loop |") == 2 and "emulated on cpu" in section


@pytest.mark.parametrize("backward", [False, True])
def test_attention_bench_times_every_implementation_that_runs(tmp_path, backward):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "a.json"
    args = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "attention_bench.py"), "--device", "cpu",
            "--shape", "2,4,2,33,16", "--reps", "2", "--json", str(out)] + (["--backward"] if backward else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {r["implementation"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(choice.family("attention").implementations)
    ran = [r for r in rows.values() if not r["why_not"]]
    assert {"reference", "sdpa", "sdpa_math"} <= {r["implementation"] for r in ran}
    assert all(r["rms_rel_error"] <= 1e-5 and r["tflops"] > 0 for r in ran)
    assert rows["sdpa_cudnn"]["why_not"] == "a CUDA backend of SDPA"


def test_every_variant_and_precision_names_families_that_exist():
    from dsbench.variants import registry
    from dsbench.variants.config import config_from_size
    from dsbench.variants.precision import PRECISIONS

    known = set(choice.families())
    for precision in PRECISIONS.values():
        assert set(precision.kernel_families) <= known, precision.name
    for section, table in registry.TABLES.items():
        for kind, entry in table.items():
            cfg = config_from_size("debug", **{section: kind})
            for decodes in (False, True):
                assert set(entry.module.kernel_families(cfg, decodes)) <= known, (section, kind)

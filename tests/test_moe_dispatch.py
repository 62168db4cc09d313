"""The routed experts' two dispatch paths (grouped_mm, padded_bmm) against a per-expert reference,
the chooser's pick and its record (the moe_dispatch column), compiled dispatch, and the benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsbench.variants import moe
from dsbench.variants.config import config_from_size, with_parts
from dsbench.variants.decoder import _over_layers, build_model
from dsbench.variants.moe import GROUPED_MM, PADDED_BMM, DispatchChooser, GroupedExperts, grouped_mm

ROOT = Path(__file__).resolve().parents[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_case(seed: int):
    """(x, w, ends): E experts (some empty, one holding most rows), K and N aligned to 16 bytes
    in either dtype, so both paths run."""
    g = torch.Generator().manual_seed(seed)
    E = [1, 2, 5, 8, 16, 64][seed % 6]
    K, N = (8 * int(torch.randint(1, 6, (1,), generator=g)) for _ in range(2))
    counts_E = torch.randint(0, 9, (E,), generator=g)
    counts_E[torch.rand(E, generator=g) < 0.3] = 0  # empty experts
    counts_E[int(torch.randint(0, E, (1,), generator=g))] += int(torch.randint(0, 40, (1,), generator=g))  # a hot one
    x = torch.randn(int(counts_E.sum()), K, generator=g)
    w = torch.randn(E, K, N, generator=g)
    return x, w, counts_E.cumsum(0)


def reference(x: torch.Tensor, w: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Each expert's rows times its weight, one matmul per expert, in float64."""
    starts = [0, *ends_E[:-1].tolist()]
    return torch.cat([x[s:e].double() @ w[i].double() for i, (s, e) in enumerate(zip(starts, ends_E.tolist()))])


# fp32: the same products summed in another order (RMS-relative 1e-5); bf16: one rounding of the
# inputs (2⁻⁸) and of the output
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(12))
def test_both_paths_equal_the_per_expert_reference(seed, dtype):
    x, w, ends = random_case(seed)
    expected = reference(x.to(dtype), w.to(dtype), ends)
    outs = {p: grouped_mm(x.to(dtype), w.to(dtype), ends, p) for p in (GROUPED_MM, PADDED_BMM)}
    for path, out in outs.items():
        assert out.dtype == dtype and out.shape == expected.shape, path
        assert rel_err(out, expected) < TOLERANCE[dtype], path
    if dtype == torch.float32:  # the two paths agree to fp32 rounding
        assert rel_err(outs[GROUPED_MM], outs[PADDED_BMM]) < 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_both_paths_give_the_same_gradients(seed):
    x, w, ends = random_case(seed)
    grads = {}
    for path in (GROUPED_MM, PADDED_BMM):
        xp, wp = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = grouped_mm(xp, wp, ends, path)
        grads[path] = torch.autograd.grad(out, [xp, wp], torch.ones_like(out) * torch.arange(out.shape[1]))
    for g_grouped, g_padded in zip(grads[GROUPED_MM], grads[PADDED_BMM]):
        assert rel_err(g_grouped, g_padded) < 1e-6


def test_forcing_grouped_mm_where_it_cannot_run_is_refused():
    x, w = torch.randn(3, 10), torch.randn(2, 10, 6)  # 40-byte rows: not 16-byte aligned
    with pytest.raises(ValueError, match="path: grouped_mm does not run"):
        grouped_mm(x, w, torch.tensor([1, 3]), GROUPED_MM)


class FakeTrials:
    """moe._trial replaced by a clock that advances by a set cost per path."""

    def __init__(self, cost_s: dict[str, float]):
        self.cost_s, self.now_s, self.calls = cost_s, 0.0, 0

    def clock(self) -> float:
        return self.now_s

    def trial(self, path, *args) -> None:
        self.now_s += self.cost_s[path]
        self.calls += 1


@pytest.mark.parametrize("grouped_s, padded_s, picked", [
    (1.0, 2.0, GROUPED_MM), (2.0, 1.0, PADDED_BMM), (1.0, 1.0, GROUPED_MM),  # a tie: by name
])
def test_the_chooser_keeps_the_faster_path_and_measures_each_shape_once(monkeypatch, grouped_s, padded_s, picked):
    fake = FakeTrials({GROUPED_MM: grouped_s, PADDED_BMM: padded_s})
    monkeypatch.setattr(moe, "_trial", fake.trial)
    chooser = DispatchChooser(reps=3, clock=fake.clock)
    x, w, ends = random_case(3)
    assert chooser.choose(x, w, ends) == picked
    assert fake.calls == 2 * (3 + 1)  # one untimed call each, then three timed rounds
    assert chooser.trials_s[chooser.key(x, w, ends)] == {GROUPED_MM: grouped_s, PADDED_BMM: padded_s}
    fake.cost_s = {GROUPED_MM: padded_s, PADDED_BMM: grouped_s}  # the costs swap: the pick holds
    assert [chooser.choose(x, w, ends) for _ in range(3)] == [picked] * 3
    assert fake.calls == 8
    chooser.choose(torch.cat([x, x, x]), w, ends * 3)  # more rows than the bucket: measured anew
    assert fake.calls == 16 and len(chooser.picks) == 2


@pytest.mark.parametrize("counts, pad_bucket", [
    ([4, 4, 4, 4], 1), ([5, 4, 4, 3], 2), ([8, 8, 0, 0], 2), ([13, 1, 1, 1], 4), ([16, 0, 0, 0], 4),
])
def test_the_padding_bucket_is_e_times_the_busiest_count_over_the_rows(counts, pad_bucket):
    ends = torch.tensor(counts).cumsum(0)
    key = DispatchChooser.key(torch.randn(16, 8), torch.randn(4, 8, 8), ends)
    assert key[-2] == pad_bucket


def test_a_skewed_load_of_the_same_shapes_is_measured_anew(monkeypatch):
    fake = FakeTrials({GROUPED_MM: 2.0, PADDED_BMM: 1.0})
    monkeypatch.setattr(moe, "_trial", fake.trial)
    chooser = DispatchChooser(reps=1, clock=fake.clock)
    x, w = torch.randn(16, 8), torch.randn(4, 8, 8)
    assert chooser.choose(x, w, torch.tensor([4, 8, 12, 16])) == PADDED_BMM
    fake.cost_s = {GROUPED_MM: 1.0, PADDED_BMM: 2.0}
    assert chooser.choose(x, w, torch.tensor([13, 14, 15, 16])) == GROUPED_MM  # pad 3.25: its own pick
    assert chooser.choose(x, w, torch.tensor([4, 8, 12, 16])) == PADDED_BMM  # the balanced pick holds


def test_unaligned_rows_take_padded_bmm_without_a_measurement(monkeypatch):
    fake = FakeTrials({GROUPED_MM: 1.0, PADDED_BMM: 2.0})
    monkeypatch.setattr(moe, "_trial", fake.trial)
    chooser = DispatchChooser(clock=fake.clock)
    assert chooser.choose(torch.randn(3, 10), torch.randn(2, 10, 6), torch.tensor([1, 3])) == PADDED_BMM
    assert fake.calls == 0 and not chooser.picks


def test_a_real_measurement_is_made_once_and_reused():
    chooser = DispatchChooser()
    x, w, ends = random_case(5)
    first = chooser.choose(x, w, ends)
    assert first in (GROUPED_MM, PADDED_BMM) and len(chooser.trials_s) == 1
    assert all(chooser.choose(x, w, ends) == first for _ in range(5)) and len(chooser.trials_s) == 1


@pytest.mark.parametrize("d_ff, expected", [
    (192, {GROUPED_MM, PADDED_BMM}),  # expert width 96: either, as measured
    (180, {PADDED_BMM}),  # expert width 90: 360-byte rows, not 16-byte aligned
])
def test_the_path_taken_is_the_moe_dispatch_column(d_ff, expected):
    cfg = with_parts(config_from_size("debug", d_ff=d_ff), ffn={"kind": "moe", "balance": "none", "n_experts": 4})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model(torch.randint(0, cfg.vocab_size, (2, 16)))
    columns = model.collect_metrics()[1]
    assert columns["moe_dispatch"] in expected or (columns["moe_dispatch"] == "mixed" and len(expected) == 2)
    assert "maxvio_train" in columns  # the balance columns still come through beside it
    labels = {b.ffn.experts.dispatch_label() for b in model.blocks}
    assert labels <= expected | {"mixed"}


@pytest.mark.parametrize("values, combined", [
    (["grouped_mm", "grouped_mm"], "grouped_mm"), (["grouped_mm", "padded_bmm"], "mixed"), ([0.5, 1.5], 1.0),
])
def test_a_parts_own_columns_combine_over_layers(values, combined):
    assert _over_layers(values) == combined


@pytest.mark.slow
@pytest.mark.parametrize("dtype, path, breaks", [
    (torch.bfloat16, GROUPED_MM, False),  # compiled: the rule, grouped_mm, one graph
    (torch.float32, PADDED_BMM, True),  # grouped_mm does not trace in fp32: padded_bmm, int(max) breaks the graph
])
def test_compiled_dispatch_follows_the_rule_and_matches_eager(dtype, path, breaks):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8).to(dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, ends = torch.randn(20, 16, dtype=dtype), torch.tensor([5, 5, 12, 20])
    eager = experts(x, ends)
    experts.paths_run.clear()
    compiled = torch.compile(experts)(x, ends)
    assert experts.paths_run == {path}
    assert (sum(torch._dynamo.utils.counters["graph_break"].values()) > 0) == breaks
    assert rel_err(compiled, eager) < TOLERANCE[dtype]


def test_torch_compile_cannot_trace_an_fp32_grouped_mm():
    """Why compiled fp32 takes padded_bmm (moe._grouped_mm_runs): the meta function wants bf16."""
    torch._dynamo.reset()
    x, w, ends = torch.randn(8, 16), torch.randn(2, 16, 8), torch.tensor([3, 8], dtype=torch.int32)
    torch._grouped_mm(x, w, offs=ends)  # eager runs it
    with pytest.raises(Exception, match="Expected inputs of BF16 type"):
        torch.compile(lambda a, b, o: torch._grouped_mm(a, b, offs=o))(x, w, ends)


def test_the_benchmark_prints_its_table_on_a_tiny_shape(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "moe_dispatch_bench.py"), "--quick", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| debug")]
    assert {line.split(" | ")[11] for line in table} == {GROUPED_MM, PADDED_BMM}  # the path column
    assert len(table) == 4 and all("n=" in line for line in table)  # two paths × fwd, fwd+bwd, each timed
    assert (tmp_path / "r.json").exists()


def test_the_benchmark_refuses_a_bad_count():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "moe_dispatch_bench.py"), "--experts", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip() == "--experts: 0 is not allowed (a positive integer)"

"""The routed experts' op family `moe_experts` (kernels/grouped_mm.py): every implementation
against a float64 per-expert reference, forward and backward, on odd shapes; the grouped GEMM
custom op; auto's pick and its key through the active chooser (kernels/choice.py); the record it
feeds (the moe_dispatch column); no host sync in the routed path; and the benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsbench.kernels import choice, families  # noqa: F401  (families: every built-in family registers)
from dsbench.kernels import grouped_mm as G
from dsbench.variants import profiling
from dsbench.variants.config import config_from_size, with_parts
from dsbench.variants.decoder import _over_layers, build_model
from dsbench.variants.experts import GroupedExperts
from dsbench.variants.moe import MoEFeedForward

ROOT = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("reference", "grouped_mm", "padded_bmm", "expert_loop")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def expected(x, w1, w3, w2, ends, weight):
    """Each expert's rows through its SwiGLU in float64, times the gate weights."""
    starts = [0, *ends[:-1].tolist()]
    x, w1, w3, w2 = (t.double() for t in (x, w1, w3, w2))
    rows = [(torch.nn.functional.silu(x[s:e] @ w1[i]) * (x[s:e] @ w3[i])) @ w2[i] for i, (s, e) in enumerate(zip(starts, ends.tolist()))]
    out = torch.cat(rows)
    return out if weight is None else out * weight.double()[:, None]


def case(E: int, C: int, F: int, seed: int, dtype=torch.float32, weighted=True):
    """E experts, some of them empty, one holding most rows; grad-requiring leaves."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 9, (E,), generator=g)
    counts[torch.rand(E, generator=g) < 0.3] = 0
    counts[int(torch.randint(0, E, (1,), generator=g))] += int(torch.randint(0, 40, (1,), generator=g))
    M = int(counts.sum())
    leaves = [torch.randn(M, C, generator=g), 0.3 * torch.randn(E, C, F, generator=g),
              0.3 * torch.randn(E, C, F, generator=g), 0.3 * torch.randn(E, F, C, generator=g)]
    weight = torch.rand(M, generator=g) if weighted else None
    leaves = [t.to(dtype).requires_grad_() for t in leaves]
    return (*leaves, counts.cumsum(0), None if weight is None else weight.to(dtype).requires_grad_())


# fp32: the same products summed in another order (RMS-relative 1e-5); bf16: inputs, hidden rows
# and output rounded to bf16 (2⁻⁸ each), at points that differ between implementations.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SHAPES = [(1, 16, 8), (7, 24, 40), (64, 16, 24), (7, 12, 10)]  # (E, C, F); the last not 16-byte aligned


def test_the_family_is_registered_with_its_implementations():
    fam = choice.family("moe_experts")
    assert tuple(fam.implementations) == IMPLEMENTATIONS and fam.reference == "reference"
    assert fam.compile_order == ("expert_loop", "grouped_mm") and fam.trial is not None
    assert choice.check_pins({"moe_experts": "padded_bmm"}, "cpu") is None
    assert "'expert_loop' cannot run on cuda" in choice.check_pins({"moe_experts": "expert_loop"}, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("E, C, F", SHAPES)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_each_implementation_equals_the_reference_forward_and_backward(name, E, C, F, dtype):
    for seed, weighted in ((E, True), (E + 1, False)):
        x, w1, w3, w2, ends, weight = case(E, C, F, seed, dtype, weighted)
        leaves = [t for t in (x, w1, w3, w2, weight) if t is not None]
        out = G.MOE_EXPERTS.implementations[name].fn(x, w1, w3, w2, ends, weight)
        assert out.dtype == dtype and out.shape == (x.shape[0], C)
        want = expected(x, w1, w3, w2, ends, weight)
        assert rel_err(out, want) < TOLERANCE[dtype]
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        got = torch.autograd.grad(out, leaves, grad_out)
        wanted = torch.autograd.grad(want, leaves, grad_out.double())
        for g_got, g_want in zip(got, wanted):
            assert g_got.dtype == dtype and rel_err(g_got, g_want) < TOLERANCE[dtype]
        idle = [e for e, n in enumerate(torch.diff(ends, prepend=ends.new_zeros(1)).tolist()) if n == 0]
        assert all(float(g[idle].abs().sum()) == 0 for g in got[1:4])  # an expert without rows gets no gradient


def test_no_rows_at_all():
    x, w1, w3, w2 = torch.randn(0, 16), torch.randn(3, 16, 8), torch.randn(3, 16, 8), torch.randn(3, 8, 16)
    for name in IMPLEMENTATIONS:
        assert G.MOE_EXPERTS.implementations[name].fn(x, w1, w3, w2, torch.zeros(3, dtype=torch.long)).shape == (0, 16)


@pytest.mark.parametrize("shape", [(7, 16, 8), (3, 10, 6)], ids=["aligned", "padded"])
def test_the_grouped_mm_custom_op_passes_torch_opcheck(shape):
    E, K, N = shape
    x, w = torch.randn(11, K, requires_grad=True), torch.randn(E, K, N, requires_grad=True)
    ends = torch.tensor(sorted(torch.randint(0, 12, (E,)).tolist()))
    ends[-1] = 11
    torch.library.opcheck(G.grouped_mm, (x, w, ends))
    torch.library.opcheck(G.grouped_mm_wgrad, (x.detach(), torch.randn(11, N), ends))


class FakeTrials:
    """The family's trial replaced by a clock that advances by a set cost per implementation."""

    def __init__(self, cost_s: dict[str, float]):
        self.cost_s, self.now_s, self.calls = cost_s, 0.0, 0
        self.names = {impl.fn: name for name, impl in G.MOE_EXPERTS.implementations.items()}

    def clock(self) -> float:
        return self.now_s

    def trial(self, fn, *args) -> None:
        self.now_s += self.cost_s[self.names[fn]]
        self.calls += 1


def costs(**fast) -> dict[str, float]:
    return {name: fast.get(name, 5.0) for name in IMPLEMENTATIONS}


@pytest.mark.parametrize("fastest", ["grouped_mm", "padded_bmm", "expert_loop"])
def test_auto_keeps_the_fastest_and_measures_each_key_once(monkeypatch, fastest):
    fake = FakeTrials(costs(**{fastest: 1.0}))
    monkeypatch.setattr(G.MOE_EXPERTS, "trial", fake.trial)
    chooser = choice.Chooser(reps=3, clock=fake.clock)
    x, w1, w3, w2, ends, weight = case(8, 16, 8, 3)
    before = profiling.untimed_work()
    assert chooser.pick(G.MOE_EXPERTS, x, w1, w3, w2, ends, weight).name == fastest
    assert fake.calls == 3 * len(IMPLEMENTATIONS) and profiling.untimed_work() == before + 1  # that step is no sample
    fake.cost_s = costs(reference=0.5)  # the costs change: the pick holds
    assert [chooser.pick(G.MOE_EXPERTS, x, w1, w3, w2, ends, weight).name for _ in range(3)] == [fastest] * 3
    assert fake.calls == 12
    more = torch.cat([x, x, x])  # more rows than the bucket: measured anew
    chooser.pick(G.MOE_EXPERTS, more, w1, w3, w2, ends * 3, torch.cat([weight] * 3))
    assert fake.calls == 24 and chooser.ran == {"moe_experts": {fastest, "reference"}}


def test_training_and_inference_calls_are_keyed_apart_and_a_training_trial_runs_backward(monkeypatch):
    x, w1, w3, w2, ends, weight = case(8, 16, 8, 4)
    key = G.MOE_EXPERTS.key
    with torch.no_grad():
        inference = key(x, w1, w3, w2, ends, weight)
    assert key(x, w1, w3, w2, ends, weight) != inference
    backward_ran = []
    hook = lambda grad: backward_ran.append(True)  # noqa: E731
    w1.register_hook(hook)  # the trial's leaves are detached copies: the caller's tensors see nothing
    G._trial(G.experts_grouped_mm, x, w1, w3, w2, ends, weight)
    assert not backward_ran and w1.grad is None
    seen = []
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: seen.append(self.shape))
    G._trial(G.experts_grouped_mm, x, w1, w3, w2, ends, weight)
    assert seen == [(x.shape[0], 16)]


@pytest.mark.parametrize("counts, pad_bucket", [
    ([4, 4, 4, 4], 1), ([5, 4, 4, 3], 2), ([8, 8, 0, 0], 2), ([13, 1, 1, 1], 4), ([16, 0, 0, 0], 4),
])
def test_the_padding_bucket_is_e_times_the_busiest_count_over_the_rows(counts, pad_bucket):
    ends = torch.tensor(counts).cumsum(0)
    x, w = torch.randn(16, 8), torch.randn(4, 8, 8)
    assert G.MOE_EXPERTS.key(x, w, w, w, ends)[-1] == pad_bucket


def test_a_skewed_load_of_the_same_shapes_is_measured_anew(monkeypatch):
    fake = FakeTrials(costs(padded_bmm=1.0))
    monkeypatch.setattr(G.MOE_EXPERTS, "trial", fake.trial)
    chooser = choice.Chooser(reps=1, clock=fake.clock)
    x, w, w2 = torch.randn(16, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    assert chooser.pick(G.MOE_EXPERTS, x, w, w, w2, torch.tensor([4, 8, 12, 16])).name == "padded_bmm"
    fake.cost_s = costs(grouped_mm=1.0)
    assert chooser.pick(G.MOE_EXPERTS, x, w, w, w2, torch.tensor([13, 14, 15, 16])).name == "grouped_mm"  # pad 3.25
    assert chooser.pick(G.MOE_EXPERTS, x, w, w, w2, torch.tensor([4, 8, 12, 16])).name == "padded_bmm"  # the balanced pick holds


def test_off_a_cpu_the_key_reads_no_count_and_grouped_mm_is_the_only_candidate(monkeypatch):
    """Meta tensors hold no values: a key or a rule that read the counts (a GPU sync) would raise."""
    monkeypatch.setattr(G, "grouped_mm_runs", lambda x: None)  # as on a GPU where it runs
    x, w, ends = torch.empty(16, 8, device="meta"), torch.empty(4, 8, 8, device="meta"), torch.empty(4, dtype=torch.long, device="meta")
    assert len(G.MOE_EXPERTS.key(x, w, w, w, ends)) == len(G.MOE_EXPERTS.key(*case(4, 8, 8, 0)[:5])) - 1  # no padding bucket
    runs, why_not = G.MOE_EXPERTS.candidates(x, w, w, w, ends)
    assert runs == ["grouped_mm"] and "a GPU sync every call" in why_not["padded_bmm"] and "CPU" in why_not["expert_loop"]
    chooser = choice.Chooser()
    assert chooser.choose(G.MOE_EXPERTS, x, w, w, w, ends) == "grouped_mm"
    assert "only one runs here" in next(iter(chooser.decisions.values())).why


def test_a_real_measurement_is_made_once_and_reused():
    chooser = choice.Chooser()
    x, w1, w3, w2, ends, weight = case(5, 16, 8, 5)
    first = chooser.pick(G.MOE_EXPERTS, x, w1, w3, w2, ends, weight).name
    assert first in IMPLEMENTATIONS and len(chooser.decisions) == 1
    assert "auto: " in next(iter(chooser.decisions.values())).why
    assert all(chooser.pick(G.MOE_EXPERTS, x, w1, w3, w2, ends, weight).name == first for _ in range(5))
    assert len(chooser.decisions) == 1


def moe_model(d_ff: int = 192):
    cfg = with_parts(config_from_size("debug", d_ff=d_ff), ffn={"kind": "moe", "balance": "none", "n_experts": 4})
    torch.manual_seed(0)
    return build_model(cfg).train(), cfg


@pytest.mark.parametrize("d_ff", [192, 180])  # expert width 96; 90: 360-byte rows, padded for grouped_mm
def test_the_implementation_taken_is_the_moe_dispatch_column(d_ff):
    model, cfg = moe_model(d_ff)
    with choice.use(choice.Chooser()):
        model(torch.randint(0, cfg.vocab_size, (2, 16)))
    columns = model.collect_metrics()[1]
    assert columns["moe_dispatch"] in (*IMPLEMENTATIONS, "mixed")
    assert "maxvio_train" in columns  # the balance columns still come through beside it
    labels = {b.ffn.experts.dispatch_label() for b in model.blocks}
    assert labels <= {*IMPLEMENTATIONS, "mixed"}


@pytest.mark.parametrize("pin", ["grouped_mm", "padded_bmm", "expert_loop", "reference"])
def test_a_pinned_implementation_is_what_runs_and_what_the_column_says(pin):
    model, cfg = moe_model()
    chooser = choice.Chooser(pins={"moe_experts": pin})
    with choice.use(chooser):
        model(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert model.collect_metrics()[1]["moe_dispatch"] == pin
    assert chooser.ran["moe_experts"] == {pin}  # the attention family ran too


@pytest.mark.parametrize("values, combined", [
    (["grouped_mm", "grouped_mm"], "grouped_mm"), (["grouped_mm", "padded_bmm"], "mixed"), ([0.5, 1.5], 1.0),
])
def test_a_parts_own_columns_combine_over_layers(values, combined):
    assert _over_layers(values) == combined


class HostReads(TorchDispatchMode):
    """Every read of a tensor's value on the host (.item(), int(), float(), bool()) goes through
    aten._local_scalar_dense: on a GPU, each is a sync."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("balance, extra", [("aux", {}), ("bias", {"seq_aux_alpha": 1e-3}), ("none", {"capacity_factor": 1.0})])
def test_the_routed_training_forward_reads_nothing_on_the_host(balance, extra):
    """With grouped_mm pinned (auto measures on its first call; the host paths read bounds by design)."""
    cfg = with_parts(config_from_size("debug"), ffn={"kind": "deepseekmoe", "balance": balance, "n_experts": 4, **extra})
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg).train()
    x = torch.randn(2, 16, cfg.d_model, requires_grad=True)
    with choice.use(choice.Chooser(pins={"moe_experts": "grouped_mm"})), HostReads() as mode:
        out = layer(x)
        loss = out.square().mean() + (layer.aux_loss if layer.aux_loss is not None else 0)
        loss.backward()
    assert mode.reads == 0
    _, summary = layer.stats.layer_metrics(0, None)  # read once, afterwards
    assert 0 <= summary["dropped_fraction"] <= 1 and summary["maxvio_train"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("pin", ["auto", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_experts_compile_whole_and_match_eager(dtype, pin):
    """Both custom-op paths trace whole: on a CPU auto compiles expert_loop (the first of the
    family's compile_order that runs here), a pin compiles grouped_mm."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8).to(dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, ends, weight = torch.randn(20, 16, dtype=dtype), torch.tensor([5, 5, 12, 20]), torch.rand(20, dtype=dtype)
    x.requires_grad_(True)
    chooser = choice.Chooser() if pin == "auto" else choice.Chooser(pins={"moe_experts": pin})
    with choice.use(chooser):
        eager = experts(x, ends, weight)
        (eager_dx,) = torch.autograd.grad(eager.sum(), x)
        experts.paths_run.clear()
        compiled = torch.compile(experts, fullgraph=True)(x, ends, weight)
        (compiled_dx,) = torch.autograd.grad(compiled.sum(), x)
    expected = "expert_loop" if pin == "auto" else pin
    assert experts.compiled_path == expected and experts.dispatch_label() == expected
    assert rel_err(compiled, eager) < TOLERANCE[dtype] and rel_err(compiled_dx, eager_dx) < TOLERANCE[dtype]
    torch._dynamo.reset()


def test_torch_compile_cannot_trace_torchs_own_fp32_grouped_mm():
    """Why grouped_mm is a custom op (kernels/grouped_mm.py): torch's meta function wants bf16.
    When torch lifts it, this fails and the custom op can go."""
    torch._dynamo.reset()
    x, w, ends = torch.randn(8, 16), torch.randn(2, 16, 8), torch.tensor([3, 8], dtype=torch.int32)
    torch._grouped_mm(x, w, offs=ends)  # eager runs it
    with pytest.raises(Exception, match="Expected inputs of BF16 type"):
        torch.compile(lambda a, b, o: torch._grouped_mm(a, b, offs=o))(x, w, ends)
    torch._dynamo.reset()


def test_the_benchmark_prints_its_table_on_a_tiny_shape(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "moe_dispatch_bench.py"), "--quick", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| debug")]
    assert {line.split(" | ")[11] for line in table} == {"grouped_mm", "padded_bmm", "expert_loop"}  # the path column
    assert len(table) == 6 and all("n=" in line for line in table)  # three paths × fwd, fwd+bwd, each timed
    assert (tmp_path / "r.json").exists()


def test_the_benchmark_refuses_a_bad_count():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "moe_dispatch_bench.py"), "--experts", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip() == "--experts: 0 is not allowed (a positive integer)"


def test_the_layer_benchmark_prints_its_ratios_on_a_tiny_shape():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "moe_layer_bench.py"), "--size", "debug", "--experts", "4",
                          "--tokens", "64", "--rounds", "2", "--warmup", "1", "--threads", "1", "--clock", "cpu", "--pin", "grouped_mm"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "experts ran grouped_mm" in out.stdout
    assert {"dense", "moe", "moe_uniform", "naive_loop"} <= {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")}

"""Compiled measurement (dsbench/compiled.py): torch.compile with inductor on this CPU computes
what eager computes, for every value of every axis, and the cell's compile columns say what
compiling did.

Tolerances (relative L2 error of compiled against eager, same weights and inputs):
- fp32: 1e-5 for logits, 1e-4 for gradients. Inductor fuses and reorders reductions, so sums
  differ in their last bits; the backward sums over more terms.
- bf16: 2e-2. Fused kernels keep fp32 intermediates that eager rounds to bf16 between ops, so
  the two differ by bf16 rounding of intermediates (2^-8 = 3.9e-3 each).
- fp8 gradients: 2^-4, one E4M3 rounding (3 mantissa bits, V3 §3.3). Inputs that differ by bf16
  rounding quantise to neighbouring E4M3 values here and there (measured: 3.7e-2); a wrong scale
  or a missing dequantisation is off by far more. The FP8 GEMMs and quantisation themselves are
  opaque custom ops, eager inside (variants/fp8.py): what differs is inductor's code around them.
Each case resets dynamo first and checks that something compiled, so a case that silently fell
back to eager (dynamo's per-function recompile limit, shared across cases) cannot pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

from dsbench import compiled
from dsbench.errors import SpecError
from dsbench.spec import expand, parse_spec
from dsbench.variants.config import config_from_size
from dsbench.variants.decoder import build_model
from dsbench.worker import measure_cell
from dsbench.task import Runtime

# Inductor on a CPU compiles for seconds to minutes a case (C++ per kernel, twice for a
# backward), so each value of each axis gets the phase that exercises it: every attention value
# decodes (prefill, then positions over the cache: the recompile from a constant position to a
# dynamic one), every FFN and precision value trains (forward, loss and backward), and one case
# does both.
CASES = [
    ("mha", "dense", "fp32", "both", {}),
    ("gqa", "dense", "fp32", "inference", {}),
    ("mqa", "dense", "fp32", "inference", {}),
    ("mla", "dense", "fp32", "inference", {}),
    ("mla-naive", "dense", "fp32", "inference", {}),
    ("dsa", "dense", "fp32", "inference", {}),
    ("mha", "moe", "fp32", "train", {"balance": "aux"}),
    ("mha", "deepseekmoe", "fp32", "train", {"balance": "bias"}),
    ("mha", "dense", "bf16", "train", {}),
    ("mha", "dense", "fp8", "both", {}),  # FP8 inference too: the custom ops under inference_mode
    ("mha", "dense", "fp8-tensorwise", "train", {}),
    ("mha", "moe", "fp8", "train", {}),  # the experts' FP8 grouped GEMM
]
TOLERANCE = {"fp32": (1e-5, 1e-4), "bf16": (2e-2, 2e-2), "fp8": (2e-2, 2 ** -4), "fp8-tensorwise": (2e-2, 2 ** -4)}
B, T, DECODED = 2, 32, 3


def tiny_model(attention: str, ffn: str, precision: str, extra: dict) -> torch.nn.Module:
    overrides = {"n_layers": 1, "precision": precision, **extra}
    if ffn != "dense":
        overrides.update(n_experts=4, top_k=2)
    if attention == "dsa":  # a top-k smaller than the sequence, so the sparse selection is exercised
        overrides.update(index_topk=8)
    torch.manual_seed(0)
    return build_model(config_from_size("debug", attention=attention, ffn=ffn, **overrides))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def autocast(precision: str, device: str = "cpu"):
    dtype = None if precision == "fp32" else torch.bfloat16
    return torch.autocast(device, dtype=dtype) if dtype else torch.autocast(device, enabled=False)


def inference(model, tokens, dtype) -> list[torch.Tensor]:
    """Prefill logits, then DECODED greedy steps' logits over the cache."""
    model.eval()
    with torch.inference_mode():
        caches = model.new_caches(B, T + DECODED, dtype, "cpu")
        logits = [model(tokens, 0, caches)[:, -1]]
        for i in range(DECODED):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), T + i, caches)[:, -1])
    return logits


def train_grads(model, tokens, precision, forward_losses=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    with autocast(precision, tokens.device.type):
        loss = (forward_losses or model.forward_losses)(tokens, tokens.roll(-1, dims=1)).total({})
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("attention,ffn,precision,phase,extra", CASES, ids=[f"{a}-{f}-{p}-{ph}" for a, f, p, ph, _ in CASES])
def test_compiled_equals_eager(attention, ffn, precision, phase, extra):
    logits_tol, grad_tol = TOLERANCE[precision]
    eager = tiny_model(attention, ffn, precision, extra)
    tokens = torch.randint(0, eager.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    fused = copy.deepcopy(eager)
    torch._dynamo.reset()
    watch = compiled.compile_model(fused, "compile", trains=phase != "inference")
    try:
        if phase != "inference":
            loss_e, grads_e = train_grads(eager, tokens, precision)
            loss_c, grads_c = train_grads(fused, tokens, precision)
            assert rel(loss_c, loss_e) < logits_tol
            assert len(grads_c) == len(grads_e)
            worst = max(rel(c, e) for c, e in zip(grads_c, grads_e))
            assert worst < grad_tol, f"gradients differ by {worst:.2e} (relative L2)"
        if phase != "train":
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            eager, fused = eager.to(dtype), fused.to(dtype)
            for step, (c, e) in enumerate(zip(inference(fused, tokens, dtype), inference(eager, tokens, dtype))):
                assert rel(c, e) < logits_tol, f"logits of step {step} differ by {rel(c, e):.2e}"
        assert counters["frames"]["ok"] > 0, "nothing compiled: the case ran eager"
        columns = watch.columns()
        assert columns["compiles"] >= 1 and columns["compile_mode"] == "compile"
        # the FP8 parts are opaque custom ops, the routed path has no host sync: every case compiles
        # whole but DSA's, whose top-k selection has data-dependent sizes (recorded as breaks)
        if attention == "dsa":
            assert columns["graph_breaks"] > 0 and columns["graph_break_reasons"]
        else:
            assert columns["graph_breaks"] == 0, columns["graph_break_reasons"]
    finally:
        compiled.stop()
        torch._dynamo.reset()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("precision", ["fp8", "fp8-tensorwise"])
def test_fp8_trains_under_a_fullgraph_compile_as_in_eager(precision, device):
    """The FP8 linears are opaque custom ops (variants/fp8.py): dynamo traces a dense FP8 model's
    losses with fullgraph=True (any graph break would raise), inductor compiles around them, and one
    training step, loss and every gradient, equals eager's within the FP8 tolerances above. After
    an optimizer step the compiled graph quantises the new weights: its loss equals eager's on them."""
    logits_tol, grad_tol = TOLERANCE[precision]
    eager = tiny_model("mha", "dense", precision, {}).to(device)
    tokens = torch.randint(0, eager.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1)).to(device)
    fused = copy.deepcopy(eager)
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(compile_threads=1):
            forward_losses = torch.compile(fused.forward_losses, fullgraph=True)
            loss_e, grads_e = train_grads(eager, tokens, precision)
            loss_c, grads_c = train_grads(fused, tokens, precision, forward_losses)
            assert rel(loss_c, loss_e) < logits_tol
            assert len(grads_c) == len(grads_e) == len(list(eager.parameters()))
            worst = max(rel(c, e) for c, e in zip(grads_c, grads_e))
            assert worst < grad_tol, f"gradients differ by {worst:.2e} (relative L2)"
            torch.optim.SGD(fused.parameters(), lr=1.0).step()
            with torch.no_grad(), autocast(precision, device):
                after_c = forward_losses(tokens, tokens.roll(-1, dims=1)).total({})
                after_e = fused.forward_losses(tokens, tokens.roll(-1, dims=1)).total({})
            assert rel(after_c, after_e) < logits_tol and rel(after_e, loss_e) > 5 * logits_tol  # the weights did change
        assert counters["stats"]["unique_graphs"] >= 1, "nothing compiled"
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise"])
def test_fp8_grouped_mm_traces_in_one_graph(recipe):
    """The experts' FP8 grouped GEMM is one custom op (the MoE layer's own host syncs, bincount and
    .item(), are variants/moe.py's): fullgraph=True compiles it with inductor around it, and the
    output and both gradients equal eager's (a ragged expert, an empty one)."""
    from dsbench.variants.fp8 import fp8_grouped_mm

    torch.manual_seed(0)
    x, w = torch.randn(200, 130, requires_grad=True), (torch.randn(3, 130, 67) * 0.05).requires_grad_()
    ends, dy = torch.tensor([129, 129, 200]), torch.randn(200, 67)

    def experts(x, w, ends):
        return fp8_grouped_mm(torch.nn.functional.silu(x), w, ends, recipe) * 2

    from dsbench.kernels import choice

    pinned = choice.use(choice.Chooser(pins={"fp8_gemm": "reference"}))  # one implementation on both sides
    pinned.__enter__()
    out_e = experts(x, w, ends)
    dx_e, dw_e = torch.autograd.grad(out_e, (x, w), dy)
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(compile_threads=1):
            out_c = torch.compile(experts, fullgraph=True)(x, w, ends)
            dx_c, dw_c = torch.autograd.grad(out_c, (x, w), dy)
        assert counters["stats"]["unique_graphs"] >= 1, "nothing compiled"
    finally:
        torch._dynamo.reset()
        pinned.__exit__(None, None, None)
    assert torch.equal(out_c, out_e) and torch.equal(dw_c, dw_e)
    assert rel(dx_c, dx_e) < 1e-6  # fp32: inductor's fused SiLU backward, the FP8 part is the op's own


def test_a_probe_under_compile_runs_the_fp8_parts_eager_and_records():
    """While a QuantisationProbe is attached, the FP8 linears run eager (a graph break): the probe
    reads values on the host. Without one, nothing breaks."""
    from dsbench.variants import eager
    from dsbench.variants.fp8 import QuantisationProbe

    eager.prepare()  # as compiled.compile_model does
    model = tiny_model("mha", "dense", "fp8", {})
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    try:
        forward_losses = torch.compile(model.forward_losses, backend="eager")
        with QuantisationProbe(model) as probe, autocast("fp8"):
            forward_losses(tokens, tokens.roll(-1, dims=1)).total({}).backward()
        assert counters["graph_break"], "the probe's FP8 parts were traced"
        assert len(probe.sqnr["act"]) == len(probe.layers) and len(probe.sqnr["grad"]) == len(probe.layers)
    finally:
        torch._dynamo.reset()
FP8_ELSEWHERE = "the FP8 GEMMs run eager under compile (variants/eager.py); making them custom ops is branch fp8's work"
BALANCES = [("none", {}), ("aux", {}), ("bias", {}), ("bias", {"seq_aux_alpha": 1e-3})]  # the last: V3's, bias + sequence-wise loss
FULLGRAPH_CASES = [
    *[("dense", p, "n/a", {}) for p in ("fp32", "bf16")],
    *[(f, p, b, extra) for f in ("moe", "deepseekmoe") for p in ("fp32", "bf16") for b, extra in BALANCES],
    *[pytest.param(f, p, "bias", {}, marks=pytest.mark.skip(reason=FP8_ELSEWHERE))
      for f in ("dense", "deepseekmoe") for p in ("fp8", "fp8-tensorwise")],
]


def _case_id(ffn, precision, balance, extra) -> str:
    return f"{ffn}-{precision}-{balance}" + ("+seq_aux" if extra.get("seq_aux_alpha") else "")


@pytest.mark.slow
@pytest.mark.parametrize("ffn,precision,balance,extra", FULLGRAPH_CASES,
                         ids=[_case_id(*(c.values if hasattr(c, "values") else c)) for c in FULLGRAPH_CASES])
def test_every_ffn_precision_and_balance_compiles_as_one_graph(ffn, precision, balance, extra):
    """torch.compile(fullgraph=True): the routed path reads nothing on the host (no .item(), no
    bincount), so training (loss and every gradient) and the forward equal eager's, and the
    graph-break count a compiled cell records (dsbench/compiled.py) is 0.

    bf16 routed cases hold the routing fixed (uniform_routing; scores, gate weights and balance
    losses are still computed and differentiated): top-k is discontinuous, and the compiled
    attention's fused bf16 kernels round differently from eager's, which flips near-tied choices
    (measured: 3 of 448 assignments, 10% on the expert gradients). fp32 cases route as learned."""
    logits_tol, grad_tol = TOLERANCE[precision]
    routed = {"balance": balance, **extra, **({"uniform_routing": True} if precision == "bf16" else {})}
    eager = tiny_model("mha", ffn, precision, {} if ffn == "dense" else routed)
    tokens = torch.randint(0, eager.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    fused = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()  # dynamo's reset leaves its counters
    watch = compiled.CompileWatch("compile").start()
    try:
        fused.forward_losses = torch.compile(fused.forward_losses, fullgraph=True)
        loss_e, grads_e = train_grads(eager, tokens, precision)
        loss_c, grads_c = train_grads(fused, tokens, precision)
        assert rel(loss_c, loss_e) < logits_tol and len(grads_c) == len(grads_e)
        worst = max(rel(c, e) for c, e in zip(grads_c, grads_e))
        assert worst < grad_tol, f"gradients differ by {worst:.2e} (relative L2)"
        forward = torch.compile(fused, fullgraph=True)
        eager.eval(), fused.eval()
        with torch.inference_mode(), autocast(precision):
            assert rel(forward(tokens), eager(tokens)) < logits_tol
        # fullgraph compiles leave counters["frames"] alone (torch 2.13); the graphs are counted
        assert counters["stats"]["unique_graphs"] >= 2
        assert watch.columns()["graph_breaks"] == 0
    finally:
        compiled.stop()
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["aux", "bias"])
def test_a_compiled_routed_train_loop_compiles_once_and_records_what_eager_records(balance):
    """The routing records a compiled forward writes in place (variants/balance.py RoutingStats):
    no Python container grows in the trace, so step after step reuses the first graph (a list's
    length as a guard recompiled every step until dynamo's limit, then ran eager)."""
    def train(model, forward, steps=4):
        model.train()
        for step in range(steps):
            tokens = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(step))
            model.set_token_domains(torch.tensor([0, 1]), ("a", "b"))
            model.begin_step(step)
            forward(tokens, tokens.roll(-1, dims=1)).total({}).backward()
            model.after_optimizer_step()
        return model.collect_metrics()

    eager = tiny_model("mha", "deepseekmoe", "fp32", {"balance": balance})
    fused = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()  # dynamo's reset leaves its counters
    try:
        records_e, columns_e = train(eager, eager.forward_losses)
        records_c, columns_c = train(fused, torch.compile(fused.forward_losses))
        assert counters["frames"]["total"] == 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    assert columns_c["moe_dispatch"] == "expert_loop"  # on a CPU: the first of moe_experts' compile_order that runs
    assert len(records_c) == len(records_e)
    for key in ("maxvio_batch_mean", "maxvio_train", "router_entropy", "dead_expert_fraction", "aux_loss_final"):
        if columns_e[key] is None:  # bias balancing leaves no aux loss
            assert columns_c[key] is None, key
        else:
            assert columns_c[key] == pytest.approx(columns_e[key], rel=1e-5, abs=1e-7), key
    if balance == "bias":  # the bias update read the same loads
        torch.testing.assert_close(fused.blocks[0].ffn.router.expert_bias_E, eager.blocks[0].ffn.router.expert_bias_E)


def spec(compile_value, device="cpu", workloads=("prefill",)) -> dict:
    return {"name": "c", "device": device, "model": {"size": "debug", "n_layers": 1},
            "axes": {"workload": list(workloads), "ffn": "dense", "attention": "mha", "precision": "fp32",
                     "measure.compile": compile_value},
            "train": {"steps": 5, "batch_size": 2, "seq_len": 16, "eval_batches": 0},
            "prefill": {"batch_size": 2, "seq_lens": [16]},
            "decode": {"batch_size": 2, "context_lens": [16], "new_tokens": 4},
            "measure": {"warmup": 1, "repeats": 3, "calibrate": False}}


def test_an_eager_cell_keeps_its_id_and_a_compiled_one_differs():
    eager, = expand(parse_spec(spec("eager")), "cpu")
    plain_raw = spec("eager")
    del plain_raw["axes"]["measure.compile"]
    plain, = expand(parse_spec(plain_raw), "cpu")
    fused, = expand(parse_spec(spec("compile")), "cpu")
    assert eager.cell_id == plain.cell_id and "compile" not in eager.measure
    assert fused.cell_id != eager.cell_id and fused.measure["compile"] == "compile"


@pytest.mark.parametrize("raw,needle", [
    ({"axes": {"measure.compile": "graphs"}}, "measure.compile: 'graphs'"),
    ({"axes": {"measure.compile": ["compile", "compile"]}}, "listed twice"),
    ({"axes": {"measure.warmup": [1, 2]}}, "axes.measure.warmup: measure.warmup says how cells are timed"),
    ({"measure": {"compile": 1}}, "measure.compile"),
    ({"measure": {"compile": "inductor"}}, "measure.compile: 'inductor'"),
])
def test_bad_compile_settings_are_one_line(raw, needle):
    base = spec("eager")
    del base["axes"]["measure.compile"]
    for section, table in raw.items():
        base[section] = {**base.get(section, {}), **table}
    with pytest.raises(SpecError) as info:
        expand(parse_spec(base), "cpu")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cuda_graphs_are_refused_on_a_cpu():
    with pytest.raises(SpecError, match="measure.compile: 'compile-graphs' needs CUDA graphs, so device cuda"):
        expand(parse_spec(spec("compile-graphs")), "cpu")


def test_a_compiled_cell_times_no_step_that_compiled():
    """Decode recompiles when its position stops being a constant; that step is not a sample."""
    torch._dynamo.reset()
    try:
        cells = expand(parse_spec(spec(["eager", "compile"], workloads=("decode",))), "cpu")
        rows = {c.measure.get("compile", "eager"): measure_cell(c, Runtime())[0] for c in cells}
    finally:
        compiled.stop()
        torch._dynamo.reset()
    eager, fused = rows["eager"], rows["compile"]
    assert "compile_s" not in eager
    assert fused["compile_mode"] == "compile" and fused["compile_settled"]
    assert fused["compile_steps"] >= 2  # the prefill's graph, then the first decode step's (and its dynamic recompile)
    assert fused["compile_s"] > 0 and fused["step_time_n"] >= 3
    # A compile takes seconds; a timed decode step of this model, milliseconds.
    assert fused["step_time_ms_p90"] < 1e3 * fused["compile_s"] / fused["compile_steps"]

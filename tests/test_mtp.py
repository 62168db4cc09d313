"""Multi-Token Prediction (variants/mtp.py, DeepSeek-V3 §2.2) and MTP self-speculative decoding
(dsbench/workloads/speculative.py, V3 §5.4.3): shapes, the causal chain, the loss weighting,
accounting against the instantiated modules and FlopCounterMode, speculative output against
plain greedy decoding, cache rollback, the identity rule, and bad values.

CPU, fp32, `debug`-sized models throughout.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsbench import accounting, spec
from dsbench.data import load_dataset
from dsbench.errors import SpecError
from dsbench.measure import StepTimer
from dsbench.variants import mtp, registry
from dsbench.variants.config import config_from_size
from dsbench.variants.decoder import build_model, forward_flops_per_token, param_counts
from dsbench.variants.mla import mla_dims
from dsbench.variants.precision import PRECISIONS
from dsbench.workloads import WORKLOADS, Context
from dsbench.workloads import generate
from dsbench.workloads.speculative import acceptance_by_position

CPU = torch.device("cpu")
# (attention, ffn, D): both cache kinds (MHA's K/V, MLA's latent, MLA's naive K/V) and routed FFNs.
CHAINS = [("mha", "dense", 1), ("mla", "deepseekmoe", 2), ("gqa", "moe", 3), ("mla-naive", "dense", 2)]


def model_for(attention="mha", ffn="dense", depth=1, seed=0, **overrides):
    cfg = config_from_size("debug", attention, ffn, mtp=depth, **overrides)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def tokens(B, T, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


# --- the module and its causal chain ---


@pytest.mark.parametrize("attention, ffn, depth", CHAINS)
def test_module_shapes_and_shared_embedding_and_head(attention, ffn, depth):
    model = model_for(attention, ffn, depth)
    x = tokens(2, 12)
    logits = model.mtp.logits(model.hidden(x), x, model.embed, model.head)
    assert [t.shape for t in logits] == [(2, 12 - k, 256) for k in range(1, depth + 1)]
    own = {id(p) for p in model.mtp.parameters()}
    assert id(model.embed.weight) not in own and id(model.head.weight) not in own
    # The MTP block's routed FFN is routed (its index is past first_k_dense), as V3's MTP layer is.
    assert type(model.mtp.depths[0].block.ffn) is type(model.blocks[-1].ffn)


@pytest.mark.parametrize("attention, ffn, depth", CHAINS)
def test_module_k_at_position_i_sees_tokens_up_to_i_plus_k_only(attention, ffn, depth):
    model, T, i = model_for(attention, ffn, depth), 16, 5
    x = tokens(2, T)
    before = model.mtp.logits(model.hidden(x), x, model.embed, model.head)
    for k in range(1, depth + 1):
        later = x.clone()
        later[:, i + k + 1:] = (later[:, i + k + 1:] + 7) % 256  # every token after i+k changes
        after = model.mtp.logits(model.hidden(later), later, model.embed, model.head)[k - 1]
        # Equal to fp32 rounding: a routed FFN's grouped GEMMs sum in an order that depends on
        # which tokens share an expert, so later tokens move the last bits (a leak moves ~1e-1).
        torch.testing.assert_close(after[:, :i + 1], before[k - 1][:, :i + 1], rtol=1e-5, atol=1e-6)
        # …and the token at i+k itself does reach it (the chain is not cut short).
        at = x.clone()
        at[:, i + k] = (at[:, i + k] + 7) % 256
        moved = model.mtp.logits(model.hidden(at), at, model.embed, model.head)[k - 1]
        assert not torch.allclose(moved[:, i], before[k - 1][:, i])


def test_eh_proj_reads_the_embedding_half_first():
    """DeepSeek's checkpoint lays eh_proj out as [enorm(Emb); hnorm(h)] (vLLM/SGLang load it so):
    with the second half of its columns zeroed, the module no longer depends on h, only on Emb."""
    module = model_for().mtp.depths[0]
    emb, h1, h2 = torch.randn(1, 3, 64), torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    with torch.no_grad():
        module.eh_proj.weight[:, 64:] = 0
        assert torch.equal(module(h1, emb), module(h2, emb))
        assert not torch.allclose(module(h1, emb), module(h1, torch.randn(1, 3, 64)))


def test_losses_are_cross_entropy_per_depth_and_lambda_weights_their_mean():
    model = model_for("mha", "deepseekmoe", 2, balance="aux").train()
    batch = load_dataset("synthetic", 0).batch(0, 2, 16)
    out = model.forward_losses(batch.inputs, batch.targets)
    assert list(out.losses) == ["lm", "mtp", "aux"] and list(out.observed) == ["mtp.1", "mtp.2"]
    h0 = model.hidden(batch.inputs)
    for k, logits in enumerate(model.mtp.logits(h0, batch.inputs, model.embed, model.head), start=1):
        expected = F.cross_entropy(logits.flatten(0, 1), batch.targets[:, k:].flatten())
        assert out.observed[f"mtp.{k}"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.losses["mtp"].item() == pytest.approx((out.observed["mtp.1"] + out.observed["mtp.2"]).item() / 2, rel=1e-6)
    # The main head's loss is the main model's alone: MTP adds no term to it.
    assert out.losses["lm"].item() == pytest.approx(F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten()).item(), rel=1e-6)
    lam = 0.3
    total = out.total({"mtp": lam})  # V3 eq. (25): L_MTP = (λ/D)·Σ_k L_MTP^k
    expected = out.losses["lm"] + lam * (out.observed["mtp.1"] + out.observed["mtp.2"]) / 2 + out.losses["aux"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert all(p.grad is not None for p in model.mtp.parameters() if p.requires_grad)


# --- accounting ---


@pytest.mark.parametrize("attention, ffn, depth", CHAINS + [("mla", "deepseekmoe", 1)])
def test_params_mtp_counts_the_instantiated_modules_and_params_total_excludes_them(attention, ffn, depth):
    cfg = config_from_size("debug", attention, ffn, mtp=depth, first_k_dense=1) if ffn != "dense" else config_from_size("debug", attention, ffn, mtp=depth)
    model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts["params_mtp"] == sum(p.numel() for p in model.mtp.parameters())
    assert counts["params_total"] + counts["params_mtp"] == sum(p.numel() for p in model.parameters())
    assert param_counts(cfg)["params_total"] == param_counts(config_from_size("debug", attention, ffn, **(
        {"first_k_dense": 1} if ffn != "dense" else {})))["params_total"]


@pytest.mark.parametrize("attention, depth", [("mha", 1), ("mha", 2), ("mla", 2)])
def test_mtp_flops_match_the_flop_counter(attention, depth):
    """FlopCounterMode (MATH SDPA) counts every matmul exactly and the attention over the full
    T×T matrix (tests/test_variants.py explains): the analytic causal count is the same matmuls
    plus each module's attention at its mean causal context."""
    cfg = config_from_size("debug", attention, "dense", mtp=depth)
    model, (B, T) = model_for(attention, "dense", depth), (2, 24)
    x, y = tokens(B, T), tokens(B, T, seed=2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.forward_losses(x, y)
    counted = counter.get_total_flops()
    attn = registry.ATTENTION[attention].module
    # SDPA gets MLA's V zero-padded to the query/key width; the counter sees the padding's
    # products, the model FLOPs do not (tests/test_attention.py): 2·H·(Dn + Dr − Dv) per key.
    pad = 0
    if attention == "mla":
        d = mla_dims(cfg)
        pad = 2 * d.H * max(0, d.Dn + d.Dr - d.Dv)
    main_full = B * T * (forward_flops_per_token(cfg, T) + pad * T * cfg.n_layers)
    mtp_full = sum(B * (T - k) * (4 * 64 * 64 + attn.flops_per_token(cfg, T - k) + pad * (T - k)
                                  + registry.FFN["dense"].module.flops_per_token(cfg, 0) + 2 * 64 * 256) for k in range(1, depth + 1))
    assert counted == main_full + mtp_full
    causal = sum(B * (T - k) * (attn.flops_per_token(cfg, T - k) + pad * (T - k) - attn.flops_per_token(cfg, (T - k + 1) / 2))
                 for k in range(1, depth + 1))
    assert mtp.forward_flops_per_token(cfg, T) * B * T == pytest.approx(mtp_full - causal, rel=1e-12)


def test_train_cell_states_flops_with_and_without_mtp():
    [base] = spec.expand(tiny_spec("train"), "cpu")
    [with_mtp] = spec.expand(tiny_spec("train", model={"mtp": 2}), "cpu")
    a, b = accounting.accounting(base), accounting.accounting(with_mtp)
    assert a["flops_per_token_mtp"] == 0 and b["flops_per_token_mtp"] > 0
    assert b["flops_per_token"] - b["flops_per_token_mtp"] == a["flops_per_token"]
    assert b["flops_per_token_mtp"] == 3 * mtp.forward_flops_per_token(with_mtp.model, 16)


@pytest.mark.parametrize("attention, ffn", [("mha", "dense"), ("mla", "deepseekmoe")])
def test_roofline_prices_the_mtp_modules_and_sums_to_the_cells_flops(attention, ffn):
    from dsbench import roofline

    routed = {"ffn": {"n_experts": 4}, "axes": {"workload": "train", "ffn": ffn, "attention": attention, "balance": "aux"}} if ffn != "dense" else {}
    [cell] = spec.expand(tiny_spec("train", model={"mtp": 2}, **routed), "cpu")
    costs = roofline.part_costs(cell)
    assert sum(c.flops for c in costs.values()) == pytest.approx(accounting.flops_per_token(cell) * accounting.tokens_per_step(cell), rel=1e-12)
    assert costs["mtp"].flops > 0 and costs["mtp"].bytes > 0


# --- self-speculative decoding ---


def greedy_tokens(model, context, n):
    caches = model.new_caches(context.shape[0], context.shape[1] + n, torch.float32, CPU)
    out, timer = [], StepTimer(CPU)
    generate(model, context, caches, n, timer, timer, on_token=out.append)
    return torch.cat(out, dim=1)


def speculate(model, context, n, oracle=None, p_oracle=0.0, seed=0):
    """Speculative decoding of n tokens; with `oracle` (the greedy tokens) each draft is replaced
    by the right token with probability p_oracle, so acceptance of every length occurs."""
    L = context.shape[1]
    s = mtp.SelfSpeculative(model, context.shape[0], L + n, torch.float32, CPU)
    s.prefill(context)
    coin, accepted = torch.Generator().manual_seed(seed), []
    while s.emitted(L) < n:
        s.draft()
        if oracle is not None:
            for k in range(1, model.cfg.mtp + 1):
                at = s.p + 1 + k - L
                if at < oracle.shape[1] and torch.rand(1, generator=coin).item() < p_oracle:
                    s.tokens[:, s.p + 1 + k] = oracle[:, at]
        accepted.append(s.verify()[1])
    return s, s.generated(L, n), torch.stack(accepted)


@pytest.mark.parametrize("attention, ffn, depth", CHAINS)
@pytest.mark.parametrize("p_oracle", [0.0, 0.7])
def test_speculative_output_is_greedy_output(attention, ffn, depth, p_oracle):
    model, (B, L, N) = model_for(attention, ffn, depth), (2, 12, 24)
    context = tokens(B, L)
    with torch.no_grad():
        greedy = greedy_tokens(model, context, N + depth + 1)
        _, got, accepted = speculate(model, context, N, greedy, p_oracle)
    assert torch.equal(got, greedy[:, :N])
    if p_oracle:  # partial acceptance happened, so rejected drafts were rolled back
        assert {0, depth} <= set(accepted.flatten().tolist()) or 0 < accepted.float().mean() < depth


@pytest.mark.parametrize("attention, ffn, depth", CHAINS)
def test_mtp_caches_after_rollback_equal_a_fresh_pass(attention, ffn, depth):
    """After rounds with rejected drafts, the next drafts equal those of module chains run from
    scratch over the verified tokens: the MTP caches kept nothing of a rejected draft."""
    model, (B, L, N) = model_for(attention, ffn, depth), (2, 10, 20)
    context = tokens(B, L)
    with torch.no_grad():
        greedy = greedy_tokens(model, context, N + depth + 1)
        s, _, _ = speculate(model, context, N, greedy, 0.6, seed=3)
        s.draft()
        p = s.p
        verified = s.tokens[:, :p + 2]  # positions 0 … p+1
        drafts = s.tokens[:, p + 2:p + 2 + depth]
        seq = torch.cat([verified, drafts], dim=1)
        h0 = model.hidden(verified[:, :p + 1])  # the main model's h for positions 0 … p
        h = h0
        for k, module in enumerate(model.mtp.depths, start=1):
            h = module(h[:, :p + 1], model.embed(seq[:, k:p + 1 + k]))
            fresh = model.head(module.norm(h[:, -1])).argmax(dim=-1)
            assert torch.equal(fresh, drafts[:, k - 1]), f"draft {k}"


def test_acceptance_by_position_conditions_on_the_drafts_before():
    accepted = torch.tensor([0, 1, 2, 2, 1, 0, 2, 2])  # leading drafts accepted, D = 2
    assert acceptance_by_position(accepted, 2) == [6 / 8, 4 / 6]
    assert acceptance_by_position(torch.tensor([0, 0]), 2) == [0.0, None]


# --- the workloads, end to end ---


def tiny_spec(workload: str, **sections) -> spec.SweepSpec:
    raw = {"name": "m", "device": "cpu", "model": {"size": "debug"}, "axes": {"workload": workload},
           "train": {"steps": 6, "batch_size": 2, "seq_len": 16, "eval_batches": 1},
           "speculative": {"context_lens": [16], "new_tokens": 6, "train_steps": [3]},
           "measure": {"warmup": 1, "repeats": 4, "calibrate": False}}
    for key, table in sections.items():
        raw[key] = {**raw.get(key, {}), **table}
    return spec.parse_spec(raw)


def context_for(cell) -> Context:
    torch.manual_seed(cell.seed)
    model = build_model(cell.model)
    return Context(model, load_dataset(cell.data, cell.seed), CPU, PRECISIONS[cell.model.precision], cell.measure["warmup"],
                   cell.measure["repeats"])


def test_train_cell_reports_main_and_mtp_losses_apart():
    [cell] = spec.expand(tiny_spec("train", model={"mtp": 2}, train={"mtp_lambda": 0.1}), "cpu")
    assert cell.workload["mtp_lambda"] == 0.1
    run = WORKLOADS["train"].run(context_for(cell), cell.workload)
    metrics = {p[1] for p in run.series}
    assert {"loss", "loss.mtp", "loss_mtp_depth", "eval_loss", "eval_loss_mtp_depth"} <= metrics
    assert {p[4] for p in run.series if p[1] == "eval_loss_mtp_depth"} == {1, 2}
    s = run.summary
    assert s["final_loss_mtp"] > 0 and s["eval_loss_mtp"] > 0 and s["eval_loss"] > 0
    depths = [p[2] for p in run.series if p[1] == "eval_loss_mtp_depth"]
    assert s["eval_loss_mtp"] == pytest.approx(sum(depths) / 2)


def test_speculative_cell_trains_first_and_matches_greedy():
    [cell] = spec.expand(tiny_spec("speculative", model={"mtp": 2}), "cpu")
    assert cell.workload["train_steps"] == 3 and cell.workload["train"]["mtp_lambda"] == 0.3
    assert cell.label() == "speculative/dense/mha/fp32 b1×ctx16+6@3steps"
    run = WORKLOADS["speculative"].run(context_for(cell), cell.workload)
    s = run.summary
    assert s["spec_matches_greedy"] is True and s["pretrain_final_loss"] > 0
    assert set(s) >= {"accept_rate_pos1", "accept_rate_pos2", "eval_agreement_pos1", "eval_agreement_pos2", "spec_speedup",
                      "verify_cost_ratio", "greedy_distinct_fraction"}
    assert 1 <= s["accepted_len_mean"] <= 3 and s["spec_speedup"] == pytest.approx(s["spec_tokens_per_s"] / s["plain_tokens_per_s"])
    assert len(run.step_times_s) >= cell.measure["repeats"] and all(t > 0 for t in run.step_times_s)


def test_speculative_cell_reuses_the_weights_a_train_cell_of_the_same_training_saved(tmp_path):
    """A train cell saves its MTP model's final weights; a speculative cell with the same model,
    [train] settings, steps, seed and data loads them instead of training again, and they are
    bit for bit what its own training would have produced."""
    from dsbench.checkpoints import WeightCache

    sections = {"model": {"mtp": 1}, "speculative": {"train_steps": [6]}}
    [train] = spec.expand(tiny_spec("train", **sections), "cpu")
    [decode] = spec.expand(tiny_spec("speculative", **sections), "cpu")
    cache = WeightCache(tmp_path, train.seed, train.data)
    trained = context_for(train)
    WORKLOADS["train"].run(dataclasses.replace(trained, weights=cache), train.workload)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    loading = dataclasses.replace(context_for(decode), weights=cache)
    run = WORKLOADS["speculative"].run(loading, decode.workload)
    assert run.summary["pretrain_source"].startswith("loaded ") and run.summary["pretrain_final_loss"] > 0
    fresh = context_for(decode)  # no cache: it trains itself
    from dsbench.workloads.speculative import pretrain

    assert pretrain(fresh, decode.workload)["pretrain_source"] == "trained"
    loaded_state, fresh_state = loading.model.float().state_dict(), fresh.model.state_dict()
    assert loaded_state.keys() == fresh_state.keys()
    assert all(torch.equal(loaded_state[k], fresh_state[k]) for k in fresh_state)


def test_cells_without_mtp_keep_their_identity():
    """A field added after cells were recorded stays out of their identity at its default."""
    [cell] = spec.expand(tiny_spec("train"), "cpu")
    assert "mtp" not in cell.identity()["model"] and "mtp_lambda" not in cell.workload
    [deep] = spec.expand(tiny_spec("train", model={"mtp": 1}), "cpu")
    assert deep.identity()["model"]["mtp"] == 1 and deep.cell_id != cell.cell_id


def test_mtp_swept_as_a_dotted_axis():
    cells = spec.expand(tiny_spec("train", axes={"model.mtp": [0, 1, 2]}), "cpu")
    assert [c.model.mtp for c in cells] == [0, 1, 2]
    assert [c.axes["model.mtp"] for c in cells] == [0, 1, 2]


@pytest.mark.parametrize("sections, needle", [
    ({"model": {"mtp": -1}}, "model.mtp: expected an integer ≥ 0, got -1"),
    ({"model": {"mtp": 9}}, "model.mtp: 9 is out of range; allowed: 0 (no MTP) to 8"),
    ({"model": {"mtp": 1}, "train": {"mtp_lambda": -0.1}}, "train.mtp_lambda: expected a number ≥ 0"),
    ({"model": {"mtp": 16}, "train": {"seq_len": 16}}, "out of range"),
    ({"model": {"mtp": 4}, "train": {"seq_len": 4}}, "train.seq_len: 4 is too short for model.mtp 4"),
])
def test_bad_mtp_values_are_one_line_errors(sections, needle):
    with pytest.raises(SpecError) as e:
        tiny_spec("train", **sections)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_speculative_needs_mtp_and_room_for_the_verify_window():
    with pytest.raises(SpecError, match="speculative drafts with MTP modules; model.mtp is 0"):
        tiny_spec("speculative")
    with pytest.raises(SpecError, match=r"speculative.context_lens: 250 \+ speculative.new_tokens 6 \+ model.mtp 2"):
        tiny_spec("speculative", model={"mtp": 2}, speculative={"context_lens": [250]})
    with pytest.raises(SpecError, match="train.seq_len: 2 is too short for model.mtp 2"):
        tiny_spec("speculative", model={"mtp": 2}, train={"seq_len": 2})


def test_bad_mtp_value_through_the_cli_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from dsbench.cli import app

    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[model]\nmtp = -2\n')
    done = CliRunner().invoke(app, ["run", "sweep", str(path), "--out", str(tmp_path / "out")])
    assert done.exit_code == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.mtp: expected an integer ≥ 0, got -2" in lines[0]
    assert not (tmp_path / "out").exists()

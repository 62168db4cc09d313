"""The workload contract (dsbench/workloads/): the test walks the registry, and the loss seam."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dsbench import accounting, spec
from dsbench.data import load_dataset
from dsbench.task import ProfileOptions
from dsbench.variants.decoder import build_model
from dsbench.variants.precision import PRECISIONS
from dsbench.workloads import WORKLOADS, Context, Workload, workload_of

CPU = torch.device("cpu")


def tiny_spec(workload: str, ffn="dense", balance="none", **sections) -> spec.SweepSpec:
    raw = {
        "name": "w", "device": "cpu", "model": {"size": "debug", "n_layers": 2}, "ffn": {"n_experts": 4} if ffn != "dense" else {},
        "axes": {"workload": workload, "ffn": ffn, "balance": balance},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_batches": 1},
        "prefill": {"batch_size": 2, "seq_lens": [8, 16]},
        "decode": {"batch_size": 2, "context_lens": [16], "new_tokens": 4, "memory_budget_bytes": 2**23},
        "speculative": {"batch_size": 2, "context_lens": [16], "new_tokens": 4, "train_steps": [2]},
        "measure": {"warmup": 1, "repeats": 3, "calibrate": False},
    }
    if workload == "speculative":  # it drafts with MTP modules
        raw["model"]["mtp"] = 1
    for key, table in sections.items():
        raw[key] = {**raw[key], **table}
    return spec.parse_spec(raw)


def tiny_cells(workload: str, ffn="dense", balance="none", **sections) -> list:
    return spec.expand(tiny_spec(workload, ffn, balance, **sections), "cpu")


def context_for(cell, observe=True) -> Context:
    torch.manual_seed(cell.seed)
    model = build_model(cell.model)
    precision = PRECISIONS[cell.model.precision]
    if not (workload_of(cell).trains or workload_of(cell).trains_first):
        model = model.to(precision.inference_dtype)
    return Context(model, load_dataset(cell.data, cell.seed), CPU, precision, cell.measure["warmup"], cell.measure["repeats"], observe)


def test_registry_names_sections_and_axis_values_agree():
    assert set(WORKLOADS) == set(spec.available_axis_values()["workload"]) == {"train", "prefill", "decode", "speculative"}
    for name, workload in WORKLOADS.items():
        assert isinstance(workload, Workload) and workload.name == name
        assert spec.SECTIONS[name] is workload.Settings and dataclasses.is_dataclass(workload.Settings)
        assert workload.Settings.__dataclass_params__.frozen
        assert getattr(spec.SweepSpec(name="x"), name) == workload.Settings()  # the section's defaults


@pytest.mark.parametrize("name, labels", [
    ("train", ["train/dense/mha/fp32 b2×t16"]),
    ("prefill", ["prefill/dense/mha/fp32 b2×t8", "prefill/dense/mha/fp32 b2×t16"]),
    ("decode", ["decode/dense/mha/fp32 b2×ctx16+4", "decode/dense/mha/fp32 b{max}(max@8MiB)×ctx16+4"]),
    ("speculative", ["speculative/dense/mha/fp32 b2×ctx16+4@2steps"]),
])
def test_every_workload_expands_labels_counts_and_runs(name, labels):
    workload = WORKLOADS[name]
    cells = tiny_cells(name)
    max_batch = next((c.workload["batch_size"] for c in cells if "memory_budget_bytes" in c.workload), None)
    assert [c.label() for c in cells] == [label.format(max=max_batch) for label in labels]
    for cell in cells:
        settings = cell.workload
        assert cell.label().endswith(" " + workload.shape_label(settings))
        assert accounting.tokens_per_step(cell) == workload.tokens_per_step(settings) > 0
        assert accounting.mean_context_len(cell) == workload.mean_context_len(settings) > 0
        assert accounting.flops_per_token(cell) == workload.flops_per_token(cell.model, settings) > 0
        run = workload.run(context_for(cell), settings)
        assert run.tokens_per_step == workload.tokens_per_step(settings)
        assert run.mean_context_len == workload.mean_context_len(settings)
        timed = settings["steps"] - cell.measure["warmup"] if workload.trains else cell.measure["repeats"]
        assert len(run.step_times_s) >= timed and all(t > 0 for t in run.step_times_s)
        # A workload that holds a KV cache says how many slots, and its cache is the analytic size.
        measured = run.summary.get("kv_cache_bytes_per_token_measured")
        assert (measured is not None) == (workload.cache_slots(settings) > 0)
        if measured is not None:
            assert measured == accounting.accounting(cell)["kv_cache_bytes_per_token"]


def test_data_lengths_cover_every_cells_rows():
    """runner.check_data asks the data for these lengths before anything runs."""
    for name, workload in WORKLOADS.items():
        needs = workload.data_lengths(getattr(tiny_spec(name), name))
        rows = {c.workload.get("seq_len", c.workload.get("context_len")) for c in tiny_cells(name)}
        assert {length for length, split in needs if split == "train"} == rows
    assert WORKLOADS["train"].data_lengths(tiny_spec("train").train) == [(16, "train"), (16, "eval")]
    assert WORKLOADS["train"].data_lengths(tiny_spec("train", train={"eval_batches": 0}).train) == [(16, "train")]


def test_profiled_pass_keeps_shapes_and_shortens_steps():
    options = ProfileOptions(steps=2, warmup=1)
    [train] = tiny_cells("train")
    settings, repeats = WORKLOADS["train"].profiled(train.workload, options)
    assert settings == {**train.workload, "steps": 3, "eval_batches": 0} and repeats == 2
    decode = tiny_cells("decode")[0]
    assert WORKLOADS["decode"].profiled(decode.workload, options) == (decode.workload, 1)
    prefill = tiny_cells("prefill")[0]
    assert WORKLOADS["prefill"].profiled(prefill.workload, options) == (prefill.workload, 2)


# --- the loss seam: Decoder.forward_losses ---


def _batch(B=2, T=16):
    batch = load_dataset("synthetic", 0).batch(0, B, T)
    return batch.inputs, batch.targets


def test_forward_losses_is_forward_plus_named_losses():
    [cell] = tiny_cells("train")
    model = context_for(cell).model.train()
    inputs, targets = _batch()
    out = model.forward_losses(inputs, targets)
    assert list(out.losses) == ["lm"]  # a dense model has no aux loss
    assert torch.equal(out.logits, model(inputs))  # forward() is unchanged (the reference tests call it)
    expected = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    assert out.losses["lm"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.lm_loss_per_row.shape == (2,) and out.total() is out.losses["lm"]


def test_moe_aux_loss_is_named_and_summed():
    [cell] = tiny_cells("train", ffn="deepseekmoe", balance="aux")
    model = context_for(cell).model.train()
    inputs, targets = _batch()
    out = model.forward_losses(inputs, targets)
    assert list(out.losses) == ["lm", "aux"] and out.losses["aux"].item() > 0
    assert torch.equal(out.losses["aux"], model.aux_loss())
    assert torch.equal(out.total(), out.losses["lm"] + out.losses["aux"])
    model.eval()
    assert list(model.forward_losses(inputs, targets).losses) == ["lm"]  # no balance term at eval


def test_train_records_each_named_loss():
    [cell] = tiny_cells("train", ffn="deepseekmoe", balance="aux")
    run = WORKLOADS["train"].run(context_for(cell), cell.workload)
    aux = [value for step, metric, value, *_ in run.series if metric == "loss.aux"]
    assert len(aux) == cell.workload["steps"] and all(a > 0 for a in aux)
    assert aux[-1] == pytest.approx(run.summary["aux_loss_final"], rel=1e-5)  # the layers' own record, summed
    [dense] = tiny_cells("train")
    assert not any(p[1].startswith("loss.") for p in WORKLOADS["train"].run(context_for(dense), dense.workload).series)


def test_train_optimises_the_sum_of_the_named_losses():
    """A part that adds a loss (MTP, an indexer's KL) only adds it to the dict: train's objective
    follows. Here a penalty on the final norm's gain pulls every gain down under AdamW."""
    [cell] = tiny_cells("train", train={"eval_batches": 0})
    ctx = context_for(cell, observe=False)
    model, plain = ctx.model, ctx.model.forward_losses

    def with_penalty(tokens, targets):
        out = plain(tokens, targets)
        out.losses["gain"] = 1e3 * model.norm.weight.sum()
        return out

    model.forward_losses = with_penalty
    run = WORKLOADS["train"].run(ctx, cell.workload)
    assert {p[1] for p in run.series} >= {"loss", "loss.gain"}
    lr = cell.workload["lr"]
    assert (model.norm.weight < 1 - 2 * lr).all()  # 4 AdamW steps of ≈ lr each, all downhill

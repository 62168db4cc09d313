"""Sweep specs: validation (one clear line per bad input), defaults, expansion and cell ids, presets."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import subprocess
import sys
import tomllib
from importlib import resources

import pytest

from dsbench import spec as S
from dsbench.spec import Cell, SpecError, expand, load_preset, load_spec_file, parse_spec, preset_names
from dsbench.variants import registry
from dsbench.variants.config import ModelConfig


def _spec(**sections) -> dict:
    """A raw spec dict (as TOML would give) with a valid name plus the given keys."""
    return {"name": "t", **sections}


def _all_workloads(**sections) -> dict:
    axes = {"workload": ["train", "prefill", "decode"], **sections.pop("axes", {})}
    return _spec(axes=axes, **sections)


# --- 1. bad input: SpecError, one line, key + bad value + what is allowed ---

BAD = [
    # unknown keys, top level and in every section
    ("unknown-top", _spec(bogus=1), ["bogus", "unknown key", "allowed", "name", "train", "measure"]),
    ("unknown-model", _spec(model={"n_heads": 8}), ["model.n_heads", "unknown key", "d_model", "max_seq_len"]),
    ("unknown-attention", _spec(attention={"heads": 4}), ["attention.heads", "unknown key", "n_heads", "n_kv_heads"]),
    ("unknown-ffn", _spec(ffn={"hidden": 128}), ["ffn.hidden", "unknown key", "d_ff"]),
    ("unknown-axes", _spec(axes={"optimizer": ["adam"]}), ["axes.optimizer", "unknown key", "workload", "ffn", "balance"]),
    ("unknown-train", _spec(train={"step": 10}), ["train.step", "unknown key", "steps", "batch_size"]),
    ("unknown-prefill", _spec(prefill={"seq_len": 128}), ["prefill.seq_len", "unknown key", "seq_lens"]),
    ("unknown-decode", _spec(decode={"context_len": 128}), ["decode.context_len", "unknown key", "context_lens", "new_tokens"]),
    ("unknown-measure", _spec(measure={"repeat": 3}), ["measure.repeat", "unknown key", "repeats", "warmup"]),
    # name
    ("missing-name", {"device": "cpu"}, ["name", "missing"]),
    ("name-slash", {"name": "a/b"}, ["name", "'a/b'", "letters"]),
    ("name-backslash", {"name": "a\\b"}, ["name", "letters"]),
    ("name-hidden", {"name": ".hidden"}, ["name", "'.hidden'", "letters"]),
    ("name-dotdot", {"name": ".."}, ["name", "'..'", "letters"]),
    ("name-empty", {"name": ""}, ["name", "''", "letters"]),
    ("name-int", {"name": 3}, ["name", "3", "expected a string"]),
    ("description-int", _spec(description=3), ["description", "3", "expected a string"]),
    ("data-list", _spec(data=["a"]), ["data", "['a']", "expected a string"]),
    # integers: wrong type, bool, float, negative, zero, list
    ("int-as-string", _spec(train={"steps": "10"}), ["train.steps", "'10'", "positive integer"]),
    ("int-as-float", _spec(train={"steps": 10.0}), ["train.steps", "10.0", "positive integer"]),
    ("int-as-bool", _spec(train={"steps": True}), ["train.steps", "True", "positive integer"]),
    ("int-negative", _spec(train={"batch_size": -1}), ["train.batch_size", "-1", "positive integer"]),
    ("int-zero", _spec(train={"seq_len": 0}), ["train.seq_len", "0", "positive integer"]),
    ("int-list", _spec(train={"steps": [10]}), ["train.steps", "[10]", "positive integer"]),
    ("int-min0-negative", _spec(measure={"warmup": -1}), ["measure.warmup", "-1", "integer ≥ 0"]),
    ("seed-negative", _spec(seed=-1), ["seed", "-1", "integer ≥ 0"]),
    ("seed-bool", _spec(seed=True), ["seed", "True", "integer ≥ 0"]),
    ("model-int-zero", _spec(model={"d_model": 0}), ["model.d_model", "0", "positive integer"]),
    ("model-int-float", _spec(model={"n_layers": 2.5}), ["model.n_layers", "2.5", "positive integer"]),
    ("optional-int-zero", _spec(attention={"n_kv_heads": 0}), ["attention.n_kv_heads", "0", "positive integer"]),
    ("optional-int-bool", _spec(attention={"head_dim": True}), ["attention.head_dim", "True", "positive integer"]),
    ("ffn-int-string", _spec(ffn={"d_ff": "192"}), ["ffn.d_ff", "'192'", "positive integer"]),
    ("decode-new-tokens-bool", _spec(decode={"new_tokens": False}), ["decode.new_tokens", "False", "positive integer"]),
    # floats
    ("float-as-string", _spec(train={"lr": "3e-4"}), ["train.lr", "'3e-4'", "a number"]),
    ("float-as-bool", _spec(train={"lr": True}), ["train.lr", "True", "a number"]),
    ("float-list", _spec(train={"lr": [1e-3]}), ["train.lr", "[0.001]", "a number"]),
    ("float-zero", _spec(train={"lr": 0}), ["train.lr", "0", "> 0"]),
    ("float-negative", _spec(measure={"timeout_s": -5.0}), ["measure.timeout_s", "-5.0", "> 0"]),
    ("float-min0-negative", _spec(train={"weight_decay": -0.1}), ["train.weight_decay", "-0.1", "≥ 0"]),
    ("float-nan", _spec(train={"lr": math.nan}), ["train.lr", "nan", "a number"]),
    ("float-nan-model", _spec(model={"norm_eps": math.nan}), ["model.norm_eps", "nan", "a number"]),
    ("float-nan-beta", _spec(train={"beta2": math.nan}), ["train.beta2", "nan", "a number"]),
    ("beta1-one", _spec(train={"beta1": 1}), ["train.beta1", "1", "< 1"]),
    ("beta1-above-one", _spec(train={"beta1": 1.5}), ["train.beta1", "1.5", "< 1"]),
    ("beta2-one", _spec(train={"beta2": 1.0}), ["train.beta2", "1.0", "< 1"]),
    ("rope-theta-neg-inf", _spec(attention={"rope_theta": -math.inf}), ["attention.rope_theta", "-inf", "> 0"]),
    # booleans
    ("bool-as-int", _spec(measure={"calibrate": 1}), ["measure.calibrate", "1", "true or false"]),
    ("bool-as-string", _spec(model={"tie_embeddings": "yes"}), ["model.tie_embeddings", "'yes'", "true or false"]),
    # list fields
    ("list-empty", _spec(prefill={"seq_lens": []}), ["prefill.seq_lens", "[]", "non-empty list"]),
    ("list-bad-item", _spec(prefill={"seq_lens": [128, "256"]}), ["prefill.seq_lens", "'256'", "positive integer"]),
    ("list-zero-item", _spec(decode={"context_lens": [0]}), ["decode.context_lens", "0", "positive integer"]),
    ("list-nested", _spec(decode={"context_lens": [[64]]}), ["decode.context_lens", "[64]", "positive integer"]),
    # a scalar where a table is expected
    ("model-scalar", _spec(model=3), ["model", "3", "table", "[model]"]),
    ("train-list", _spec(train=[1]), ["train", "[1]", "table", "[train]"]),
    ("axes-string", _spec(axes="ffn"), ["axes", "'ffn'", "table", "[axes]"]),
    ("attention-string", _spec(attention="mha"), ["attention", "'mha'", "table"]),
    # named choices
    ("size-unknown", _spec(model={"size": "huge"}), ["model.size", "'huge'", "allowed", "debug", "small", "xl"]),
    ("size-int", _spec(model={"size": 3}), ["model.size", "3", "debug"]),
    ("device-unknown", _spec(device="tpu"), ["device", "'tpu'", "auto", "cpu", "cuda"]),
    ("device-case", _spec(device="CUDA"), ["device", "'CUDA'", "auto", "cpu", "cuda"]),
    # axis values
    ("axis-ffn-unknown", _spec(axes={"ffn": "switch"}), ["axes.ffn", "'switch'", "allowed", "dense", "deepseekmoe"]),
    ("axis-ffn-unknown-in-list", _spec(axes={"ffn": ["dense", "switch"]}), ["axes.ffn", "'switch'", "dense"]),
    ("moe-d-ff-vs-top-k", _spec(axes={"ffn": "moe"}, ffn={"d_ff": 193}), ["ffn.d_ff", "193", "top_k"]),
    ("dsmoe-granularity", _spec(axes={"ffn": "deepseekmoe"}, ffn={"granularity": 5}), ["ffn.granularity", "5", "96"]),
    ("dsmoe-shared", _spec(axes={"ffn": "deepseekmoe"}, ffn={"n_shared": 8}), ["ffn.n_shared", "8", "granularity·top_k = 8"]),
    ("moe-router-choice", _spec(axes={"ffn": "moe"}, ffn={"router": "relu"}), ["ffn.router", "'relu'", "softmax, sigmoid, v3"]),
    ("moe-groups", _spec(axes={"ffn": "moe"}, ffn={"n_group": 3}), ["ffn.n_group", "3", "16 routed"]),
    ("moe-topk-group", _spec(axes={"ffn": "moe"}, ffn={"n_group": 4, "topk_group": 5}), ["ffn.topk_group", "5", "n_group 4"]),
    ("axis-workload-serve", _spec(axes={"workload": ["serve"]}), ["axes.workload", "'serve'", "train", "prefill", "decode"]),
    ("axis-attention-unknown", _spec(axes={"attention": ["linear"]}), ["axes.attention", "'linear'", "mha"]),
    ("axis-precision-unknown", _spec(axes={"precision": ["fp4"]}), ["axes.precision", "'fp4'", "fp32", "bf16"]),
    ("axis-balance-unknown", _spec(axes={"balance": ["z-loss"]}), ["axes.balance", "'z-loss'", "none", "aux", "bias"]),
    ("axis-non-string", _spec(axes={"precision": [16]}), ["axes.precision", "16", "fp32", "bf16"]),
    ("axis-twice", _spec(axes={"precision": ["fp32", "bf16", "fp32"]}), ["axes.precision", "'fp32'", "twice"]),
    ("axis-empty", _spec(axes={"ffn": []}), ["axes.ffn", "empty", "dense"]),
    ("axis-workload-empty", _spec(axes={"workload": []}), ["axes.workload", "empty", "train", "decode"]),
    # fields the axes own
    ("axis-field-attention-kind", _spec(attention={"kind": "mha"}), ["attention.kind", "[axes] attention"]),
    ("axis-field-ffn-kind", _spec(ffn={"kind": "dense"}), ["ffn.kind", "[axes] ffn"]),
    ("axis-field-ffn-balance", _spec(ffn={"balance": "none"}), ["ffn.balance", "[axes] balance"]),
    ("axis-field-model-precision", _spec(model={"precision": "bf16"}), ["model.precision", "[axes] precision"]),
    # combinations
    ("heads-not-dividing", _spec(attention={"n_heads": 5}), ["attention.n_heads", "5", "model.d_model 64", "divisor"]),
    ("heads-not-dividing-small", _spec(model={"size": "small", "d_model": 250}, attention={"n_heads": 8}),
     ["attention.n_heads", "8", "model.d_model 250"]),
    ("kv-heads-not-dividing", _spec(attention={"n_kv_heads": 3}), ["attention.n_kv_heads", "3", "attention.n_heads 4", "divide"]),
    ("kv-heads-more-than-heads", _spec(attention={"n_kv_heads": 8}), ["attention.n_kv_heads", "8", "attention.n_heads 4"]),
    ("head-dim-odd-derived", _spec(model={"d_model": 60}), ["attention.head_dim", "15", "odd", "even"]),
    ("head-dim-odd-explicit", _spec(attention={"head_dim": 7}), ["attention.head_dim", "7", "even"]),
    ("train-seq-too-long", _spec(train={"seq_len": 512}), ["train.seq_len", "512", "model.max_seq_len 256"]),
    ("train-seq-vs-max-override", _spec(model={"max_seq_len": 64}), ["train.seq_len", "128", "model.max_seq_len 64"]),
    ("prefill-seq-too-long", _all_workloads(prefill={"seq_lens": [128, 512]}), ["prefill.seq_lens", "512", "model.max_seq_len 256"]),
    ("decode-too-long", _all_workloads(decode={"context_lens": [64, 240], "new_tokens": 32}),
     ["decode.context_lens", "240", "new_tokens 32", "model.max_seq_len 256"]),
    ("decode-new-tokens-too-many", _spec(axes={"workload": "decode"}, decode={"new_tokens": 200}),
     ["decode.context_lens", "128", "new_tokens 200", "256"]),
    ("warmup-equals-steps", _spec(train={"steps": 3}), ["measure.warmup", "3", "train.steps 3", "warmup < steps"]),
    ("warmup-above-steps", _spec(train={"steps": 5}, measure={"warmup": 10}), ["measure.warmup", "10", "train.steps 5", "warmup < steps"]),
    ("vocab-below-bytes", _spec(model={"vocab_size": 100}), ["model.vocab_size", "100", "256", "synthetic"]),
]


@pytest.mark.parametrize("raw, expected", [pytest.param(raw, exp, id=name) for name, raw, exp in BAD])
def test_bad_spec_is_one_clear_line(raw, expected):
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_bad_cases_are_many_and_distinct():
    names = [name for name, _, _ in BAD]
    assert len(names) >= 30 and len(set(names)) == len(names)


def test_checks_apply_only_to_workloads_that_run():
    # a prefill-only sweep does not care about train.seq_len or warmup vs train.steps
    spec = parse_spec(_spec(axes={"workload": "prefill"}, train={"seq_len": 100_000, "steps": 1}))
    assert spec.axes["workload"] == ("prefill",)
    # and a train-only sweep does not care about decode lengths
    parse_spec(_spec(decode={"context_lens": [10_000]}))


def test_head_dim_set_explicitly_allows_non_dividing_heads():
    spec = parse_spec(_spec(attention={"n_heads": 5, "head_dim": 16}))
    assert S.base_config(spec).head_dim() == 16


def test_vocab_below_bytes_allowed_with_other_data():
    # user data is checked against the vocab when it is loaded, not here
    spec = parse_spec(_spec(data="my-corpus.bin", model={"vocab_size": 100}))
    assert S.base_config(spec).vocab_size == 100


@pytest.mark.parametrize("section, key", [("train", "lr"), ("train", "weight_decay"), ("model", "norm_eps"), ("model", "init_std")])
def test_infinite_float_rejected(section, key):
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(**{section: {key: math.inf}}))
    assert f"{section}.{key}" in str(info.value) and "inf" in str(info.value)


def test_beta1_zero_is_valid():
    assert parse_spec(_spec(train={"beta1": 0.0})).train.beta1 == 0.0


# --- files ---


def test_invalid_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[train\nsteps = 3\n')
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "not valid TOML" in message and "line 2" in message


def test_invalid_toml_duplicate_key(tmp_path):
    path = tmp_path / "dup.toml"
    path.write_text('name = "x"\nname = "y"\n')
    with pytest.raises(SpecError, match="not valid TOML") as info:
        load_spec_file(path)
    assert "\n" not in str(info.value)


def test_missing_spec_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "does not exist" in message and "--preset" in message


def test_valid_toml_with_bad_value_names_key(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('name = "x"\n[train]\nsteps = "many"\n')
    with pytest.raises(SpecError, match=r"^train\.steps: .*'many'"):
        load_spec_file(path)


def test_non_utf8_spec_file(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"name = '\xff\xfe'\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec_file(path)


# --- 2. good input ---


def test_minimal_spec_defaults():
    spec = parse_spec({"name": "x"})
    assert spec.name == "x" and spec.description == "" and spec.device == "auto"
    assert spec.seed == 0 and spec.data == "synthetic" and spec.size == "debug"
    assert spec.model == {} and spec.attention == {} and spec.ffn == {}
    assert spec.axes == S.DEFAULT_AXES
    assert spec.train == S.TrainSettings() and spec.prefill == S.PrefillSettings()
    assert spec.decode == S.DecodeSettings() and spec.measure == S.MeasureSettings()
    assert S.base_config(spec) == ModelConfig()
    cells = expand(spec, "cpu")
    assert len(cells) == 1
    (cell,) = cells
    assert cell.axes == {"workload": "train", "ffn": "dense", "attention": "mha", "precision": "fp32", "balance": "n/a"}
    # mtp_lambda is read only by cells with MTP, and only theirs carry it (their identity);
    # optimizer only where it is not adamw, so cells recorded before it keep their ids
    assert cell.workload == {k: v for k, v in dataclasses.asdict(S.TrainSettings()).items() if k not in ("mtp_lambda", "optimizer")}
    assert cell.measure == {"warmup": 3, "repeats": 10}
    assert cell.device == "cpu" and cell.seed == 0 and cell.data == "synthetic"


SPEC_TOML = """
name = "round-trip"
description = "a spec file"
device = "cpu"
seed = 7

[model]
size = "small"
n_layers = 2
tie_embeddings = true

[attention]
n_heads = 4
n_kv_heads = 2
rope_theta = 500000

[ffn]
d_ff = 512

[axes]
workload = ["train", "prefill", "decode"]
precision = ["fp32", "bf16"]

[train]
steps = 20
lr = 1e-3
beta2 = 0.99

[prefill]
seq_lens = [64, 256]

[decode]
context_lens = 512
new_tokens = 16

[measure]
warmup = 2
repeats = 5
timeout_s = 30
calibrate = false
"""


def test_toml_file_round_trip(tmp_path):
    path = tmp_path / "rt.toml"
    path.write_text(SPEC_TOML)
    spec = load_spec_file(path)
    assert spec == parse_spec(tomllib.loads(SPEC_TOML))
    assert load_spec_file(str(path)) == spec  # str paths too
    assert (spec.name, spec.description, spec.device, spec.seed, spec.size) == ("round-trip", "a spec file", "cpu", 7, "small")
    assert spec.model == {"n_layers": 2, "tie_embeddings": True}
    assert spec.attention == {"n_heads": 4, "n_kv_heads": 2, "rope_theta": 500000.0}
    assert spec.ffn == {"d_ff": 512}
    assert spec.axes["workload"] == ("train", "prefill", "decode") and spec.axes["precision"] == ("fp32", "bf16")
    assert spec.axes["ffn"] == ("dense",)
    assert spec.train == S.TrainSettings(steps=20, lr=1e-3, beta2=0.99)
    assert spec.prefill.seq_lens == (64, 256) and spec.decode.context_lens == (512,) and spec.decode.new_tokens == 16
    assert spec.measure == S.MeasureSettings(warmup=2, repeats=5, timeout_s=30.0, calibrate=False)
    cfg = S.base_config(spec)
    assert (cfg.d_model, cfg.n_layers, cfg.max_seq_len, cfg.tie_embeddings) == (256, 2, 1024, True)
    assert (cfg.attention.n_heads, cfg.n_kv_heads(), cfg.head_dim(), cfg.ffn.d_ff) == (4, 2, 64, 512)
    # the parsed spec survives JSON (as the runner stores it) and parses again to the same spec
    again = json.loads(json.dumps(spec.to_dict()))
    assert again["train"]["lr"] == 1e-3 and again["prefill"]["seq_lens"] == [64, 256]


def test_preset_file_loads_like_preset():
    path = resources.files("dsbench.presets").joinpath("smoke.toml")
    with resources.as_file(path) as p:
        assert load_spec_file(p) == load_preset("smoke")


def test_single_string_for_axes_and_scalar_for_lists():
    spec = parse_spec(_spec(
        axes={"workload": "decode", "ffn": "dense", "attention": "mha", "precision": "bf16", "balance": "none"},
        prefill={"seq_lens": 64},
        decode={"context_lens": 96},
    ))
    assert spec.axes == {"workload": ("decode",), "ffn": ("dense",), "attention": ("mha",), "precision": ("bf16",), "balance": ("none",)}
    assert spec.prefill.seq_lens == (64,) and spec.decode.context_lens == (96,)
    listed = parse_spec(_spec(
        axes={"workload": ["decode"], "ffn": ["dense"], "attention": ["mha"], "precision": ["bf16"], "balance": ["none"]},
        prefill={"seq_lens": [64]},
        decode={"context_lens": [96]},
    ))
    assert listed == spec
    assert [c.cell_id for c in expand(listed, "cpu")] == [c.cell_id for c in expand(spec, "cpu")]


def test_ints_accepted_for_floats():
    spec = parse_spec(_spec(train={"lr": 1, "weight_decay": 0, "grad_clip": 2}, measure={"timeout_s": 60}, attention={"rope_theta": 10000}))
    assert spec.train.lr == 1.0 and isinstance(spec.train.lr, float)
    assert spec.train.weight_decay == 0.0 and isinstance(spec.train.weight_decay, float)
    assert isinstance(spec.train.grad_clip, float) and isinstance(spec.measure.timeout_s, float)
    assert spec.attention["rope_theta"] == 10000.0 and isinstance(spec.attention["rope_theta"], float)
    # an int for a float gives the same cell as the float: rope_theta 10000 is the default 10000.0
    plain = parse_spec(_spec(train={"lr": 1.0, "weight_decay": 0.0, "grad_clip": 2.0}))
    assert [c.cell_id for c in expand(spec, "cpu")] == [c.cell_id for c in expand(plain, "cpu")]


# --- 3. expansion ---


def _ids(spec, device="cpu") -> dict[str, str]:
    return {c.label(): c.cell_id for c in expand(spec, device)}


def test_expansion_product_size():
    spec = parse_spec(_spec(
        axes={"workload": ["train", "prefill", "decode"], "precision": ["fp32", "bf16"]},
        prefill={"seq_lens": [64, 128]},
        decode={"context_lens": [32, 64, 128]},
    ))
    cells = expand(spec, "cpu")
    # per precision: train 1 + prefill 2 seq_lens + decode 3 contexts = 6; × 2 precisions = 12
    assert len(cells) == 12
    assert len({c.cell_id for c in cells}) == 12
    assert collections.Counter(c.axes["workload"] for c in cells) == {"train": 2, "prefill": 4, "decode": 6}
    assert collections.Counter(c.axes["precision"] for c in cells) == {"fp32": 6, "bf16": 6}
    for c in cells:
        assert c.model.precision == c.axes["precision"]
        assert c.model.attention.kind == c.axes["attention"] == "mha"
        assert c.model.ffn.kind == c.axes["ffn"] == "dense"
    assert sorted(c.workload["seq_len"] for c in cells if c.axes["workload"] == "prefill") == [64, 64, 128, 128]
    assert sorted(c.workload["context_len"] for c in cells if c.axes["workload"] == "decode") == [32, 32, 64, 64, 128, 128]
    # expansion order: workload outermost
    assert [c.axes["workload"] for c in cells[:2]] == ["train", "train"]


def test_duplicate_list_entries_are_refused_as_the_axes_refuse_them():
    """Issue 19: a repeated seq_len used to run once, silently; axes refuse repeats, so lists do too."""
    with pytest.raises(SpecError, match="prefill.seq_lens: 128 is listed twice; list each value once"):
        parse_spec(_spec(axes={"workload": "prefill"}, prefill={"seq_lens": [128, 64, 128]}))
    spec = parse_spec(_spec(axes={"workload": "prefill"}, prefill={"seq_lens": [128, 64]}))
    assert [c.workload["seq_len"] for c in expand(spec, "cpu")] == [128, 64]


def test_balance_collapses_on_dense():
    default = parse_spec(_all_workloads())
    with_balance = parse_spec(_all_workloads(axes={"balance": ["none"]}))
    cells = expand(with_balance, "cpu")
    assert len(cells) == len(expand(default, "cpu")) == 3
    assert all(c.axes["balance"] == "n/a" and c.model.ffn.balance == "n/a" for c in cells)
    assert _ids(with_balance) == _ids(default)


def test_balance_duplicates_after_collapse_run_once():
    # two strategies: on a dense FFN both collapse to n/a and run once
    spec = parse_spec(_all_workloads(axes={"balance": ["none", "aux"]}))
    cells = expand(spec, "cpu")
    assert len(cells) == 3
    assert _ids(spec) == _ids(parse_spec(_all_workloads()))


def test_balance_multiplies_on_routed_ffn():
    spec = parse_spec(_spec(axes={"ffn": ["dense", "moe"], "balance": ["none", "aux"]}))
    cells = expand(spec, "cpu")
    assert sorted((c.axes["ffn"], c.axes["balance"]) for c in cells) == [("dense", "n/a"), ("moe", "aux"), ("moe", "none")]
    for c in cells:
        assert c.model.ffn.kind == c.axes["ffn"] and c.model.ffn.balance == c.axes["balance"]
    labels = sorted(c.label() for c in cells)
    assert labels == ["train/dense/mha/fp32 b8×t128", "train/moe/mha/fp32/aux b8×t128", "train/moe/mha/fp32/none b8×t128"]


LEAK_BASE = dict(
    axes={"workload": ["train", "prefill", "decode"]},
    train={"steps": 20, "lr": 1e-3},
    prefill={"batch_size": 2, "seq_lens": [64]},
    decode={"batch_size": 2, "context_lens": [64], "new_tokens": 8},
    measure={"warmup": 2, "repeats": 5, "timeout_s": 60},
)


def _leak_ids(**changes) -> dict[str, str]:
    raw = _spec(**{k: dict(v) for k, v in LEAK_BASE.items()})
    for section, values in changes.items():
        raw[section].update(values)
    return {c.axes["workload"]: c.cell_id for c in expand(parse_spec(raw), "cpu")}


@pytest.mark.parametrize("section, change, changed", [
    ("train", {"lr": 2e-3}, {"train"}),
    ("train", {"steps": 30}, {"train"}),
    ("prefill", {"batch_size": 4}, {"prefill"}),
    ("decode", {"new_tokens": 16}, {"decode"}),
    ("decode", {"batch_size": 4}, {"decode"}),
    ("measure", {"repeats": 6}, {"train", "prefill", "decode"}),
    ("measure", {"timeout_s": 120}, set()),  # the timeout is not part of a cell's identity
])
def test_settings_of_other_workloads_do_not_leak(section, change, changed):
    before, after = _leak_ids(), _leak_ids(**{section: change})
    assert set(before) == set(after) == {"train", "prefill", "decode"}
    assert {w for w in before if before[w] != after[w]} == changed


def test_prefill_and_decode_cells_hold_only_their_settings():
    cells = {c.axes["workload"]: c for c in expand(parse_spec(_spec(**LEAK_BASE)), "cpu")}
    assert cells["prefill"].workload == {"batch_size": 2, "seq_len": 64}
    assert cells["decode"].workload == {"batch_size": 2, "context_len": 64, "new_tokens": 8}
    assert cells["train"].workload["lr"] == 1e-3 and "context_len" not in cells["train"].workload


def test_model_overrides_change_every_id():
    base = _leak_ids()
    raw = _spec(**LEAK_BASE, model={"n_layers": 3})
    changed = {c.axes["workload"]: c.cell_id for c in expand(parse_spec(raw), "cpu")}
    assert all(base[w] != changed[w] for w in base)


# Pinned cell ids of the `smoke` preset expanded for "cpu". Every stored result is keyed by its
# cell_id and `--resume` skips ids already recorded, so a change here changes the id of every
# stored result: it must be deliberate (a change to Cell.identity, the config or the preset),
# and then these constants are updated together with a note in the changelog.
SMOKE_CPU_IDS = {
    "train/dense/mha/fp32 b8×t128": "4cfa6f140a4f",
    "prefill/dense/mha/fp32 b8×t128": "ccb8f7b2fc10",
    "decode/dense/mha/fp32 b4×ctx64+32": "7e178c3836ec",
    "decode/dense/mha/fp32 b4×ctx192+32": "b00088c9660f",
}


def test_smoke_cell_ids_pinned():
    assert _ids(load_preset("smoke")) == SMOKE_CPU_IDS


def test_cell_ids_stable_across_parses():
    a, b = load_preset("smoke"), load_preset("smoke")
    assert a is not b
    assert [c.cell_id for c in expand(a, "cpu")] == [c.cell_id for c in expand(b, "cpu")]
    assert [c.cell_id for c in expand(a, "cpu")] == [c.cell_id for c in expand(a, "cpu")]


def test_cell_ids_stable_across_processes():
    code = ("import json; from dsbench.spec import expand, load_preset; "
            "print(json.dumps({c.label(): c.cell_id for c in expand(load_preset('smoke'), 'cpu')}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == SMOKE_CPU_IDS


def test_device_changes_id():
    spec = load_preset("smoke")
    cpu, cuda = expand(spec, "cpu"), expand(spec, "cuda")
    assert [c.label() for c in cpu] == [c.label() for c in cuda]
    assert not {c.cell_id for c in cpu} & {c.cell_id for c in cuda}
    assert all(c.device == "cuda" for c in cuda)


def test_cell_json_round_trip():
    spec = parse_spec(tomllib.loads(SPEC_TOML))
    cells = expand(spec, "cpu")
    assert len(cells) == 2 * (1 + 2 + 1)
    for cell in cells:
        text = cell.to_json()
        assert json.loads(text)["cell_id"] == cell.cell_id
        back = Cell.from_json(text)
        assert back.cell_id == cell.cell_id
        assert back.model == cell.model and isinstance(back.model, ModelConfig)
        assert back.axes == cell.axes and back.workload == cell.workload and back.measure == cell.measure
        assert (back.seed, back.data, back.device) == (cell.seed, cell.data, cell.device)
        assert back.label() == cell.label()


def test_labels():
    spec = parse_spec(_spec(
        axes={"workload": ["train", "prefill", "decode"], "precision": ["bf16"]},
        train={"batch_size": 3, "seq_len": 32},
        prefill={"batch_size": 5, "seq_lens": [48]},
        decode={"batch_size": 7, "context_lens": [100], "new_tokens": 12},
    ))
    assert [c.label() for c in expand(spec, "cpu")] == [
        "train/dense/mha/bf16 b3×t32",
        "prefill/dense/mha/bf16 b5×t48",
        "decode/dense/mha/bf16 b7×ctx100+12",
    ]


# --- 4. presets ---


def test_preset_names():
    names = preset_names()
    assert names == sorted(names)
    assert {"smoke", "ci", "cpu-small", "medium-gpu", "large-gpu"} <= set(names)


@pytest.mark.parametrize("old, new", [("gpu-small", "medium-gpu"), ("gpu-medium", "large-gpu")])
def test_a_renamed_preset_is_one_line_naming_its_new_name(old, new):
    assert old not in preset_names() and new in preset_names()
    with pytest.raises(SpecError, match=f"^preset: '{old}' was renamed '{new}' .*use --preset {new}$"):
        load_preset(old)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_expands(name):
    spec = load_preset(name)
    assert spec.name == name and spec.description
    device = "cuda" if spec.device == "cuda" else "cpu"  # a GPU preset may hold what only CUDA runs (CUDA graphs)
    cells = expand(spec, device)
    assert cells and len({c.cell_id for c in cells}) == len(cells)
    assert all(c.device == device for c in cells)
    for cell in cells:
        assert Cell.from_json(cell.to_json()).cell_id == cell.cell_id


def test_smoke_preset_covers_every_workload():
    cells = expand(load_preset("smoke"), "cpu")
    assert len(cells) >= 4
    assert {c.axes["workload"] for c in cells} == {"train", "prefill", "decode"}


def test_unknown_preset_lists_presets():
    with pytest.raises(SpecError) as info:
        load_preset("nope")
    message = str(info.value)
    assert "\n" not in message
    assert "'nope'" in message and "preset" in message
    for name in preset_names():
        assert name in message


# --- dotted-key axes, [[sweep]] blocks, keys no variant reads ---


def _cells(raw: dict) -> list:
    return expand(parse_spec(raw), "cpu")


def test_dotted_axis_sweeps_a_part_field_and_collapses_where_unread():
    raw = _spec(axes={"ffn": ["dense", "moe"], "ffn.n_experts": [8, 16]})
    cells = _cells(raw)
    moe = sorted((c.axes["ffn.n_experts"], c.model.ffn.n_experts) for c in cells if c.axes["ffn"] == "moe")
    assert moe == [(8, 8), (16, 16)]
    dense = [c for c in cells if c.axes["ffn"] == "dense"]
    assert len(dense) == 1 and dense[0].axes["ffn.n_experts"] == "n/a"  # dense reads no n_experts: one cell
    plain = {c.axes["ffn"]: c for c in _cells(_spec(axes={"ffn": ["dense", "moe"]}, ffn={"n_experts": 8}))}
    assert dense[0].cell_id == plain["dense"].cell_id  # dotted axes are not identity: the same cell, the same id
    assert next(c for c in cells if c.axes["ffn.n_experts"] == 8).cell_id == plain["moe"].cell_id
    assert "ffn.n_experts=16" in next(c for c in cells if c.axes["ffn.n_experts"] == 16).label()


def test_dotted_axis_over_model_size_and_workload_settings():
    cells = _cells(_all_workloads(axes={"model.size": ["debug", "small"], "train.lr": [1e-3, 3e-3]}))
    train = [c for c in cells if c.axes["workload"] == "train"]
    assert sorted((c.model.d_model, c.workload["lr"]) for c in train) == [(64, 1e-3), (64, 3e-3), (256, 1e-3), (256, 3e-3)]
    decode = [c for c in cells if c.axes["workload"] == "decode"]
    assert len(decode) == 2 and {c.axes["train.lr"] for c in decode} == {"n/a"}  # train.lr does not touch decode cells
    small = _cells(_all_workloads(model={"size": "small"}))
    assert {c.cell_id for c in small} <= {c.cell_id for c in cells}


def test_dotted_attention_field_applies_to_mla_only():
    cells = _cells(_spec(axes={"attention": ["mha", "mla"], "attention.kv_lora_rank": [32, 64]}))
    assert sorted(c.model.attention.kv_lora_rank for c in cells if c.axes["attention"] == "mla") == [32, 64]
    assert [c.axes["attention.kv_lora_rank"] for c in cells if c.axes["attention"] == "mha"] == ["n/a"]


@pytest.mark.parametrize("raw, words", [
    (_spec(axes={"optim.lr": [1]}), ["axes.optim.lr", "unknown key", "model", "ffn", "train"]),
    (_spec(axes={"ffn.bogus": [1]}), ["ffn.bogus", "unknown key", "d_ff"]),
    (_spec(axes={"ffn": ["moe"], "ffn.n_experts": [8, 0]}), ["ffn.n_experts", "0", "positive integer"]),
    (_spec(axes={"ffn.n_experts": [8]}), ["ffn.n_experts", "no ffn variant of this sweep reads it", "dense", "moe"]),
    (_spec(axes={"ffn": ["moe"], "ffn.n_experts": [8]}, ffn={"n_experts": 4}), ["axes.ffn.n_experts", "also set in [ffn]"]),
    (_spec(axes={"ffn": ["moe"], "ffn.n_experts": []}), ["axes.ffn.n_experts", "empty"]),
    (_spec(axes={"ffn": ["moe"], "ffn.n_experts": [8, 8]}), ["axes.ffn.n_experts", "8", "twice"]),
    (_spec(axes={"model.size": ["debug", "huge"]}), ["model.size", "'huge'", "small"]),
    (_spec(ffn={"n_experts": 8}), ["ffn.n_experts", "no ffn variant of this sweep reads it", "axes.ffn = dense"]),
    (_spec(axes={"attention": ["gqa", "mqa"]}), ["axes.attention", "'gqa'", "'mqa'", "same model"]),
    (_spec(sweep=[{"ffn": {"d_ff": 192}}, {"axes": {"ffn": ["moe"]}, "ffn": {"top_k": 5}}]), ["sweep[1]", "ffn.d_ff", "top_k 5"]),
    (_spec(sweep=[{"name": "x"}]), ["sweep[0].name", "unknown key", "axes"]),
    (_spec(ffn={"n_experts": 8}, sweep=[{}, {"axes": {"attention": ["mla"]}}]), ["ffn.n_experts", "no ffn variant", "moe"]),
    (_spec(sweep=[]), ["sweep", "[[sweep]]"]),
    (_spec(plugins=[3]), ["plugins", "module names"]),
], ids=["dotted-section", "dotted-field", "dotted-value", "dotted-unread", "dotted-also-set", "dotted-empty", "dotted-twice",
        "dotted-size", "unread-key", "same-model", "block-error", "block-unknown", "block-top-unread", "blocks-empty", "plugins-type"])
def test_bad_dotted_block_and_unread_input_is_one_clear_line(raw, words):
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_sweep_blocks_run_as_one_run_with_each_blocks_own_ids():
    shared = {"axes": {"ffn": ["deepseekmoe"], "balance": ["aux"]}}
    raw = _spec(ffn={"granularity": 4}, sweep=[shared, {**shared, "ffn": {"n_shared": 0}}, {}])
    spec = parse_spec(raw)
    cells = expand(spec, "cpu")
    assert sorted((c.axes["ffn"], c.model.ffn.n_shared if c.axes["ffn"] == "deepseekmoe" else None) for c in cells) == [
        ("deepseekmoe", 0), ("deepseekmoe", 1), ("dense", None)]
    alone = _cells(_spec(ffn={"granularity": 4, "n_shared": 0}, **shared))
    assert alone[0].cell_id in {c.cell_id for c in cells}  # a block's cells keep the ids they have alone
    again = S.SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # run.json round trip
    assert [c.cell_id for c in expand(again, "cpu")] == [c.cell_id for c in cells]
    assert spec.axes["ffn"] == ("deepseekmoe", "dense")  # the union, for listings


def test_a_key_some_variants_read_leaves_the_others_ids_alone():
    both = {c.axes["ffn"]: c for c in _cells(_spec(axes={"ffn": ["dense", "moe"]}, ffn={"n_experts": 8}))}
    dense_only = _cells(_spec())
    assert both["dense"].cell_id == dense_only[0].cell_id and both["moe"].model.ffn.n_experts == 8

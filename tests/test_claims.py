"""`dsbench claims`: the official-config counter against hand-checkable numbers, each verdict rule
on fixture results, the registry, the shipped configs and the paper presets."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from fixture_results import ci_cells, make_cell, write_results
from typer.testing import CliRunner

from dsbench import claims, official
from dsbench.accounting import static_row
from dsbench.cli import app
from dsbench.report import build_report
from dsbench.results import load_results
from dsbench.spec import expand, load_preset, preset_names
from dsbench.variants import decoder
from dsbench.variants.attention import MultiHeadAttention
from dsbench.variants.config import config_from_size
from dsbench.variants.mla import MultiHeadLatentAttention

ROOT = Path(__file__).resolve().parents[1]

runner = CliRunner()


def verdicts(*folders: Path) -> dict[str, claims.Evidence]:
    return {r.claim.id: r.evidence for r in claims.evaluate([load_results(f) for f in folders])}


# --- the official configs and the counter ---


@pytest.mark.parametrize("name", official.OFFICIAL_MODELS)
def test_every_shipped_config_loads_and_names_its_source(name):
    arch = official.load_official(name)
    assert "config.json" in arch.source
    c = official.param_counts(arch)
    assert c.total >= c.activated_with_embedding > c.activated > 0
    assert (c.total == c.activated_with_embedding) == (arch.n_routed_experts is None)  # dense: every parameter is used
    assert official.kv_cache_elements_per_token(arch) > 0


def test_llama2_7b_by_hand():
    # per layer: q,k,v,o 4·4096² + SwiGLU 3·4096·11008 + two norms 2·4096 = 202,383,360
    layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert layer == 202_383_360
    total = 32 * layer + 2 * 32000 * 4096 + 4096  # + embedding, head, final norm
    c = official.param_counts(official.load_official("llama-2-7b"))
    assert c.total == total == 6_738_415_616  # the Hub's count for meta-llama/Llama-2-7b-hf
    assert c.activated == total - 32000 * 4096
    assert official.kv_cache_elements_per_token(official.load_official("llama-2-7b")) == 2 * 32 * 128 * 32


def test_deepseek_v3_by_hand():
    a = official.load_official("deepseek-v3")
    # MLA: W^DQ 7168·1536, W^UQ|W^QR 1536·128·192, W^DKV|W^KR 7168·576, W^UK|W^UV 512·128·256, W^O 128·128·7168, norms 1536 + 512
    attention = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168 + 1536 + 512
    assert official.attention_params(a) == attention == 187_107_328
    expert = 3 * 7168 * 2048
    moe_layer = attention + 256 * 7168 + 256 + 257 * expert + 2 * 7168  # router + its bias, 256 routed + 1 shared, norms
    dense_layer = attention + 3 * 7168 * 18432 + 2 * 7168
    embedding = 129280 * 7168
    c = official.param_counts(a)
    assert c.total == 3 * dense_layer + 58 * moe_layer + 2 * embedding + 7168 == 671_026_419_200
    assert c.activated == c.total - embedding - 58 * 248 * expert  # 248 routed experts idle per MoE layer
    assert c.mtp == moe_layer + 2 * 7168 + 2 * 7168 * 7168  # block, enorm/hnorm, M (2d → d)
    # main + MTP (with the copies of embedding and head its checkpoint stores) + FP8 block scales:
    # exactly the safetensors total the Hub rounds to "685B"
    assert c.total + c.mtp_stored + official.fp8_scale_count(a) == 684_531_386_000


@pytest.mark.parametrize("name, total, activated", [
    ("deepseek-v2", 235_741_434_880, 20_851_512_320),
    ("deepseek-v2-lite", 15_706_484_224, 2_451_435_008),
    ("deepseek-moe-16b", 16_375_728_128, 2_618_935_296),
    ("deepseek-llm-67b", 67_425_001_472, 66_586_140_672),
])
def test_published_models_counts(name, total, activated):
    c = official.param_counts(official.load_official(name))
    assert (c.total, c.activated) == (total, activated)


def test_v2_lite_by_hand():
    # no query compression: W^Q 2048·16·192; W^DKV|W^KR 2048·576; W^UK|W^UV 512·16·256; W^O 16·128·2048; kv norm 512
    attention = 2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048 + 512
    expert = 3 * 2048 * 1408
    moe_active = attention + 64 * 2048 + 8 * expert + 2 * 2048  # router, 6 routed + 2 shared, norms
    dense = attention + 3 * 2048 * 10944 + 2 * 2048
    assert official.param_counts(official.load_official("deepseek-v2-lite")).activated == dense + 26 * moe_active + 102400 * 2048 + 2048


def test_counter_agrees_with_dsbench_own_modules():
    """The official counter and variants/ count the same architectures the same way."""
    llama = official.load_official("llama-2-7b")
    cfg = config_from_size("debug", d_model=4096, n_layers=32, vocab_size=32000, n_heads=32, d_ff=11008, max_seq_len=4096)
    assert decoder.param_counts(cfg)["params_total"] == official.param_counts(llama).total
    assert MultiHeadAttention.param_count(cfg) == official.attention_params(llama)
    forward = decoder.forward_flops_per_token(cfg, (4096 + 1) / 2)  # dsbench's FLOP convention, causal mean context
    assert 3 * forward == pytest.approx(official.train_flops_per_token(llama, 4096), rel=1e-12)
    v2 = official.load_official("deepseek-v2")
    mla = config_from_size("debug", d_model=5120, n_heads=128, head_dim=128, kv_lora_rank=512, q_lora_rank=1536,
                           qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, attention="mla")
    assert MultiHeadLatentAttention.param_count(mla) == official.attention_params(v2)
    assert MultiHeadLatentAttention.kv_cache_bytes_per_token(mla, 2) * 60 == 2 * official.kv_cache_elements_per_token(v2)


def test_kv_and_flops_by_hand():
    assert official.kv_cache_elements_per_token(official.load_official("deepseek-v2")) == (512 + 64) * 60 == 34_560
    assert official.kv_cache_elements_per_token(official.load_official("deepseek-llm-67b")) == 2 * 8 * 128 * 95 == 194_560
    t = official.table1_kv_elements(n_h=128, d_h=128, n_layers=60, n_g=8, d_c=512, d_rope=64)
    assert t == {"MHA": 1_966_080, "GQA": 122_880, "MQA": 15_360, "MLA": 34_560}
    llama = official.load_official("llama-2-7b")
    # matmul params: activated less the norms (2·4096 a layer + the final 4096)
    matmul = official.param_counts(llama).activated - (2 * 4096 * 32 + 4096)
    assert official.activated_matmul_params(llama) == matmul == 6_607_077_376
    # 3 × (2 · matmul params + 2·32 heads·(128 + 128)·4096 keys·32 layers), every key attended
    assert official.train_flops_per_token(llama, 4096, causal=False) == 3 * (2 * matmul + 2 * 32 * 256 * 4096 * 32)


def test_unknown_official_model_is_one_line():
    with pytest.raises(official.OfficialConfigError, match="unknown model 'gpt-5'; allowed: deepseek-v3"):
        official.load_official("gpt-5")


# --- the analytic claims ---


def test_published_match_rule():
    assert claims.published_match(2.83e9, "2.8B")[0]  # +1.1%, but rounds to 2.8
    assert not claims.published_match(2.86e9, "2.8B")[0]
    assert claims.published_match(673e9, "671B") == (True, "within 1%")
    assert not claims.published_match(678e9, "671B")[0]  # 1.04% off; 671B is printed to the unit
    assert claims.published_value("15.7B") == (15.7e9, pytest.approx(0.05e9))


def test_analytic_verdicts():
    got = {r.claim.id: r.evidence for r in claims.evaluate()}
    reproduced = ("v3-total-params", "v3-activated-params", "v3-checkpoint-685b", "v2-total-params", "v2-activated-params",
                  "v2-lite-total-params", "moe16b-total-params", "moe16b-activated-params", "v2-kv-table1", "v2-kv-vs-67b",
                  "moe16b-flops-vs-llama2")
    for cid in reproduced:
        assert got[cid].verdict == claims.REPRODUCED, (cid, got[cid])
    assert got["v2-lite-activated-params"].verdict == claims.NOT_REPRODUCED  # 2.45B; deepseek-ai/DeepSeek-V2 #73
    assert got["v3-activated-fraction"].verdict == claims.NOT_REPRODUCED and got["v3-activated-fraction"].measured == "5.5%"
    assert got["v2-training-cost"].verdict == claims.DIRECTION
    assert "82.2%" in got["v2-kv-vs-67b"].measured and "93.3%" in got["v2-kv-vs-67b"].measured
    assert "684,531,386,000" in got["v3-checkpoint-685b"].detail
    for cid in ("deepseekmoe-vs-moe", "fp8-loss-gap", "mla-kv-bytes"):
        assert got[cid].verdict == claims.NOT_CHECKABLE and "paper-cpu" in got[cid].detail
    assert "14.8T" in got["v3-training-cost"].detail  # a fixed reason, not "run paper-cpu"


def test_registry_is_well_formed():
    ids = [c.id for c in claims.CLAIMS]
    assert len(ids) == len(set(ids))
    for c in claims.CLAIMS:
        assert c.method in ("analytic", "empirical") and c.paper and c.where and c.statement and c.expected
    rows = claims.evaluate()
    assert all(r.evidence.verdict in claims.VERDICTS for r in rows)
    assert all(r.evidence.measured == "–" for r in rows if r.evidence.verdict == claims.NOT_CHECKABLE)


# --- the empirical claims on fixture results ---

KV = {"mha": dict(n_heads=4, n_kv_heads=4, head_dim=16), "mla": dict(n_heads=4, n_kv_heads=None, head_dim=16, kv_lora_rank=64, qk_rope_head_dim=8)}


def train(ffn="dense", precision="bf16", balance="n/a", loss=2.0, maxvio=None, **kw) -> dict:
    return make_cell("train", ffn, "mha", precision, balance, final_loss=loss, eval_loss=loss + 0.05, maxvio_global=maxvio, **kw)


def decode(attention: str, tokens_per_s: float, per_layer: int, precision="bf16", **kw) -> dict:
    kv = 2 * 2 * per_layer  # 2 layers, 2-byte elements
    return make_cell("decode", "dense", attention, precision, batch_size=8, context_len=128, new_tokens=32,
                     tokens_per_s_median=tokens_per_s, kv_cache_bytes_per_token=kv, kv_cache_bytes_per_token_measured=kv,
                     **KV[attention], **kw)


def loss_curve(cell: dict, steps: int = 20) -> list[dict]:
    return [dict(step=s, metric="loss", value=(5.5 * 0.9**s + 2.0) * cell["final_loss"] / 2.0) for s in range(steps)]


def write(path: Path, cells: list[dict], n_shared: int | None = None) -> Path:
    for i, c in enumerate(cells):
        c["cell_index"] = i
    write_results(path, cells, series=[(c, loss_curve(c)) for c in cells if c["workload"] == "train"])
    if n_shared is not None:  # as a sweep with [ffn] n_shared = … records it
        info = json.loads((path / "run.json").read_text())
        info["spec"]["ffn"] = {"n_shared": n_shared}
        (path / "run.json").write_text(json.dumps(info))
    return path


def evidence_cells(dsmoe_loss=2.05, fp8=2.002, tensorwise=2.01, mla_tps=1200.0, mla_layer=72) -> list[dict]:
    """Every empirical claim's evidence, with chosen numbers."""
    return [
        train("dense", "bf16", loss=2.0), train("dense", "fp8", loss=fp8), train("dense", "fp8-tensorwise", loss=tensorwise),
        train("moe", balance="aux", loss=2.10, maxvio=0.30), train("moe", balance="bias", loss=2.09, maxvio=0.08),
        train("deepseekmoe", balance="aux", loss=dsmoe_loss, maxvio=0.25),
        train("deepseekmoe", balance="bias", loss=dsmoe_loss - 0.01, maxvio=0.05),
        *speed_pairs(mla_tps, mla_layer),
    ]


def speed_pairs(mla_tps: float, mla_layer: int, n: int = 5) -> list[dict]:
    """n replicate pairs of decode cells whose speed means something (no numerics-only note): under
    5 pairs no 90% interval exists and the throughput claim draws no verdict."""
    out = []
    for i in range(n):
        jitter = 1 + 0.01 * (i - n // 2)  # a spread, so the interval is not a single point
        out += [decode("mha", 1000.0 * jitter, 128, replicate=i, speed_note=None),
                decode("mla", mla_tps / jitter, mla_layer, replicate=i, speed_note=None)]
    return out


def test_direction_and_reproduced_verdicts(tmp_path):
    got = verdicts(write(tmp_path / "r", evidence_cells()))
    assert got["mla-kv-bytes"].verdict == claims.REPRODUCED  # 72 / (2·4·16) = 0.5625, measured = formula
    assert "0.5625" in got["mla-kv-bytes"].measured and "live caches" in got["mla-kv-bytes"].detail
    for cid in ("deepseekmoe-vs-moe", "aux-free-balance", "mla-decode-throughput", "fp8-loss-gap", "fp8-tensorwise-worse"):
        assert got[cid].verdict == claims.DIRECTION, (cid, got[cid])
    assert got["deepseekmoe-vs-moe"].measured == "2/2 pairs lower"  # aux and bias pairs
    assert "2.0500 vs 2.1000" not in got["deepseekmoe-vs-moe"].detail and "eval loss" in got["deepseekmoe-vs-moe"].detail
    assert "+0.100%" in got["fp8-loss-gap"].detail and "dense cells" in got["fp8-loss-gap"].detail
    assert got["shared-expert"].verdict == claims.NOT_CHECKABLE and "second [[sweep]] block" in got["shared-expert"].detail


def test_not_reproduced_verdicts(tmp_path):
    cells = evidence_cells(dsmoe_loss=2.2, fp8=2.01, tensorwise=2.005, mla_tps=800.0, mla_layer=100)
    got = verdicts(write(tmp_path / "r", cells))
    for cid in ("deepseekmoe-vs-moe", "fp8-loss-gap", "fp8-tensorwise-worse", "mla-decode-throughput", "mla-kv-bytes"):
        assert got[cid].verdict == claims.NOT_REPRODUCED, (cid, got[cid])
    assert "0 of 2 pairs agree" in got["deepseekmoe-vs-moe"].detail
    assert "formula 0.5625" in got["mla-kv-bytes"].detail  # measured 0.78 does not match (d_c + d_h^R) / 2·n_h·d_h


def test_aux_free_needs_lower_maxvio_and_no_worse_loss(tmp_path):
    cells = [train("deepseekmoe", balance="aux", loss=2.0, maxvio=0.3), train("deepseekmoe", balance="bias", loss=2.02, maxvio=0.1)]
    assert verdicts(write(tmp_path / "worse", cells))["aux-free-balance"].verdict == claims.NOT_REPRODUCED  # +1% loss
    cells = [train("deepseekmoe", balance="aux", loss=2.0, maxvio=0.3), train("deepseekmoe", balance="bias", loss=2.005, maxvio=0.1)]
    assert verdicts(write(tmp_path / "tie", cells))["aux-free-balance"].verdict == claims.DIRECTION  # +0.25%: no worse


def test_missing_evidence_is_not_checkable_and_says_what_to_run(tmp_path):
    got = verdicts(write_results(tmp_path / "ci", ci_cells()))
    for cid in ("deepseekmoe-vs-moe", "shared-expert", "aux-free-balance", "mla-kv-bytes", "mla-decode-throughput",
                "fp8-loss-gap", "fp8-tensorwise-worse"):
        assert got[cid].verdict == claims.NOT_CHECKABLE and got[cid].measured == "–", cid
        assert "paper-cpu" in got[cid].detail and got[cid].detail.startswith("no "), cid
    emulated = [decode("mha", 1000.0, 128, precision="fp8", emulated=True), decode("mla", 1200.0, 72, precision="fp8", emulated=True)]
    got = verdicts(write(tmp_path / "emulated", emulated))
    assert got["mla-decode-throughput"].verdict == claims.NOT_CHECKABLE and "emulated" in got["mla-decode-throughput"].detail
    assert got["mla-kv-bytes"].verdict == claims.REPRODUCED  # bytes do not depend on speed
    no_loss = lambda c: {k: v for k, v in c.items() if k not in ("final_loss", "eval_loss")}  # noqa: E731
    old = [no_loss(make_cell("train", ffn, "mha", "bf16", "aux")) for ffn in ("moe", "deepseekmoe")]
    lacking = verdicts(write_results(tmp_path / "old", old, series=[]))["deepseekmoe-vs-moe"]
    assert lacking.verdict == claims.NOT_CHECKABLE and "'final_loss'" in lacking.detail  # a column it lacks, not a crash


def test_shared_expert_pairs_across_two_runs(tmp_path):
    main = write(tmp_path / "main", evidence_cells())
    none = [train("deepseekmoe", balance="aux", loss=2.08, maxvio=0.3), train("deepseekmoe", balance="bias", loss=2.07, maxvio=0.1)]
    noshared = write(tmp_path / "noshared", none, n_shared=0)
    got = verdicts(main, noshared)
    assert got["shared-expert"].verdict == claims.DIRECTION and got["shared-expert"].measured == "2/2 pairs lower"
    assert got["deepseekmoe-vs-moe"].measured == "2/2 pairs lower"  # the n_shared = 0 cells are not DeepSeekMoE's
    # a row's own n_shared column wins over the run's spec
    flipped = [dict(c, n_shared=1) for c in none]
    got = verdicts(main, write(tmp_path / "column", flipped, n_shared=0))
    assert got["shared-expert"].verdict == claims.NOT_CHECKABLE


def test_committed_paper_cpu_alone_says_what_it_lacks():
    """results/paper-cpu predates the preset's n_shared = 0 block: 'run paper-cpu' would say
    nothing to its reader; the detail names what is missing and the folder that has it."""
    got = verdicts(ROOT / "results" / "paper-cpu")["shared-expert"]
    assert got.verdict == claims.NOT_CHECKABLE
    assert "n_shared = 0" in got.detail and "recorded before paper-cpu held" in got.detail
    assert "results/paper-cpu-noshared" in got.detail


# --- the command and the report ---


def test_cli_claims_table_json_markdown(tmp_path):
    done = runner.invoke(app, ["claims"])
    assert done.exit_code == 0, done.output
    assert "v3-total-params" in done.output and "671.03B" in done.output and "not checkable here" in done.output
    folder = write(tmp_path / "r", evidence_cells())
    done = runner.invoke(app, ["claims", str(folder), "--json"])
    rows = json.loads(done.output)
    assert len(rows) == len(claims.CLAIMS) and {"id", "paper", "where", "method", "expected", "measured", "verdict", "detail"} <= set(rows[0])
    assert {r["id"]: r["verdict"] for r in rows}["mla-kv-bytes"] == "reproduced"
    done = runner.invoke(app, ["claims", "--markdown"])
    assert done.output.startswith("| id | claim | source |") and "| v2-kv-vs-67b |" in done.output


def test_cli_claims_bad_folder_is_one_line(tmp_path):
    done = runner.invoke(app, ["claims", str(tmp_path / "nope")])
    assert done.exit_code == 2
    assert "claims:" in done.output and "does not exist" in done.output and "Traceback" not in done.output


def test_report_has_a_claims_section_only_with_evidence(tmp_path):
    out = build_report([write(tmp_path / "r", evidence_cells())], out=tmp_path / "rep")
    md = (out / "index.md").read_text()
    assert "## Claims: the papers' efficiency claims" in md and "| mla-kv-bytes |" in md
    assert (out / "tables" / "claims.csv").exists()
    out = build_report([write_results(tmp_path / "ci", ci_cells())], out=tmp_path / "rep-ci")
    assert "Claims:" not in (out / "index.md").read_text()


# --- the paper presets ---


def synthetic_run(path: Path, preset: str) -> Path:
    """What a sweep of `preset` would record (its cells' static rows) with plausible metrics."""
    spec = load_preset(preset)
    rows = []
    for cell in expand(spec, "cpu"):
        row = {**static_row(cell), "status": "ok", "error": None, "emulated": cell.axes["precision"].startswith("fp8")}
        if cell.axes["workload"] == "train":
            row.update(final_loss=2.0, eval_loss=2.05, maxvio_global=0.1 if cell.axes["balance"] == "bias" else 0.3)
        else:
            row.update(tokens_per_s_median=1000.0, kv_cache_bytes_per_token_measured=row["kv_cache_bytes_per_token"])
        rows.append(row)
    write(path, rows)
    info = json.loads((path / "run.json").read_text())
    info["spec"] = json.loads(json.dumps(spec.to_dict()))
    (path / "run.json").write_text(json.dumps(info))
    return path


@pytest.mark.parametrize("preset", ["paper-cpu", "paper-gpu"])
def test_paper_presets_give_every_empirical_claim_its_evidence(tmp_path, preset):
    got = verdicts(synthetic_run(tmp_path / "main", preset))  # the n_shared = 0 ablation is a [[sweep]] block
    for c in claims.CLAIMS:
        if c.method == "empirical" and not isinstance(c.check, claims.NotCheckable) and "paper-cpu" in c.hint:
            assert got[c.id].verdict != claims.NOT_CHECKABLE, (c.id, got[c.id])


SPECULATIVE = dict(accept_rate_pos1=0.8, accepted_len_mean=1.8, spec_speedup=1.5, verify_cost_ratio=1.1, spec_matches_greedy=True)


@pytest.mark.skipif("mtp-cpu" not in preset_names(), reason="the mtp-cpu preset lands with the MTP core work")
def test_mtp_cpu_preset_gives_the_mtp_claims_their_evidence(tmp_path):
    """Its cells' static rows pair along mtp (nothing an MTP depth decides is held against a pair)
    and its speculative cells carry the settings the checks read."""
    path = synthetic_run(tmp_path / "mtp", "mtp-cpu")
    cells = pd.read_parquet(path / "cells.parquet")
    speculative = cells["workload"] == "speculative"
    for column, value in SPECULATIVE.items():
        cells[column] = pd.Series([value if s else None for s in speculative], dtype=object)
    cells.to_parquet(path / "cells.parquet", index=False)
    got = verdicts(path)
    for c in claims.CLAIMS:
        if "mtp-cpu" in c.hint:
            assert got[c.id].verdict != claims.NOT_CHECKABLE, (c.id, got[c.id])


@pytest.mark.parametrize("preset", ["paper-cpu", "paper-gpu"])
def test_paper_presets_hold_the_shared_expert_ablation(preset):
    # paper-*-noshared were separate presets; they are the second [[sweep]] block now.
    points = [p for _, p in load_preset(preset).points]
    main, none = points
    assert main.ffn["n_shared"] == 1 and none.ffn["n_shared"] == 0
    assert {k: v for k, v in none.ffn.items() if k != "n_shared"} == {k: v for k, v in main.ffn.items() if k != "n_shared"}
    for field in ("device", "seed", "data", "size", "model", "attention", "train", "measure"):
        assert getattr(none, field) == getattr(main, field), field
    for axis, values in none.axes.items():
        assert set(values) <= set(main.axes[axis]), axis


def test_committed_paper_cpu_evidence_is_the_folded_presets_cells():
    # Folding kept every cell id: both committed folders are cells of today's paper-cpu.
    ids = {c.cell_id for c in expand(load_preset("paper-cpu"), "cpu")}
    for folder in ("paper-cpu", "paper-cpu-noshared"):
        assert set(pd.read_parquet(ROOT / "results" / folder / "cells.parquet")["cell_id"]) <= ids, folder


def test_paper_cpu_stays_small():
    cells = expand(load_preset("paper-cpu"), "cpu")
    train = [c for c in cells if c.axes["workload"] == "train"]
    # 60 cells (30 train) plus the 4 train cells of the shared-expert block, once paper-cpu-noshared
    assert len(cells) <= 64 and len(train) <= 34
    assert all(c.model.d_model <= 64 and c.workload.get("steps", 0) <= 100 for c in cells)


# --- one real sweep, end to end ---

REAL = """
name = "claims-e2e"
device = "cpu"
seed = 0
[model]
size = "debug"
n_layers = 1
[axes]
workload = ["train", "decode"]
ffn = ["moe", "deepseekmoe"]
attention = ["mha", "mla"]
precision = ["fp32"]
balance = ["aux"]
[train]
steps = 6
batch_size = 2
seq_len = 16
eval_batches = 1
[decode]
batch_size = 2
context_lens = [32]
new_tokens = 4
[measure]
warmup = 1
repeats = 3
timeout_s = 120
calibrate = false
"""


@pytest.mark.slow
def test_real_sweep_feeds_the_claims(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(REAL))
    done = runner.invoke(app, ["run", "sweep", str(spec), "--out", str(tmp_path / "r")])
    assert done.exit_code == 0, done.output
    got = verdicts(tmp_path / "r")
    assert got["mla-kv-bytes"].verdict == claims.REPRODUCED  # live caches match V2 Table 1's formula
    assert "live caches" in got["mla-kv-bytes"].detail
    for cid in ("deepseekmoe-vs-moe", "mla-decode-throughput"):
        assert got[cid].verdict in (claims.DIRECTION, claims.NOT_REPRODUCED), (cid, got[cid])

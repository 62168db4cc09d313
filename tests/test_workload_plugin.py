"""A workload is one registration: a toy forward-only `score` workload, declared and registered in
this test module alone (no harness file names it), shows up in spec parsing, the CLI (its flags,
`dsbench workloads`, `run sweep --dry-run`) and the report's spec section, and runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from dsbench import spec as spec_lib
from dsbench.cli import app, cell_spec
from dsbench.data import load_dataset
from dsbench.errors import SpecError
from dsbench.measure import StepTimer
from dsbench.report.sections import spec_table
from dsbench.variants.decoder import build_model
from dsbench.variants.precision import precision_of
from dsbench.workloads import WORKLOADS, Context, WorkloadRun, register
from dsbench.workloads.base import WholeSequences, check_finite


@dataclass(frozen=True)
class ScoreSettings:
    batch_size: int = 2
    seq_lens: tuple[int, ...] = (16,)


class Score(WholeSequences):
    """Score held-out text: one forward and its cross-entropy per step, no cache, no backward."""

    name = "score"
    Settings = ScoreSettings
    description = "one forward over batch×seq tokens and its loss (scoring text)"

    def cells(self, section: ScoreSettings, cfg) -> list[dict]:
        return [{"batch_size": section.batch_size, "seq_len": T} for T in section.seq_lens]

    def section_from_flags(self, flags) -> dict:
        return {"batch_size": flags.batch_size, "seq_lens": [flags.seq_len]}

    def data_lengths(self, section: ScoreSettings) -> list[tuple[int, str]]:
        return [(T, "eval") for T in section.seq_lens]

    def check(self, section: ScoreSettings, configs, read) -> None:
        limit = configs[0][1].max_seq_len
        for T in section.seq_lens:
            if T > limit:
                raise SpecError(f"score.seq_lens: {T} exceeds model.max_seq_len {limit}")

    @torch.inference_mode()
    def run(self, ctx: Context, settings: dict) -> WorkloadRun:
        B, T = settings["batch_size"], settings["seq_len"]
        ctx.model.eval()
        batch = ctx.data.batch(0, B, T, split="eval")
        timer = StepTimer(ctx.device)
        for i in range(ctx.warmup + ctx.repeats):
            with timer.step(record=i >= ctx.warmup):
                logits = ctx.model(batch.inputs)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten())
        check_finite(loss, "score loss")
        return WorkloadRun(timer.samples_s(), self.tokens_per_step(settings), self.mean_context_len(settings),
                           summary={"score_loss": float(loss)})


@pytest.fixture
def score():
    workload = register(Score())
    yield workload
    WORKLOADS.pop(workload.name)


def score_spec(**score_section) -> dict:
    return {"name": "scored", "device": "cpu", "model": {"size": "debug", "n_layers": 1},
            "axes": {"workload": ["score", "prefill"]}, "score": {"seq_lens": [8, 16], **score_section},
            "prefill": {"batch_size": 2, "seq_lens": [8]}, "measure": {"warmup": 1, "repeats": 2, "calibrate": False}}


def test_spec_parses_checks_and_expands_the_registered_workload(score):
    spec = spec_lib.parse_spec(score_spec())
    assert spec.score == ScoreSettings(seq_lens=(8, 16)) and "score" in spec_lib.dotted_sections()
    labels = [c.label() for c in spec_lib.expand(spec, "cpu")]
    assert labels == ["score/dense/mha/fp32 b2×t8", "score/dense/mha/fp32 b2×t16", "prefill/dense/mha/fp32 b2×t8"]
    assert spec_lib.SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # run.json round trip
    with pytest.raises(SpecError, match=r"^score\.seq_lens: 4096 exceeds model\.max_seq_len"):
        spec_lib.parse_spec(score_spec(seq_lens=[4096]))
    with pytest.raises(SpecError, match=r"^score\.width: unknown key; allowed: batch_size, seq_lens$"):
        spec_lib.parse_spec(score_spec(width=3))
    swept = spec_lib.parse_spec({**score_spec(), "axes": {"workload": ["score"], "score.batch_size": [1, 2]}})
    assert {c.axes["score.batch_size"] for c in spec_lib.expand(swept, "cpu")} == {1, 2}


def test_the_cli_lists_it_takes_its_flags_and_dry_runs_it(score, tmp_path):
    listed = CliRunner().invoke(app, ["workloads"])
    assert listed.exit_code == 0 and "score" in listed.output and "scoring text" in listed.output
    one = cell_spec("score", "dense", "mha", "fp32", "none", "debug", 3, 24, 16, 4, 5, 0, 1, 2, 0, "cpu", "synthetic")
    assert one.score == ScoreSettings(batch_size=3, seq_lens=(24,))  # run cell's --batch-size / --seq-len
    path = tmp_path / "scored.toml"
    path.write_text('name = "scored"\ndevice = "cpu"\n[model]\nsize = "debug"\n[axes]\nworkload = ["score"]\n'
                    '[score]\nseq_lens = [8, 16]\n')
    done = CliRunner().invoke(app, ["run", "sweep", str(path), "--dry-run"])
    assert done.exit_code == 0, done.output
    assert "scored: 2 cells" in done.output and done.output.count("score") >= 3
    help_text = CliRunner().invoke(app, ["run", "cell", "--help"], terminal_width=200).output
    assert "`dsbench workloads` lists them" in " ".join(help_text.replace("│", " ").split())


def test_the_reports_spec_section_shows_every_workloads_section(score):
    spec = spec_lib.parse_spec(score_spec())
    spec_rows = spec_table(SimpleNamespace(keys=["a"], runs=[SimpleNamespace(run={"spec": spec.to_dict()})]))
    assert spec_rows.loc[0, "score"] == "batch_size=2, seq_lens=(8, 16)" and spec_rows.loc[0, "prefill"] == "batch_size=2, seq_lens=(8,)"
    assert "train" not in spec_rows  # a workload the run does not run has no row


def test_a_speculative_runs_spec_section_is_in_its_report():
    raw = {"name": "s", "device": "cpu", "model": {"size": "debug", "n_layers": 1, "mtp": 1},
           "axes": {"workload": ["speculative"]}, "speculative": {"context_lens": [16], "new_tokens": 4, "train_steps": [2]}}
    spec = spec_lib.parse_spec(raw)
    rows = spec_table(SimpleNamespace(keys=["a"], runs=[SimpleNamespace(run={"spec": spec.to_dict()})]))
    assert rows.loc[0, "speculative"].startswith("batch_size=1, context_lens=(16,), new_tokens=4")


def test_it_runs(score):
    cell = spec_lib.expand(spec_lib.parse_spec(score_spec(seq_lens=[8])), "cpu")[0]
    torch.manual_seed(0)
    ctx = Context(build_model(cell.model), load_dataset("synthetic", 0), torch.device("cpu"), precision_of(cell.model), 1, 2)
    run = score.run(ctx, cell.workload)
    assert len(run.step_times_s) == 2 and run.tokens_per_step == 16 and run.summary["score_loss"] > 0

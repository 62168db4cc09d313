"""The `dsbench` command end to end, as a user runs it: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dsbench.results import load_results


def dsbench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsbench", *args], capture_output=True, text=True, timeout=timeout)


def dsbench_in_process(*args: str) -> subprocess.CompletedProcess:
    """The same command through the Typer app in this process (no interpreter and torch start-up:
    ~3.5 s a call); test_bad_input_is_one_line_in_a_real_process keeps one real process."""
    from typer.testing import CliRunner

    from dsbench.cli import app

    done = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(["dsbench", *args], done.exit_code, done.stdout, done.stderr)


def assert_usage_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    done = dsbench("run", "sweep", "--preset", "smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = load_results(out)
    cells = results.cells
    assert len(cells) >= 4 and set(cells["workload"]) == {"train", "prefill", "decode"}
    assert (cells["status"] == "ok").all()
    assert (cells["tokens_per_s_median"] > 0).all()
    assert cells["mfu"].between(0, 1).all()  # against this machine's calibrated matmul rate
    train = cells[cells.workload == "train"].iloc[0]
    assert train["final_loss"] < 0.7 * train["first_loss"]
    assert (out / "cells.parquet").exists() and (out / "series.parquet").exists()
    assert f"results: {out}" in done.stdout
    again = dsbench("run", "sweep", "--preset", "smoke", "--out", str(out))
    assert_usage_error(again, "--out", "--resume")


def test_dry_run_lists_cells_and_runs_nothing(tmp_path):
    done = dsbench_in_process("run", "sweep", "--preset", "smoke", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "smoke: 4 cells" in done.stdout
    for workload in ("train", "prefill", "decode"):
        assert workload in done.stdout


@pytest.mark.parametrize(
    "args, needles",
    [
        (("run", "sweep", "--preset", "nope"), ("preset", "'nope'", "smoke")),
        (("run", "sweep", "missing.toml"), ("missing.toml", "does not exist")),
        (("run", "sweep", "--preset", "smoke", "--device", "tpu"), ("--device", "'tpu'", "auto, cpu, cuda")),
        (("run", "sweep", "--preset", "smoke", "--data", "/no/such/data.bin"), ("/no/such/data.bin",)),
        (("run", "cell", "--ffn", "bogus"), ("axes.ffn", "'bogus'", "dense")),
        (("run", "cell", "--batch-size", "0"), ("train.batch_size", "positive integer", "0")),
        (("run", "cell", "--workload", "decode", "--context-len", "250", "--new-tokens", "32"), ("decode.context_lens", "250", "max_seq_len 256")),
        (("env", "--calibrate", "--precision", "fp64"), ("--precision", "'fp64'", "fp32")),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needles):
    assert_usage_error(dsbench_in_process(*args), *needles)


def test_bad_input_is_one_line_in_a_real_process():
    # the entry point a user runs: the error handling holds outside Typer's test runner too
    assert_usage_error(dsbench("run", "cell", "--ffn", "bogus"), "axes.ffn", "'bogus'", "dense")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda():
    assert_usage_error(dsbench_in_process("run", "sweep", "--preset", "smoke", "--device", "cuda"), "device", "cuda", "allowed here")


def test_bad_spec_file_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[train]\nsteps = "ten"\n')
    assert_usage_error(dsbench_in_process("run", "sweep", str(path)), "train.steps", "'ten'")
    path.write_text("name = = 1")
    assert_usage_error(dsbench_in_process("run", "sweep", str(path)), "not valid TOML")


def test_env_json():
    done = dsbench_in_process("env", "--json")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["environment"]["torch_version"] == torch.__version__


def test_presets_command_lists_every_preset():
    done = dsbench_in_process("presets")
    assert done.returncode == 0
    for name in ("smoke", "ci", "cpu-small", "medium-gpu", "large-gpu"):
        assert name in done.stdout


def test_every_user_error_is_one_type_the_cli_catches_and_stays_importable_where_it_was():
    import importlib

    from dsbench import errors

    homes = {"SpecError": "spec", "UsageError": "runner", "DataError": "data", "ResultsError": "results",
             "PolicyError": "check", "OfficialConfigError": "official", "AbError": "ab"}
    for name, module in homes.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError)
        assert getattr(importlib.import_module(f"dsbench.{module}"), name) is cls
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.UserError)}
    assert defined == set(homes) | {"UserError"}


def test_the_cli_turns_any_user_error_into_exit_2_and_lets_bugs_through():
    import typer

    from dsbench import cli, errors

    # OfficialConfigError was missing from the CLI's old list of error types; the base class covers it.
    with pytest.raises(typer.Exit) as exit_info, cli.user_errors():
        raise errors.OfficialConfigError("official config: unknown model 'gpt-5'; allowed: deepseek-v3")
    assert exit_info.value.exit_code == 2
    with pytest.raises(KeyError), cli.user_errors():  # not bad input: a bug keeps its traceback
        raise KeyError("ffn")


@pytest.mark.parametrize("args, names", [
    (["run", "sweep", "--preset", "smoke", "--bogus"], "--bogus"),
    (["run", "cell", "--steps", "x"], "--steps"),
    (["run", "cell", "--batch-size", "1.5"], "--batch-size"),
    (["run", "cell", "--steps"], "--steps"),
    (["report"], "RESULTS"),
    (["check", "--baseline"], "--baseline"),
    (["claims", "--nope"], "--nope"),
    (["profile", "--profile-steps", "many"], "--profile-steps"),
    (["ab", "--rounds", "two"], "--rounds"),
    (["presets", "extra"], "extra"),
    (["nosuchcommand"], "nosuchcommand"),
    (["run", "nosuch"], "nosuch"),
    (["claims", "--json", "--markdown"], "--json and --markdown: give one"),
])
def test_typers_own_usage_errors_are_one_line_exit_2(args, names):
    """Unknown flags, wrong types, missing values and arguments: one line naming them, exit 2,
    no boxed panel (issue 19, class 6)."""
    from typer.testing import CliRunner

    from dsbench.cli import app

    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.output
    assert "╭" not in result.output and "Traceback" not in result.output

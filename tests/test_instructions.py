"""The instruction-count gate: parsing, the difference method, the verdict, the CLI's refusals, one real count."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsbench import instructions as ins
from dsbench.cli import app
from dsbench.errors import AbError

CACHEGRIND_OUT = "desc: I1 cache: none\ncmd: python x.py\nevents: Ir\nfl=x.c\n1 5\nsummary: 12913514625\n"


def test_cachegrind_summary_is_the_count():
    assert ins.parse_cachegrind(CACHEGRIND_OUT) == 12913514625


def test_cachegrind_without_summary_is_one_line_error():
    with pytest.raises(AbError, match="no summary"):
        ins.parse_cachegrind("events: Ir\n")


def test_perf_counts_and_unsupported():
    assert ins.parse_perf("12345,,instructions:u,1000,100.00,,\n") == 12345
    assert ins.parse_perf("<not supported>,,instructions:u,0,100.00,,\n", strict=False) is None
    with pytest.raises(AbError, match="no counter"):
        ins.parse_perf("<not supported>,,instructions:u,0,100.00,,\n")


def test_difference_method_cancels_startup():
    startup, step = 10_000_000_000, 40_000_000
    assert ins.per_step(startup + 4 * step, startup + 8 * step, 4) == step


def test_difference_method_refuses_a_long_run_that_counted_less():
    with pytest.raises(AbError, match="did not run their steps"):
        ins.per_step(100, 90, 4)


@pytest.mark.parametrize("current,word,fails", [(1.0, "pass", False), (1.02, "pass", False), (1.10, "regression", True),
                                                (0.90, "faster", False)])
def test_verdict_against_threshold(current, word, fails):
    v = ins.Verdict(1.0, current, 0.03)
    assert (v.word, v.fails) == (word, fails)


def test_count_env_is_single_threaded_and_seeded():
    env = ins.count_env("/base-site")
    assert (env["OMP_NUM_THREADS"], env["PYTHONHASHSEED"], env["PYTHONPATH"]) == ("1", "0", "/base-site")
    assert "PYTHONPATH" not in ins.count_env(None)


def test_cli_refuses_unknown_metric_and_spec():
    runner = CliRunner()
    bad = runner.invoke(app, ["ab", "--metric", "cycles"])
    assert bad.exit_code == 2 and "--metric" in bad.output
    with_spec = runner.invoke(app, ["ab", "--metric", "instructions", "--preset", "ci-timing"])
    assert with_spec.exit_code == 2 and "no SPEC" in with_spec.output


def test_threshold_must_be_a_fraction():
    with pytest.raises(AbError, match="--threshold"):
        ins.check_threshold(3.0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_real_count_of_a_tiny_process(tmp_path: Path):
    import subprocess
    import sys

    out = tmp_path / "cg.out"
    cmd = ins.count_command("cachegrind", [sys.executable, "-S", "-c", "sum(range(1000))"], out)
    subprocess.run(cmd, check=True, capture_output=True, env=ins.count_env(None))
    assert ins.parse_cachegrind(out.read_text()) > 1_000_000


def test_wall_clock_interval_straddling_threshold_is_inconclusive():
    from dsbench.ab import inconclusive
    from dsbench.check import CheckResult, CheckRow, load_policy
    from dsbench.stats import compare_samples

    policy = load_policy()
    wide = compare_samples([1.0, 1.2, 0.9, 1.1, 1.0], [1.05, 1.25, 0.95, 1.0, 1.1]).describe()
    tight = compare_samples([1.0, 1.001, 0.999, 1.0, 1.0], [1.0, 1.0, 1.001, 0.999, 1.0]).describe()
    rows = [CheckRow("wide", "t", "timing (rank test)", "ok", note=wide), CheckRow("tight", "t", "timing (rank test)", "ok", note=tight)]
    assert inconclusive(CheckResult(Path("b"), Path("c"), policy, rows)) == ["wide"]

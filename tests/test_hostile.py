"""The hostile battery's findings (issue 31), one table per class: each row an input a hostile
user gives, the exit code, a word of the one line it must print, and what must (not) be left on
disk. In-process through Typer's CliRunner (no interpreter start-up) wherever that tests the same
thing; a subprocess only where the input is one (a sweep's own cell process, torchrun)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from dsbench import ab as ab_lib
from dsbench.cli import app
from fixture_results import make_cell, write_results

TINY_AB_SPEC = """
name = "tiny-ab"
device = "cpu"
[model]
size = "debug"
n_layers = 1
[axes]
workload = ["decode"]
[decode]
batch_size = 2
context_lens = [16]
new_tokens = 4
[measure]
warmup = 1
repeats = 4
calibrate = false
"""


def invoke(args: list[str]):
    done = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    progress = ("installing the base ", "round ")  # ab's progress lines, before its error
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(progress)]
    return done, lines


def assert_one_line(done, lines, code: int, words: str) -> None:
    assert done.exit_code == code, (done.exit_code, done.stdout, done.stderr, done.exception)
    assert done.exception is None or isinstance(done.exception, SystemExit), done.exception  # no traceback
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    for word in words.split(" | "):
        assert word in lines[0], lines[0]


@pytest.fixture
def place(tmp_path, monkeypatch):
    """tmp_path with a results folder (two ok cells), a file, a spec, and no dsbench temp folder yet."""
    write_results(tmp_path / "res", [make_cell(index=0), make_cell(workload="prefill", index=1)])
    (tmp_path / "afile").write_text("x")
    (tmp_path / "spec.toml").write_text(TINY_AB_SPEC)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_json(folder: Path, key: str, value) -> Path:
    info = json.loads((folder / "run.json").read_text())
    head, _, tail = key.partition(".")
    (info[head].__setitem__(tail, value) if tail else info.__setitem__(head, value))
    (folder / "run.json").write_text(json.dumps(info))
    return folder


# --- 1. tracebacks: each input is one line, exit 2 ---

TRACEBACKS = [
    (["baseline", "res", "--out", "afile"], "--out: 'afile' is a file"),
    (["baseline", "res", "--out", "afile/sub"], "--out: 'afile/sub' cannot be created: 'afile' is a file"),
    (["baseline", "res", "--out", "/proc/dsbench-x"], "--out: cannot create '/proc/dsbench-x'"),
    (["ab", "spec.toml", "--base", "HEAD", "--out", "afile"], "--out: 'afile' is a file"),
    (["ab", "spec.toml", "--base", "HEAD", "--out", "/proc/dsbench-x"], "--out: cannot create '/proc/dsbench-x'"),
    (["ab", "spec.toml", "--base", "HEAD", "--out", "afile/sub"], "'afile' is a file"),
]
BAD_RUN_JSON = [("spec", "a string"), ("spec", [1]), ("probe", "x"), ("environment", [1]), ("git", "x"),
                ("spec.axes", "x"), ("spec.model", [1])]


@pytest.mark.parametrize("args, words", TRACEBACKS)
def test_a_bad_out_is_one_line(place, args, words):
    assert_one_line(*invoke(args), 2, words)
    assert not Path("/proc/dsbench-x").exists() and not list((place / "tmp").iterdir())


@pytest.mark.parametrize("command", ["claims", "profile"])
@pytest.mark.parametrize("key, value", BAD_RUN_JSON)
def test_a_run_json_with_the_wrong_shape_is_one_line(place, command, key, value):
    _run_json(place / "res", key, value)
    args = ["claims", "res"] if command == "claims" else ["profile", "--results", "res", "--cell", "abc"]
    assert_one_line(*invoke(args), 2, f"run.json | {key} is {type(value).__name__} | where an ")


def test_a_base_side_that_cannot_run_is_one_line_naming_its_log(place, monkeypatch):
    """The root commit's package, or any whose sweep crashes before writing its tables: exit 1 of a
    traceback, no cells.parquet. One line with the log's last line and the log's path."""
    def broken_install(sha, root, work):
        site = work / "base-site"
        (site / "dsbench").mkdir(parents=True)
        (site / "dsbench" / "__init__.py").write_text("raise ImportError('the base cannot import this')\n")
        return site

    monkeypatch.setattr(ab_lib, "install_base", broken_install)
    done, lines = invoke(["ab", "spec.toml", "--base", "HEAD", "--out", "ab", "--rounds", "3"])
    log = place / "ab" / "base" / "round-00.log"
    assert_one_line(done, lines, 2, f"the base side | exit 1: ImportError: the base cannot import this | (log: {log})")
    assert log.is_file()  # the evidence stays


# The plug-in's own hooks at spec time (dsbench/spec/hooks.py part_hook), through the CLI.
HOOKS = [
    ("check_config", lambda cfg: cfg.width, 2, "ffn = switch (switch_plugin.SwitchFFN.check_config) raised AttributeError"),
    ("check_config", lambda cfg: 3, 2, "check_config) returned 3; it must return None or a str"),
    ("check_config", lambda cfg: "switch: needs four experts", 2, "error: switch: needs four experts"),
    ("param_count", lambda cfg, layer_idx=0: 1 / 0, 2, "param_count) raised ZeroDivisionError"),
    ("param_count", lambda cfg, layer_idx=0: "many", 2, "param_count) returned 'many'; it must return None or a int"),
    ("check_config", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt), 130,
     "interrupted (KeyboardInterrupt) in <genexpr> (test_hostile.py: | called from part_hook (hooks.py:"),
]


@pytest.fixture
def switch_plugin(tmp_path):
    from dsbench import metrics
    from dsbench.variants import registry

    saved = [(table, dict(table)) for table in (registry.FFN, metrics.METRICS)]
    sys.modules.pop("switch_plugin", None)
    registry.import_plugins(["switch_plugin"])
    spec = tmp_path / "switch.toml"
    spec.write_text('name = "s"\nplugins = ["switch_plugin"]\n[model]\nsize = "debug"\nn_layers = 1\n'
                    '[axes]\nffn = ["switch"]\nworkload = ["train"]\n')
    yield sys.modules["switch_plugin"], spec
    for table, before in saved:
        table.clear()
        table.update(before)
    sys.modules.pop("switch_plugin", None)


@pytest.mark.parametrize("hook, behaviour, code, words", HOOKS)
def test_a_plugin_hook_that_fails_is_one_line_naming_it(switch_plugin, monkeypatch, hook, behaviour, code, words):
    module, spec = switch_plugin
    monkeypatch.setattr(module.SwitchFFN, hook, staticmethod(behaviour))
    assert_one_line(*invoke(["run", "sweep", spec, "--dry-run"]), code, words)


# --- 4. refusals that leave files: a refused ab leaves neither its --out nor a temp folder ---

AB_REFUSALS = [
    (["--base", "no-such-ref"], "--base: 'no-such-ref' names no commit"),
    (["--rounds", "2"], "--rounds: 2 is too few"),
    (["--threads", "0"], "--threads: 0 is not allowed"),
    (["--preset", "no-such-preset"], "SPEC/--preset: give exactly one spec"),
    (["--spec-is", "missing.toml"], "SPEC: 'missing.toml' is not a file"),
    (["--spec-is", "bad.toml"], "axes.ffn: 'nope' is not available"),
    (["--spec-is", "afile"], "spec: afile is not valid TOML"),
]


@pytest.mark.parametrize("with_out", [True, False], ids=["--out", "temp"])
@pytest.mark.parametrize("extra, words", AB_REFUSALS)
def test_a_refused_ab_leaves_no_folder(place, extra, words, with_out):
    (place / "bad.toml").write_text('name = "x"\n[axes]\nffn = ["nope"]\n')
    spec = ["spec.toml"]
    if extra[0] == "--spec-is":
        spec, extra = [extra[1]], []
    elif extra[0] == "--preset":
        extra = [*extra]  # SPEC and --preset both given
    args = ["ab", *spec, "--base", "HEAD", *extra] + (["--out", "ab/new"] if with_out else [])
    assert_one_line(*invoke(args), 2, words)
    assert not (place / "ab").exists() and not list((place / "tmp").iterdir())


# --- 5. bad values taken: refused in one line ---


def test_a_baseline_of_a_run_with_a_failed_or_missing_cell_is_refused(place):
    failed = make_cell(workload="prefill", index=1, status="error", error="boom")
    write_results(place / "failed", [make_cell(index=0), failed])
    write_results(place / "short", [make_cell(index=0)])
    _run_json(place / "short", "n_cells", 2)
    rows = [(["baseline", "failed", "--out", "b1"], f"'failed' has 1 cell(s) not ok, first {failed['cell_id']}"),
            (["baseline", "short", "--out", "b2"], "'short' holds 1 of its 2 cells")]
    for args, words in rows:
        assert_one_line(*invoke(args), 2, words)
    assert not (place / "b1").exists() and not (place / "b2").exists()
    done, _ = invoke(["baseline", "res", "--out", "b3"])
    assert done.exit_code == 0 and (place / "b3" / "cells.parquet").is_file()


AB_VALUES = [
    (["--threads", "100000"], f"--threads: 100000 is not allowed; give a whole number from 1 to {ab_lib.usable_cores()}"),
    (["--rounds", "100000"], f"--rounds: 100000 is above the maximum {ab_lib.MAX_ROUNDS}"),  # 6. no bound
]


@pytest.mark.parametrize("extra, words", AB_VALUES)
def test_ab_values_beyond_the_machine_are_refused(place, extra, words):
    assert_one_line(*invoke(["ab", "spec.toml", "--base", "HEAD", "--out", "ab", *extra]), 2, words)
    assert not (place / "ab").exists()


# --- 2. the ep = 2 train cell at a few steps: rank 1 had no sample left ---
# Each rank's routed rows differ every step, so the kernel choice (kernels/choice.py, keyed on the
# rows bucket) meets shapes on one rank that the other never sees and times its candidates there:
# that step is no sample on that rank. Rank 1 could lose every timed step (statistics.median of
# nothing), while rank 0 kept the steps in which it waited at the all-to-all for rank 1's timing.
# Now the ranks agree: a step dropped on any rank is no sample on any (distributed.timed_samples).

def _timer(dropped: set[int], steps: int = 4):
    from dsbench.measure import StepTimer
    from dsbench.variants import profiling

    timer = StepTimer("cpu")
    with timer.step(record=False):  # warm-up: no ordinal
        profiling.note_untimed_work()
    for i in range(steps):
        with timer.step():
            if i in dropped:
                profiling.note_untimed_work()
    return timer


AGREED = [  # rank 0 dropped, rank 1 dropped → samples each rank keeps, or the one-line error
    ({1}, {0, 2}, 1, None),
    (set(), set(), 4, None),
    ({0}, {1, 2, 3}, 0, "no timed step left: each of the 4 timed steps of the train cell"),
    (set(), {0, 1, 2, 3}, 0, "pin the kernels"),  # the case: rank 1 lost them all
]


@pytest.mark.parametrize("drop0, drop1, kept, error", AGREED)
def test_ranks_time_the_same_steps(drop0, drop1, kept, error):
    from dsbench.distributed import agreed_samples

    timers = [_timer(drop0), _timer(drop1)]
    assert [t.dropped_steps for t in timers] == [sorted(drop0), sorted(drop1)]
    dropped = [t.dropped_steps for t in timers]
    for timer in timers:
        if error:
            with pytest.raises(RuntimeError, match=error) as e:
                agreed_samples(timer, dropped, "the train cell")
            assert "\n" not in str(e.value)
        else:
            assert len(agreed_samples(timer, dropped, "the train cell")) == kept



# --- 3. a --data file replaced while a sweep runs: the cells after the swap fail in one line ---

DATA_SWAPS = [  # what happens to the file after the sweep expanded its cells → the cell's error, or None
    ("kept", None),
    ("touched", None),  # same bytes, new mtime: the digest is of the contents
    ("replaced", r"changed while the sweep ran \(sha256 [0-9a-f]{12}… when it started"),
    ("removed", "changed while the sweep ran"),
]


@pytest.mark.parametrize("change, error", DATA_SWAPS)
def test_a_data_file_replaced_mid_sweep_fails_its_later_cells(tmp_path, change, error):
    import os

    from dsbench import spec as spec_lib
    from dsbench.errors import DataError
    from dsbench.worker import check_data_unchanged

    corpus = tmp_path / "c.txt"
    corpus.write_text("the first corpus. " * 200)
    spec = spec_lib.parse_spec({"name": "d", "data": str(corpus), "model": {"size": "debug", "n_layers": 1},
                                "axes": {"workload": ["prefill"]}, "prefill": {"batch_size": 1, "seq_lens": [16]}})
    cell = spec_lib.expand(spec, "cpu")[0]
    if change == "touched":
        os.utime(corpus, ns=(1, 1))
    elif change == "replaced":
        corpus.write_text("a second corpus, other words. " * 200)
    elif change == "removed":
        corpus.unlink()
    if error is None:
        check_data_unchanged(cell)
        return
    with pytest.raises(DataError, match=error) as e:
        check_data_unchanged(cell)
    assert "\n" not in str(e.value) and str(corpus) in str(e.value)


SLURM_WITHOUT_SLURM = [  # a Slurm job's flag on a local sweep was taken and ignored
    (["--partition", "gpu"], "--partition: 'gpu' is a Slurm job's setting, but the sweep runs with executor 'local'"),
    (["--mem-gb", "4"], "--mem-gb: 4.0 is a Slurm job's setting"),
    (["--sbatch", "qos=high"], "--sbatch: "),
    (["--executor", "local", "--array-parallelism", "8"], "add --executor slurm"),
]


@pytest.mark.parametrize("flags, words", SLURM_WITHOUT_SLURM)
def test_slurm_flags_without_slurm_are_refused(place, flags, words):
    assert_one_line(*invoke(["run", "sweep", "spec.toml", "--dry-run", *flags]), 2, words)


# --- 5. bad values taken: a set field no cell reads, inverted YaRN betas (issue 31) ---

UNREAD = [  # TOML lines of a spec over one debug layer → the words of its one line
    ('[model]\nmtp = 1\n[axes]\nworkload = ["decode"]',
     "model.mtp: 1 is set but no cell of this sweep reads it | read only by a train or speculative cell"),
    ('[train]\nmtp_lambda = 0.5\n[axes]\nworkload = ["train"]',
     "train.mtp_lambda: 0.5 is set but no cell | with model.mtp >= 1"),
    ('[attention]\nrope_factor = 40.0\n[axes]\nattention = ["mla"]',  # debug's max_seq_len is within original_seq_len
     "attention.rope_factor: 40.0 is set but no cell | model.max_seq_len > attention.original_seq_len"),
    ('[attention]\nrope_factor = 40.0\nbeta_fast = 1\nbeta_slow = 32\n[axes]\nattention = ["mla"]',
     "attention.beta_fast: 1 with attention.beta_slow 32 | YaRN needs beta_fast > beta_slow"),
    ('[attention]\nbeta_fast = 4\nbeta_slow = 4\n[axes]\nattention = ["dsa"]', "attention.beta_fast: 4 with attention.beta_slow 4"),
]


@pytest.mark.parametrize("lines, words", UNREAD)
def test_a_field_no_cell_reads_is_refused(tmp_path, lines, words):
    spec = tmp_path / "s.toml"
    head, _, rest = lines.partition("\n")
    model = 'size = "debug"\nn_layers = 1\n'
    text = f'name = "u"\n{head}\n{model}{rest}' if head == "[model]" else f'name = "u"\n[model]\n{model}{lines}'
    spec.write_text(text + "\n")
    assert_one_line(*invoke(["run", "sweep", spec, "--dry-run", "--out", tmp_path / "out"]), 2, words)
    assert not (tmp_path / "out").exists()


def test_a_field_read_by_another_point_is_taken(tmp_path):
    """mtp-cpu's shape: [train] mtp_lambda at the top, read by the model.mtp >= 1 points only."""
    spec = tmp_path / "s.toml"
    spec.write_text('name = "u"\n[model]\nsize = "debug"\nn_layers = 1\n[train]\nmtp_lambda = 0.5\nsteps = 4\n'
                    '[axes]\nworkload = ["train"]\n"model.mtp" = [0, 1]\n')
    done, _ = invoke(["run", "sweep", spec, "--dry-run", "--out", tmp_path / "out"])
    assert done.exit_code == 0, done.stderr

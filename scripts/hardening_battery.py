"""Hostile-input battery over issue 19's 8 classes: every input through the real CLI in its own
subprocess; per class: tried / clean (one line on stderr and exit 2, or the right rebuild or
outcome where that is the answer) / traceback / other, and the inputs that still fail.

    python scripts/hardening_battery.py [--jobs 3] [--quick]

The inputs are the table-driven tests' own lists (tests/test_spec.py BAD, test_spec_bounds,
test_terminal NASTY, test_results_corruption CASES, test_check's policies, test_cli's usage
errors, test_data's bad sources, test_report_plain_text's strings and baselines) plus the kill,
race and memory trials: 287 in all, --sample 24 a class by default (132; about 5 minutes on 2
busy cores, each CLI call starts torch). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests import their fixtures as top-level modules

CLASSES = {1: "user text as markup", 2: "unreadable results folders", 3: "output paths", 4: "signals and concurrency",
           5: "gate policy typos", 6: "bad input accepted (specs, flags, data)", 7: "memory pre-flight", 8: "data identity"}


@dataclass
class Trial:
    cls: int
    name: str
    args: list[str]
    expect: str = "refuse"  # refuse: exit 2, one stderr line; ok: exit in `codes`; custom: `judge`
    codes: tuple[int, ...] = (0,)
    env: dict = field(default_factory=dict)
    judge: object = None  # callable(done) -> bool, for expect == "custom"
    run: object = None  # callable() -> CompletedProcess, instead of the plain command
    timeout_s: float = 120


def dsbench(args, env=None, timeout_s=120, cwd=None):
    full_env = {**os.environ, "COLUMNS": "400", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsbench", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout_s, cwd=cwd)


def verdict(trial: Trial, done) -> str:
    output = done.stdout + done.stderr
    if "Traceback (most recent call last)" in output:
        return "traceback"
    if trial.expect == "refuse":
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return "clean" if done.returncode == 2 and len(lines) == 1 else "other"
    if trial.expect == "ok":
        return "clean" if done.returncode in trial.codes else "other"
    return "clean" if trial.judge(done) else "other"


def toml(raw: dict) -> str:
    """The spec dicts of the tests as TOML (scalars, lists, tables, arrays of tables)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(type(v))

    def key(k):
        return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)

    lines, tables = [], []
    for k, v in raw.items():
        if isinstance(v, dict):
            tables.append((k, v, False))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables += [(k, x, True) for x in v]
        else:
            lines.append(f"{key(k)} = {value(v)}")
    for name, body, array in tables:
        lines.append(f"[[{key(name)}]]" if array else f"[{key(name)}]")
        sub = {k: v for k, v in body.items() if isinstance(v, dict)}
        lines += [f"{key(k)} = {value(v)}" for k, v in body.items() if not isinstance(v, dict)]
        for k, v in sub.items():
            lines.append(f"{key(k)} = {{ " + ", ".join(f"{key(a)} = {value(b)}" for a, b in v.items()) + " }")
    return "\n".join(lines) + "\n"


def spec_file(tmp: Path, name: str, raw: dict) -> Path:
    path = tmp / "specs" / f"{abs(hash(name))}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(toml(raw))
    return path


# --- the trials of each class ---


def class_1(tmp: Path) -> list[Trial]:
    from tests.test_terminal import NASTY

    trials = []
    for text in NASTY:
        trials.append(Trial(1, f"spec name {text!r}", ["run", "sweep", str(spec_file(tmp, "n" + text, {"name": text})), "--dry-run"]))
        trials.append(Trial(1, f"--data {text!r}", ["run", "sweep", "--preset", "smoke", "--data", str(tmp / text)]))
        trials.append(Trial(1, f"check --baseline {text!r}", ["check", "--baseline", str(tmp / text), "--current", str(tmp / text)]))
    return trials


def class_2(tmp: Path) -> list[Trial]:
    from tests.fixture_results import ci_cells, write_results
    from tests.test_results_corruption import CASES, damaged

    good = write_results(tmp / "good", ci_cells())
    trials = []
    for i, (name, damage, fragments, rebuilt, _) in enumerate(CASES):
        folder = damaged(tmp / f"c2-{i}", damage, fragments)
        readers = {"report": ["report", str(folder), "--out", str(tmp / f"c2-{i}" / "rep")],
                   "check as baseline": ["check", "--baseline", str(folder), "--current", str(good)],
                   "check as current": ["check", "--baseline", str(good), "--current", str(folder)],
                   "claims": ["claims", str(folder)]}
        for reader, args in readers.items():
            expect = ("ok", (0, 1)) if rebuilt else ("refuse", (2,))
            trials.append(Trial(2, f"{name}: {reader}", args, expect=expect[0], codes=expect[1]))
    return trials


def class_3(tmp: Path) -> list[Trial]:
    from tests.fixture_results import ci_cells, write_results
    from tests.test_report_plain_text import BAD_BASELINES, HOSTILE

    a_file = tmp / "a-file"
    a_file.write_text("x")
    run = write_results(tmp / "c3-run", ci_cells())
    trials = [
        Trial(3, "--out is a file", ["run", "sweep", "--preset", "smoke", "--out", str(a_file)]),
        Trial(3, "--out inside a file", ["run", "sweep", "--preset", "smoke", "--out", str(a_file / "sub")]),
        Trial(3, "--out name too long", ["run", "sweep", "--preset", "smoke", "--out", str(tmp / ("x" * 300))]),
        Trial(3, "--out ''", ["run", "sweep", "--preset", "smoke", "--out", ""]),
        Trial(3, "--out /proc (unwritable)", ["run", "sweep", "--preset", "smoke", "--out", "/proc/dsbench-out"]),
        Trial(3, "report --out is a file", ["report", str(run), "--out", str(a_file)]),
        Trial(3, "report --out /proc", ["report", str(run), "--out", "/proc/dsbench-report"]),
    ]
    for name, make, _ in BAD_BASELINES:
        out = tmp / f"c3-rep-{abs(hash(name))}"
        baseline = _fresh(tmp, name, make)
        trials.append(Trial(3, f"report --baseline {name}: nothing written", ["report", str(run), "--out", str(out), "--baseline", str(baseline)],
                            expect="custom", judge=_refused_and_absent(out)))
    for i, text in enumerate(HOSTILE[:8]):
        hostile = write_results(tmp / f"c3-h{i}", ci_cells(), run_id=text)
        other = write_results(tmp / f"c3-o{i}", ci_cells(), run_id="other" + text)
        trials.append(Trial(3, f"report of run id {text!r}", ["report", str(hostile), str(other), "--out", str(tmp / f"c3-hr{i}")],
                            expect="ok", codes=(0,)))
    return trials


def _fresh(tmp: Path, name: str, make) -> Path:
    folder = tmp / f"c3-b-{abs(hash(name))}"
    folder.mkdir()
    return make(folder)


def _refused_and_absent(out: Path):
    def judge(done) -> bool:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return done.returncode == 2 and len(lines) == 1 and not out.exists()
    return judge


def class_4(tmp: Path) -> list[Trial]:
    spec = spec_file(tmp, "c4", {"name": "c4", "device": "cpu", "model": {"size": "debug"},
                                 "axes": {"workload": ["prefill"], "ffn": ["dense"], "attention": ["mha"], "precision": ["fp32"]},
                                 "prefill": {"batch_size": 2, "seq_lens": [16, 24, 32, 40, 48, 56]},
                                 "measure": {"warmup": 1, "repeats": 200}})

    def sigterm_mid_sweep():
        out = tmp / "c4-term"
        proc = subprocess.Popen([sys.executable, "-m", "dsbench", "run", "sweep", str(spec), "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not list((out / "cells").glob("*.json")):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        status = json.loads((out / "run.json").read_text()).get("status") if (out / "run.json").exists() else None
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr + f"\n[run.json status: {status}]")

    def resume_while_running():
        out = tmp / "c4-lock"
        first = subprocess.Popen([sys.executable, "-m", "dsbench", "run", "sweep", str(spec), "--out", str(out)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "run.json").exists():
            time.sleep(0.2)
        second = dsbench(["run", "sweep", str(spec), "--out", str(out), "--resume"])
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
        return second

    return [Trial(4, "SIGTERM mid-sweep: exit 143, run.json interrupted", [], expect="custom", run=sigterm_mid_sweep,
                  judge=lambda d: d.returncode == 143 and "[run.json status: interrupted]" in d.stderr),
            Trial(4, "a second --resume while the first runs: refused", [], run=resume_while_running)]


def class_5(tmp: Path) -> list[Trial]:
    from tests.fixture_results import ci_cells, write_results
    from tests.test_check import test_bad_policy_is_one_line as bad

    good = write_results(tmp / "c5-good", ci_cells())
    policies = next(m for m in bad.pytestmark if m.name == "parametrize").args[1]
    trials = []
    for i, (text, _) in enumerate(policies):
        path = tmp / f"c5-{i}.toml"
        path.write_text(text)
        trials.append(Trial(5, f"policy {text.strip()[:50]!r}", ["check", "--baseline", str(good), "--current", str(good), "--policy", str(path)]))
    return trials


def class_6(tmp: Path) -> list[Trial]:
    from tests import test_cli, test_spec, test_spec_bounds
    from tests.test_data import _bad_sources

    trials = [Trial(6, f"spec {name}", ["run", "sweep", str(spec_file(tmp, "s" + name, raw)), "--dry-run"]) for name, raw, _ in test_spec.BAD]
    bounds = next(m for m in test_spec_bounds.test_values_the_store_cannot_hold_or_that_repeat_are_one_line.pytestmark
                  if m.name == "parametrize").args[1]
    for raw, needle in bounds:
        trials.append(Trial(6, f"bound {needle[:50]}", ["run", "sweep", str(spec_file(tmp, "b" + needle, {"name": "b", "device": "cpu", **raw})), "--dry-run"]))
    faults = next(m for m in test_spec_bounds.test_fault_entries_the_worker_would_ignore_are_refused.pytestmark
                  if m.name == "parametrize").args[1]
    for value in faults:
        trials.append(Trial(6, f"DSBENCH_INJECT_FAULT={value}", ["run", "sweep", "--preset", "smoke", "--out", str(tmp / f"c6-f{abs(hash(value))}")],
                            env={"DSBENCH_INJECT_FAULT": value}))
    usage = next(m for m in test_cli.test_typers_own_usage_errors_are_one_line_exit_2.pytestmark if m.name == "parametrize").args[1]
    trials += [Trial(6, f"flags {' '.join(args)}", list(args)) for args, _ in usage]
    flags = next(m for m in test_cli.test_bad_input_is_one_line_and_exit_2.pytestmark if m.name == "parametrize").args[1]
    trials += [Trial(6, f"flags {' '.join(args)}", list(args)) for args, _ in flags]
    (tmp / "c6-data").mkdir()
    for name, path in _bad_sources(tmp / "c6-data").items():
        trials.append(Trial(6, f"data {name}", ["run", "sweep", "--preset", "smoke", "--data", str(path), "--out", str(tmp / f"c6-d-{name}")]))
    return trials


def class_7(tmp: Path) -> list[Trial]:
    def cell(**settings):
        return {"name": "mem", "device": "cpu", "model": {"size": settings.pop("size", "xl")},
                "axes": {"workload": [settings.pop("workload", "train")], "ffn": [settings.pop("ffn", "dense")],
                         "attention": ["mha"], "precision": [settings.pop("precision", "fp32")], "balance": ["bias"]},
                "measure": {"warmup": 1}, **settings}
    cases = {
        "xl train b1×t128": cell(train={"steps": 4, "batch_size": 1, "seq_len": 128}),
        "xl train bf16": cell(precision="bf16", train={"steps": 4, "batch_size": 1, "seq_len": 128}),
        "xl prefill fp32 b8×t8192": cell(workload="prefill", prefill={"batch_size": 8, "seq_lens": [8192]}),
        "xl decode bf16 b64×ctx16384": cell(workload="decode", precision="bf16", decode={"batch_size": 64, "context_lens": [16384], "new_tokens": 8}),
        "large moe train": cell(size="large", ffn="moe", train={"steps": 4, "batch_size": 8, "seq_len": 1024}),
        "medium train b256×t4096": cell(size="medium", train={"steps": 4, "batch_size": 256, "seq_len": 4096}),
    }
    trials = [Trial(7, f"{name} (--dry-run)", ["run", "sweep", str(spec_file(tmp, "m" + name, raw)), "--dry-run"]) for name, raw in cases.items()]
    trials.append(Trial(7, "run cell --size xl (refused before building)", ["run", "cell", "--size", "xl", "--device", "cpu", "--out", str(tmp / "c7-xl")],
                        timeout_s=60))
    trials.append(Trial(7, "xl train --dry-run --force: listed", ["run", "sweep", str(spec_file(tmp, "mforce", cases["xl train b1×t128"])),
                                                                  "--dry-run", "--force"], expect="ok"))
    return trials


def class_8(tmp: Path) -> list[Trial]:
    data = tmp / "c8-corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 4000)
    spec = spec_file(tmp, "c8", {"name": "c8", "device": "cpu", "model": {"size": "debug"}, "data": str(data),
                                 "axes": {"workload": ["prefill"], "ffn": ["dense"], "attention": ["mha"], "precision": ["fp32"]},
                                 "prefill": {"batch_size": 2, "seq_lens": [16]}, "measure": {"warmup": 1, "repeats": 2}})

    def changed_between_run_and_resume():
        out = tmp / "c8-run"
        first = dsbench(["run", "sweep", str(spec), "--out", str(out)])
        if first.returncode != 0:
            return first
        data.write_text("a different corpus of words entirely. " * 4000)
        return dsbench(["run", "sweep", str(spec), "--out", str(out), "--resume"])

    return [Trial(8, "data file changed before --resume: refused", [], run=changed_between_run_and_resume)]


def run_trial(trial: Trial) -> tuple[Trial, str, str]:
    try:
        done = trial.run() if trial.run is not None else dsbench(trial.args, trial.env, trial.timeout_s)
    except subprocess.TimeoutExpired:
        return trial, "other", "timed out"
    except Exception as e:  # noqa: BLE001 — a trial that could not be set up is reported, not raised
        return trial, "other", f"battery error: {type(e).__name__}: {e}"
    result = verdict(trial, done)
    tail = (done.stderr.strip().splitlines() or [""])[-1][:160]
    return trial, result, f"exit {done.returncode}: {tail}"


def sample(trials: list[Trial], n: int) -> list[Trial]:
    """n of the trials, evenly spread over the list (each list mixes kinds of input in order)."""
    if not n or len(trials) <= n:
        return trials
    return [trials[round(i * (len(trials) - 1) / (n - 1))] for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--classes", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--sample", type=int, default=24, help="at most this many inputs per class, evenly spread (0: all)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsbench-battery-") as folder:
        tmp = Path(folder)
        builders = {1: class_1, 2: class_2, 3: class_3, 4: class_4, 5: class_5, 6: class_6, 7: class_7, 8: class_8}
        trials = [t for c in map(int, args.classes.split(",")) for t in sample(builders[c](tmp), args.sample)]
        # the kill and race trials alone: their timing must not race the others'
        serial = [t for t in trials if t.run is not None]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(run_trial, [t for t in trials if t.run is None]))
        results += [run_trial(t) for t in serial]
    print(f"hardening battery: {len(results)} inputs ({'all' if not args.sample else f'at most {args.sample} a class'}) through "
          f"`python -m dsbench` subprocesses, {args.jobs} at a time, {time.perf_counter() - start:.0f} s\n")
    print("| class | tried | clean | traceback | other |")
    print("|---|---:|---:|---:|---:|")
    for c, title in CLASSES.items():
        mine = [r for t, r, _ in results if t.cls == c]
        if mine:
            print(f"| {c}. {title} | {len(mine)} | {mine.count('clean')} | {mine.count('traceback')} | {mine.count('other')} |")
    total = [r for _, r, _ in results]
    print(f"| all | {len(total)} | {total.count('clean')} | {total.count('traceback')} | {total.count('other')} |")
    failing = [(t, r, why) for t, r, why in results if r != "clean"]
    print(f"\n{len(failing)} inputs still fail" + (":" if failing else "."))
    for t, r, why in failing:
        print(f"- class {t.cls}, {t.name}: {r} ({why})")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B timing on one machine, in one run: this checkout against another commit, interleaved.

    outcome = run_ab("HEAD~1", spec_path, rounds=5, out="ab")      # or `dsbench ab --base HEAD~1`
    outcome.result.exit_code, print(outcome.markdown())

Timings transfer between machines badly (per-op latency, GEMM speed and bf16 support differ
between CPUs of one family), so a CI gate that holds on any machine measures both sides where it
runs: asv's `continuous` and tritonbench's A/B workflow. The base commit is exported with
`git archive` and installed beside this one (`pip install --no-deps --target`, a second copy of
the package with the same dependencies); each round runs the same spec once with each side,
each sweep a fresh process per cell, in alternating order (A B, B A, …) so drift and
neighbours hit both alike. The rounds of a side become the processes of its cells, and
`dsbench check`'s samples rule (a rank test over the processes, dsbench/stats.py) decides.
A side failing the rule runs `rounds` more rounds and is decided on all of them (a burst of
noise does not repeat, a regression does).

Only timing and peak memory are compared here: exact quantities and seeded losses do not
depend on the machine and are checked against the committed baseline (`dsbench check`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from dsbench.check import CheckResult, Policy, check, load_policy, md_escape
from dsbench.contention import usable_cores
from dsbench.folders import new_folder

MAX_ROUNDS = 50  # a side's processes per cell: 5 resolve about ±7% on a noisy VM, 50 about ±2%
AB_METRICS = ("peak_mem_bytes",)  # besides timing: what depends on the code and this machine only
SIDES = ("base", "current")


from dsbench.errors import AbError  # noqa: E402,F401 (kept importable from here)


@dataclass
class Side:
    name: str  # base | current
    sha: str | None
    pythonpath: str | None  # where the base's copy of the package lies; None: this checkout

    def env(self, threads: int) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["OMP_NUM_THREADS"] = str(threads)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env


@dataclass
class AbOutcome:
    out: Path
    result: CheckResult
    base: Side
    current: Side
    rounds: int
    confirmed: bool  # more rounds were run because the first ones failed
    wall_s: float
    rounds_log: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        unsure = inconclusive(self.result)
        word = "FAIL" if self.result.exit_code else ("INCONCLUSIVE" if unsure else "PASS")
        head = [f"## dsbench ab: {word}", "",
                f"base `{md_escape(self.base.sha)}` · current `{md_escape(self.current.sha)}` · {self.rounds} rounds, "
                f"interleaved (A B, B A, …), one process per cell and round"
                + (" · the first rounds failed, so more were run and all are counted" if self.confirmed else "")
                + f" · {self.wall_s:.0f} s", ""]
        if unsure:  # not a failure, but not a pass either: the interval reaches past the threshold
            head += [f"Inconclusive: {', '.join(unsure)}: the interval straddles the threshold, so these rounds can neither "
                     "pass nor fail the change; the instruction counts (`--metric instructions`) decide compute and copies.", ""]
        body = self.result.markdown().split("\n", 2)[2]  # the check's own title replaced by this one
        return "\n".join(head) + body


INTERVAL = re.compile(r"\[([0-9.]+), ([0-9.]+)\]")  # stats.SampleComparison.describe()'s "[low, high]"


def inconclusive(result: CheckResult) -> list[str]:
    """Timing rows that passed although their interval reaches above the threshold."""
    limit = result.policy.timing.samples_threshold
    cells = []
    for row in result.rows:
        match = INTERVAL.search(row.note or "") if row.rule == "timing (rank test)" and row.verdict == "ok" else None
        if match and float(match.group(1)) <= limit < float(match.group(2)):
            cells.append(row.cell)
    return cells


# --- the two sides ---


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise AbError(f"git {' '.join(args)}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
    return done.stdout.strip()


def repo_root() -> Path:
    here = Path(__file__).resolve().parent
    try:
        return Path(git("rev-parse", "--show-toplevel", cwd=here))
    except AbError:
        raise AbError("--base: this dsbench is not a git checkout, so there is no commit to compare with; "
                      "run from a clone (pip install -e .)") from None


def resolve_ref(ref: str, root: Path) -> str:
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=root)
    except AbError:
        raise AbError(f"--base: {ref!r} names no commit of {root}; give a sha, a branch, a tag or HEAD~N") from None


def install_base(sha: str, root: Path, work: Path) -> Path:
    """Export the commit and install its package (no dependencies: this environment's) into work/base-site."""
    src, site = work / "base-src", work / "base-site"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(site, ignore_errors=True)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", sha], capture_output=True, cwd=root)
    if archive.returncode != 0:
        raise AbError(f"--base: git archive {sha[:12]} failed: {archive.stderr.decode(errors='replace').strip()[-300:]}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(src)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise AbError(f"--base: installing {sha[:12]} failed: {last_line(done.stderr)}")
    return site


def last_line(text: str) -> str:
    """The last line of a log that says something: a traceback's error line, pip's last complaint."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def spec_file(spec: Path | None, preset: str | None, work: Path) -> Path:
    """The one spec both sides run: a copy of SPEC, or of this checkout's preset file."""
    path = work / "spec.toml"
    path.write_text(spec_text(spec, preset))
    return path


def spec_text(spec: Path | None, preset: str | None) -> str:
    """SPEC's text, or this checkout's preset file's; refused in one line before any folder exists."""
    if (spec is None) == (preset is None):
        raise AbError("SPEC/--preset: give exactly one spec to run on both sides")
    if preset is not None:
        source = resources.files("dsbench.presets").joinpath(f"{preset}.toml")
        if not source.is_file():
            raise AbError(f"--preset: {preset!r} is not a shipped preset; see `dsbench presets`")
        text = source.read_text()
    else:
        if not spec.is_file():
            raise AbError(f"SPEC: {str(spec)!r} is not a file")
        try:
            text = spec.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise AbError(f"SPEC: {str(spec)!r} cannot be read ({type(e).__name__}); give a TOML file") from None
    return text


# --- rounds ---


def sweep(side: Side, spec: Path, out: Path, threads: int, log: Path) -> dict:
    """One sweep of the spec with one side; the cwd is neutral so neither side imports the other's source."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "dsbench", "run", "sweep", str(spec), "--out", str(out)],
                              stdout=f, stderr=subprocess.STDOUT, env=side.env(threads), cwd=out.parent)
    # 1: some cell failed, recorded as such (the check reports it); but a sweep that crashed before
    # writing its tables (the base's package cannot run this spec, an import fails) also exits 1
    if done.returncode not in (0, 1) or not (out / "cells.parquet").is_file():
        raise AbError(f"the {side.name} side ({side.sha and side.sha[:12]}) could not run {spec.name}: exit {done.returncode}: "
                      f"{last_line(log.read_text(errors='replace'))} (log: {log})")
    return {"side": side.name, "out": str(out), "exit": done.returncode, "wall_s": time.perf_counter() - start,
            "loadavg_1m": os.getloadavg()[0]}


def run_rounds(sides: tuple[Side, Side], spec: Path, work: Path, first: int, count: int, threads: int, say) -> list[dict]:
    log = []
    for i in range(first, first + count):
        order = sides if i % 2 == 0 else sides[::-1]  # A B, B A, …: a linear drift hits both alike
        for side in order:
            folder = work / side.name
            folder.mkdir(parents=True, exist_ok=True)
            entry = sweep(side, spec, folder / f"round-{i:02d}", threads, folder / f"round-{i:02d}.log")
            log.append({"round": i, **entry})
            say(f"round {i + 1}: {side.name} {entry['wall_s']:.0f} s (load {entry['loadavg_1m']:.2f})")
    return log


def combine(rounds: list[Path], out: Path, side: Side) -> Path:
    """The rounds of one side as one results folder: round i is replicate i of every cell."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cells, series = [], []
    for i, folder in enumerate(rounds):
        c, s = pd.read_parquet(folder / "cells.parquet"), pd.read_parquet(folder / "series.parquet")
        ids = {cid: f"{cid}-r{i}" for cid in c["cell_id"]}
        c = c.assign(cell_id=c["cell_id"].map(ids), replicate=i, ab_round=i,
                     label=c["label"].str.replace(r" #\d+$", "", regex=True) + (f" #{i}" if i else ""))
        cells.append(c)
        series.append(s.assign(cell_id=s["cell_id"].map(ids)))
    pd.concat(cells, ignore_index=True).to_parquet(out / "cells.parquet", index=False)
    pd.concat(series, ignore_index=True).to_parquet(out / "series.parquet", index=False)
    info = json.loads((rounds[0] / "run.json").read_text())
    info.update(run_id=f"{side.name}-{(side.sha or 'worktree')[:12]}", git={"sha": side.sha, "dirty": None},
                ab={"side": side.name, "rounds": [str(r) for r in rounds]})
    (out / "run.json").write_text(json.dumps(info, indent=1, default=str))
    return out


def ab_policy(policy: Policy) -> Policy:
    """Timing and AB_METRICS only; the samples rule applies once each side has min_processes rounds."""
    return dataclasses.replace(policy, metrics={k: v for k, v in policy.metrics.items() if k in AB_METRICS})


def run_ab(base: str, spec: Path | None = None, preset: str | None = None, rounds: int = 5, out: str | Path | None = None,
           policy: Policy | None = None, threads: int = 1, confirm: bool = True, say=print) -> AbOutcome:
    """Measure `spec` with the base commit and with this checkout, interleaved; check current against base.
    Every input is checked before the work folder exists; a refusal leaves no folder behind."""
    policy = ab_policy(policy or load_policy())
    check_rounds(rounds, policy)
    check_threads(threads)
    start = time.perf_counter()
    root = repo_root()
    sha = resolve_ref(base, root)
    text = spec_text(spec, preset)
    _spec_runs_here(spec, preset)
    current = Side("current", _current_sha(root), None)
    with new_folder(out, "--out", prefix="dsbench-ab-") as folder:
        work = folder.path
        spec_path = work / "spec.toml"
        spec_path.write_text(text)
        say(f"installing the base {sha[:12]} beside the current {current.sha and current.sha[:12]} …")
        base_side = Side("base", sha, str(install_base(sha, root, work)))
        folder.keep()  # from here on the folder holds the rounds' logs and results
    sides = (base_side, current)
    log = run_rounds(sides, spec_path, work, 0, rounds, threads, say)
    result = _decide(sides, work, policy, rounds)
    confirmed = False
    if confirm and any(r.fails and r.rule.startswith("timing") for r in result.rows):
        say(f"a timing regression after {rounds} rounds: running {rounds} more to confirm it")
        log += run_rounds(sides, spec_path, work, rounds, rounds, threads, say)
        result, confirmed, rounds = _decide(sides, work, policy, 2 * rounds), True, 2 * rounds
    outcome = AbOutcome(work, result, base_side, current, rounds, confirmed, time.perf_counter() - start, log)
    (work / "ab.json").write_text(json.dumps({"base": sha, "current": current.sha, "rounds": rounds, "confirmed": confirmed,
                                              "threads": threads, "log": log, "check": result.to_json()}, indent=1, default=str))
    (work / "summary.md").write_text(outcome.markdown())
    return outcome


def _spec_runs_here(spec: Path | None, preset: str | None) -> None:
    """The spec parsed by this checkout before any folder exists: a bad spec is refused in one line
    here, not found out by the base side's first sweep."""
    from dsbench import spec as spec_lib  # on use: it loads the variants

    spec_lib.load_spec_file(spec) if spec is not None else spec_lib.load_preset(preset)


def check_rounds(rounds: int, policy: Policy) -> None:
    if rounds < policy.timing.min_processes:
        raise AbError(f"--rounds: {rounds} is too few; the samples rule needs ≥ {policy.timing.min_processes} processes a side "
                      "(policy timing.min_processes)")
    if rounds > MAX_ROUNDS:
        raise AbError(f"--rounds: {rounds} is above the maximum {MAX_ROUNDS} (each round runs the spec once per side, and a "
                      f"confirmation doubles the rounds); give {policy.timing.min_processes}–{MAX_ROUNDS}")


def check_threads(threads: int) -> None:
    cores = usable_cores()
    if not 1 <= threads <= cores:
        raise AbError(f"--threads: {threads} is not allowed; give a whole number from 1 to {cores}, the cores this machine "
                      "lets dsbench use (more threads than cores time the scheduler, not the code)")


def _decide(sides: tuple[Side, Side], work: Path, policy: Policy, rounds: int) -> CheckResult:
    folders = {s.name: combine([work / s.name / f"round-{i:02d}" for i in range(rounds)], work / f"{s.name}-all", s) for s in sides}
    return check(folders["base"], folders["current"], policy)


def _current_sha(root: Path) -> str:
    sha = git("rev-parse", "HEAD", cwd=root)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=root).stdout.strip()
    return sha + ("+dirty" if dirty else "")

"""Instruction counts per step: the CI gate's deterministic signal beside the wall clock.

    outcome = run_instructions_ab("HEAD~1", out="ab-instr")   # or `dsbench ab --metric instructions`
    outcome.exit_code, print(outcome.markdown())

On a shared VM one process's step time differs from the next's by 5–21% with identical code, so
a wall-clock A/B resolves only about ±7%. The number of user-space instructions a step retires
does not depend on the neighbours: cachegrind (`--cache-sim=no`, the cheapest Ir count) where
valgrind is installed, `perf stat -e instructions:u` where the machine exposes the counter;
chosen at run time.

**The difference method.** Valgrind's client requests cannot be issued from Python, so the
timed region cannot be bracketed. Each side instead runs the same tiny cells twice, in two
processes: once with N timed steps and once with 2N. Import, model build, warm-up and exit are
the same in both, so (count(2N) − count(N)) / N is the per-step count with startup cancelled,
without a same-process baseline to keep in step with the code. It sees what a step executes:
extra compute and extra copies; not a sleep, not a lost thread, not a memory-bound slowdown
(the wall-clock A/B stays for those).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dsbench.contention import NO_SAMPLER_ENV
from dsbench.errors import AbError

STEPS = 4  # the short process runs N steps, the long one 2N; both share everything else
# The verdict's threshold: the measured spread of clean per-step counts (same code, this VM) is
# given in docs/ci-gate.md (3.7% across three counts, one under heavy load); the threshold sits above it, below a 10% slowdown.
THRESHOLD = 0.06
TOOLS = ("cachegrind", "perf")

# The cells counted: the ci-timing preset's workloads (read from it: CELLS_TOML's {workloads}),
# fp32, at a size valgrind runs in seconds (it is ~50× slower than the CPU). Keep to keys an
# older dsbench parses.
CELLS_TOML = """\
name = "ci-instructions"
description = "the instruction-count gate's cells: tiny dense/MHA fp32 train, prefill and decode"
device = "cpu"
seed = 0

[model]
size = "debug"

[axes]
workload = {workloads}
ffn = ["dense"]
attention = ["mha"]
precision = ["fp32"]

[train]
steps = {train_steps}
batch_size = 2
seq_len = 32
lr = 3e-3
eval_batches = 0

[prefill]
batch_size = 2
seq_lens = [32]

[decode]
batch_size = 2
context_lens = [32]
new_tokens = 4

[measure]
warmup = 1
repeats = {steps}
timeout_s = 900
calibrate = false
"""

# Runs the spec's cells in this one process (no worker processes: valgrind counts this one).
# Written beside the work so the base commit's package runs it too, whether or not it has this module.
DRIVER = """\
import sys
from dsbench import spec as spec_lib
from dsbench.task import Runtime
from dsbench.worker import measure_cell
for cell in spec_lib.expand(spec_lib.load_spec_file(sys.argv[1]), "cpu"):
    measure_cell(cell, Runtime(threads=1))
"""


# --- counting ---


def available_tool() -> str | None:
    """cachegrind where valgrind is installed, else perf where the machine exposes the counter."""
    if shutil.which("valgrind"):
        return "cachegrind"
    if shutil.which("perf"):
        done = subprocess.run(["perf", "stat", "-x,", "-e", "instructions:u", "true"], capture_output=True, text=True)
        if done.returncode == 0 and parse_perf(done.stderr, strict=False) is not None:
            return "perf"
    return None


def count_command(tool: str, argv: list[str], out_file: Path) -> list[str]:
    if tool == "cachegrind":
        return ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out_file}", *argv]
    if tool == "perf":
        return ["perf", "stat", "-x,", "-e", "instructions:u", "-o", str(out_file), *argv]
    raise AbError(f"--metric instructions: unknown counter {tool!r}; one of {', '.join(TOOLS)}")


def parse_cachegrind(text: str) -> int:
    """The total Ir of a cachegrind out file (its `summary:` line; the first event is Ir)."""
    match = re.search(r"^summary:\s+(\d+)", text, re.MULTILINE)
    if match is None:
        raise AbError("cachegrind wrote no summary line: the counted process did not finish")
    return int(match.group(1))


def parse_perf(text: str, strict: bool = True) -> int | None:
    """instructions:u from `perf stat -x,` output; '<not supported>' (a VM without counters) is None or an error."""
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[2].startswith("instructions"):
            if fields[0].strip().isdigit():
                return int(fields[0])
            break
    if strict:
        raise AbError("perf stat counted no instructions:u (this machine exposes no counter); install valgrind")
    return None


def parse_count(tool: str, text: str) -> int:
    return parse_cachegrind(text) if tool == "cachegrind" else parse_perf(text)


def per_step(short: int, long: int, steps: int) -> float:
    """(count(2N) − count(N)) / N: what one more timed step adds, startup cancelled."""
    if long <= short:
        raise AbError(f"the 2N-step process counted {long} instructions, not more than the N-step one's {short}: "
                      "the cells did not run their steps")
    return (long - short) / steps


def count_env(pythonpath: str | None) -> dict:
    """One thread, a fixed hash seed: what makes two counts of the same code agree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env[NO_SAMPLER_ENV] = "1"  # a sampler thread's wake-ups grow with wall time, not with the code
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def gate_workloads() -> tuple[str, ...]:
    """The workloads the ci-timing preset times: the instruction gate counts the same ones."""
    from dsbench.spec import load_preset

    return tuple(load_preset("ci-timing").axes["workload"])


def count_process(tool: str, work: Path, steps: int, env: dict, tag: str) -> int:
    """Count one process running the cells with `steps` timed steps each."""
    spec = work / f"cells-{steps}.toml"
    spec.write_text(CELLS_TOML.format(steps=steps, train_steps=steps + 1, workloads=json.dumps(list(gate_workloads()))))
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    out_file, log = work / f"{tag}-{steps}.count", work / f"{tag}-{steps}.log"
    with open(log, "w") as f:
        done = subprocess.run(count_command(tool, [sys.executable, str(driver), str(spec)], out_file),
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=work)
    if done.returncode != 0 or not out_file.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise AbError(f"counting {tag} ({steps} steps) failed: exit {done.returncode}: {tail[0][:300]} (log: {log})")
    return parse_count(tool, out_file.read_text())


def count_side(tool: str, work: Path, pythonpath: str | None, tag: str, steps: int = STEPS) -> dict:
    """One side's per-step count: the N- and 2N-step processes, side by side on two cores."""
    work.mkdir(parents=True, exist_ok=True)
    env = count_env(pythonpath)
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        short, long = pool.map(lambda n: count_process(tool, work, n, env, tag), (steps, 2 * steps))
    return {"side": tag, "short": short, "long": long, "steps": steps, "per_step": per_step(short, long, steps),
            "wall_s": time.perf_counter() - start}


# --- the verdict ---


@dataclass
class Verdict:
    base: float
    current: float
    threshold: float

    @property
    def ratio(self) -> float:
        return self.current / self.base

    @property
    def fails(self) -> bool:
        return self.ratio > 1 + self.threshold

    @property
    def word(self) -> str:
        if self.fails:
            return "regression"
        return "faster" if self.ratio < 1 - self.threshold else "pass"


@dataclass
class InstructionsOutcome:
    out: Path
    verdict: Verdict
    sides: list[dict]
    tool: str
    base_sha: str
    current_sha: str
    wall_s: float

    @property
    def exit_code(self) -> int:
        return 1 if self.verdict.fails else 0

    def markdown(self) -> str:
        v = self.verdict
        return "\n".join([
            f"## dsbench ab --metric instructions: {'FAIL' if v.fails else 'PASS'}", "",
            f"base `{self.base_sha[:12]}` · current `{self.current_sha[:12]}` · {self.tool}, per timed step of the "
            f"tiny train, prefill and decode cells ((count(2N) − count(N)) / N, N = {self.sides[0]['steps']}) · {self.wall_s:.0f} s", "",
            "| side | instructions per step |", "|---|---|",
            *(f"| {s['side']} | {s['per_step']:,.0f} |" for s in self.sides), "",
            f"current ÷ base ×{v.ratio:.4f}: **{v.word}** (threshold ×{1 + v.threshold:.2f}). Instruction counts do not see "
            "a sleep, a lost thread or a memory-bound slowdown: the wall-clock A/B covers those.", ""])


def check_threshold(threshold: float) -> None:
    if not 0 < threshold < 1:
        raise AbError(f"--threshold: {threshold} is not a fraction between 0 and 1 (0.03 = fail above ×1.03)")


def run_instructions_ab(base: str, out: str | Path | None = None, threshold: float = THRESHOLD, say=print) -> InstructionsOutcome:
    """Count this checkout's and the base commit's instructions per step on this machine; fail above the threshold."""
    from dsbench import ab  # the same base install as the wall-clock A/B

    check_threshold(threshold)
    tool = available_tool()
    if tool is None:
        raise AbError("--metric instructions: neither valgrind nor a perf instructions counter is available here; "
                      "install valgrind (apt-get install valgrind) or use --metric time")
    root = ab.repo_root()
    sha = ab.resolve_ref(base, root)
    current_sha = ab._current_sha(root)
    start = time.perf_counter()
    from dsbench.folders import new_folder

    with new_folder(out, "--out", prefix="dsbench-ab-instr-") as folder:
        work = folder.path
        say(f"installing the base {sha[:12]} beside the current {current_sha[:12]} …")
        site = ab.install_base(sha, root, work)
        folder.keep()
    sides = []
    for tag, path in (("base", str(site)), ("current", None)):
        say(f"counting {tag} with {tool} …")
        sides.append(count_side(tool, work / tag, path, tag))
    verdict = Verdict(sides[0]["per_step"], sides[1]["per_step"], threshold)
    outcome = InstructionsOutcome(work, verdict, sides, tool, sha, current_sha, time.perf_counter() - start)
    (work / "instructions.json").write_text(json.dumps({"tool": tool, "base": sha, "current": current_sha, "sides": sides,
                                                         "threshold": threshold, "ratio": verdict.ratio,
                                                         "verdict": verdict.word}, indent=1))
    (work / "summary.md").write_text(outcome.markdown())
    return outcome

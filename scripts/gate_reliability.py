"""How far the CI gate can be trusted on this machine: false positives and sensitivity.

    python scripts/gate_reliability.py --baseline results/ci-baseline --runs 10 [--preset ci] [--work DIR] [--threads 1]

Runs the preset N times (each a fresh sweep with OMP_NUM_THREADS=1, as .ci/run does) and checks each run against the
baseline with the default policy: a run that fails is a false positive (nothing changed).
Then, on every run, plants a 25% slowdown in each cell whose timing is gated (one at a time;
the reference is timed against another cell, so it is not planted in) and a +2% change in the
train loss of one cell (scripts/plant_regression.py) and checks again: a planted change counts
as caught only when the check fails on that cell and metric. --recheck re-analyses the runs
already in --work. Prints the load average beside each run —
other processes sharing the CPU are the noise the gate has to live with.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plant_regression import plant  # noqa: E402

from dsbench.check import check, collapse_replicates, load_policy, speed_class  # noqa: E402
from dsbench.results import load_results  # noqa: E402


def gated_cells(run: Path, reference: str | None) -> list[str]:
    """Labels of the ok cells timed at the main threshold (not the reference, not numerics-only)."""
    cells = collapse_replicates(load_results(run).cells, "step_time_ms_p10")  # a label prefix plants in every replicate
    return [r["label"] for _, r in cells.iterrows() if r["status"] == "ok" and r["label"] != reference and speed_class(r) == "real"]


def sweep(i: int, args, out: Path) -> float:
    """Run the preset into out, single-threaded as .ci/run does; returns the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dsbench", "run", "sweep", "--preset", args.preset, "--out", str(out)],
                          capture_output=True, text=True, env=env)
    if done.returncode not in (0, 1):
        raise SystemExit(f"run {i}: the sweep exited {done.returncode}: {done.stderr[-500:]}")
    return time.perf_counter() - start


def caught(baseline: Path, planted: Path, label: str, metrics: tuple[str, ...]) -> bool:
    """The check fails on a row of the planted cell and metric (not merely somewhere)."""
    result = check(baseline, planted, load_policy())
    return any(r.fails and r.cell == label and r.metric in metrics for r in result.rows)


def one_run(i: int, args, work: Path) -> dict:
    out = work / f"run-{i:02d}"
    load = os.getloadavg()[0]
    wall = float("nan") if args.recheck else sweep(i, args, out)
    result = check(args.baseline, out, load_policy())
    failing = [f"{r.cell} {r.metric} {r.verdict} ×{r.change:.3f} (limit {r.limit})" if r.change else f"{r.cell} {r.metric} {r.verdict}"
               for r in result.failures]
    ratios = {r.cell: r.change for r in result.rows if r.rule == "timing" and r.verdict not in ("reference", "skipped")}
    slow = []
    for n, label in enumerate(gated_cells(out, result.reference)):
        planted = work / f"run-{i:02d}-slow-{n}"
        shutil.rmtree(planted, ignore_errors=True)
        plant(out, planted, slow=label, factor=1.25)
        slow.append(caught(args.baseline, planted, label, (load_policy().timing.metric,)))
    planted = work / f"run-{i:02d}-loss"
    shutil.rmtree(planted, ignore_errors=True)
    train = [label for label in collapse_replicates(load_results(out).ok(), "step_time_ms_p10")["label"] if label.startswith("train/")]
    plant(out, planted, loss=train[-1], loss_factor=1.02)  # one variant's loss (the last train cell)
    loss_caught = caught(args.baseline, planted, train[-1], ("final_loss", "eval_loss"))
    return {"run": i, "load": load, "wall_s": wall, "fails": bool(failing), "failing": failing, "machine": result.machine_factor,
            "ratios": ratios, "slow": (sum(slow), len(slow)), "loss": loss_caught}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=Path("results/ci-baseline"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--preset", default="ci")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the sweeps (.ci/run uses 1)")
    parser.add_argument("--recheck", action="store_true", help="re-check the runs already in --work; sweep nothing")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dsbench-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"baseline {args.baseline}, preset {args.preset}, {args.runs} runs into {work}, {os.cpu_count()} CPUs")
    rows = []
    for i in range(args.runs):
        r = one_run(i, args, work)
        rows.append(r)
        ratios = ", ".join(f"{k.split(' ')[0]}×{v:.2f}" for k, v in r["ratios"].items())
        print(f"run {i:2d}: load {r['load']:4.1f}, {r['wall_s']:5.1f} s, machine ×{r['machine']:.3f}, "
              f"{'FAIL' if r['fails'] else 'pass'}; planted slowdowns caught {r['slow'][0]}/{r['slow'][1]}, "
              f"loss change caught {'yes' if r['loss'] else 'NO'}; timing ratios: {ratios}", flush=True)
        for line in r["failing"]:
            print(f"        {line}")
    fp = sum(r["fails"] for r in rows)
    confirmed = sum(a["fails"] and b["fails"] for a, b in zip(rows, rows[1:]))
    caught = sum(r["slow"][0] for r in rows), sum(r["slow"][1] for r in rows)
    print(f"\nfalse positives: {fp}/{len(rows)} runs failed the check (goal 0)")
    print(f"  consecutive pairs both failing (what a confirming rerun would still fail): {confirmed}/{max(0, len(rows) - 1)}")
    print(f"sensitivity: 25% slowdowns caught {caught[0]}/{caught[1]}; +2% loss changes caught {sum(r['loss'] for r in rows)}/{len(rows)}")
    if not args.recheck:
        print(f"load average over the runs: {min(r['load'] for r in rows):.1f}–{max(r['load'] for r in rows):.1f} "
              f"on {os.cpu_count()} CPUs (other processes shared the machine when it exceeds ~1)")


if __name__ == "__main__":
    main()

"""How far the CI gate can be trusted on this machine: false positives and sensitivity.

    python scripts/gate_reliability.py --ab --runs 20 [--rounds 5] [--base HEAD] [--load 1] [--isa avx2] [--work DIR]
    python scripts/gate_reliability.py --baseline results/ci-baseline --runs 10 [--preset ci] [--work DIR] [--threads 1]

--ab (the gate .ci/run uses): each run is a whole `dsbench ab --preset ci-timing` against --base
(default HEAD: the same code on both sides, so a failing run is a false positive), confirmation
rounds included. Then, on each run's data, a slowdown of 10% and of 25% is planted in the
current side of each timed cell, one at a time, and checked again (the first --rounds rounds,
no confirmation: a real regression would fail the confirming rounds too). --load N runs N
CPU-burning processes beside the runs; --isa runs both sides under ATEN_CPU_CAPABILITY=ISA
(another host's kernels). Beside the rank test it prints what a bootstrap rule would have
decided on the same data (percentile interval of the ratio of medians, resampling processes).

Without --ab, the reference-cell mode against a stored baseline (the gate before the A/B):

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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plant_regression import plant  # noqa: E402

import numpy as np  # noqa: E402

from dsbench.ab import ab_policy, combine, run_ab  # noqa: E402
from dsbench.check import SAMPLES, _indexed, check, collapse_replicates, load_policy, speed_class  # noqa: E402
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


# --- the A/B mode ---


def bootstrap_fails(base: list[float], current: list[float], threshold: float, alpha: float, rng: np.random.Generator,
                    n: int = 2000) -> bool:
    """The alternative rule: the percentile interval (1 − 2·alpha) of median(current)/median(base),
    resampling processes with replacement, lies above 1 and the point ratio above threshold."""
    a, b = np.asarray(base), np.asarray(current)
    ratios = np.median(rng.choice(b, (n, b.size)), axis=1) / np.median(rng.choice(a, (n, a.size)), axis=1)
    return float(np.median(b) / np.median(a)) > threshold and float(np.quantile(ratios, alpha)) > 1.0


def ab_verdicts(base: Path, current: Path, policy, rng) -> dict[str, tuple[bool, bool, float]]:
    """Per timed cell: (rank test fails, bootstrap fails, Hodges–Lehmann ratio)."""
    result = check(base, current, policy)
    rows = {r.cell: r for r in result.rows if r.rule == "timing (rank test)" and r.verdict != "skipped"}
    b, c = _indexed(load_results(base), policy), _indexed(load_results(current), policy)
    return {k: (r.fails, bootstrap_fails(b.loc[k, SAMPLES], c.loc[k, SAMPLES], policy.timing.samples_threshold,
                                         policy.timing.alpha, rng), r.change) for k, r in rows.items()}


def one_ab_run(i: int, args, work: Path, policy, rng) -> dict:
    out = work / f"ab-{i:02d}"
    load = os.getloadavg()[0]
    if not args.recheck:
        shutil.rmtree(out, ignore_errors=True)
        outcome = run_ab(args.base, preset=args.preset, rounds=args.rounds, out=out, confirm=True, say=lambda line: None)
        wall, confirmed, fails = outcome.wall_s, outcome.confirmed, outcome.result.exit_code != 0
        contended = len(outcome.result.warnings)
    else:
        info = json.loads((out / "ab.json").read_text())
        wall, confirmed, fails, contended = float("nan"), info["confirmed"], info["check"]["exit_code"] != 0, len(info["check"]["warnings"])
    first = {s: combine([out / s / f"round-{r:02d}" for r in range(args.rounds)], out / f"{s}-first", _side(s)) for s in ("base", "current")}
    clean = ab_verdicts(first["base"], first["current"], policy, rng)
    planted = {}
    for factor in (1.10, 1.25):
        for n, label in enumerate(clean):
            dst = out / f"planted-{factor:.2f}-{n}"
            shutil.rmtree(dst, ignore_errors=True)
            plant(first["current"], dst, slow=label, factor=factor)
            verdict = ab_verdicts(first["base"], dst, policy, rng)[label]
            planted.setdefault(factor, []).append((verdict[0], verdict[1]))
    return {"run": i, "load": load, "wall_s": wall, "fails": fails, "confirmed": confirmed, "contended": contended,
            "first": clean, "planted": planted}


def _side(name: str):
    from dsbench.ab import Side

    return Side(name, None, None)


def main_ab(args) -> None:
    work = args.work or Path(tempfile.mkdtemp(prefix="dsbench-gate-ab-"))
    work.mkdir(parents=True, exist_ok=True)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    if args.isa:
        os.environ["ATEN_CPU_CAPABILITY"] = args.isa
    policy = ab_policy(load_policy())
    rng = np.random.default_rng(0)
    print(f"A/B gate: preset {args.preset}, base {args.base}, {args.rounds} rounds a side, {args.runs} runs into {work}; "
          f"{os.cpu_count()} CPUs, {args.load} CPU-burning neighbour(s), ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'default')}; "
          f"rule: HL ratio > ×{policy.timing.samples_threshold} and p ≤ {policy.timing.alpha}", flush=True)
    rows = []
    try:
        for i in range(args.runs):
            r = one_ab_run(i, args, work, policy, rng)
            rows.append(r)
            ratios = ", ".join(f"{k.split(' ')[0].split('/')[0]} ×{v[2]:.3f}{'!' if v[0] else ''}" for k, v in r["first"].items())
            caught = {f: sum(v[0] for v in vs) for f, vs in r["planted"].items()}
            print(f"run {i:2d}: load {r['load']:4.2f}, {r['wall_s']:5.0f} s, gate {'FAIL' if r['fails'] else 'pass'}"
                  f"{' (after confirming rounds)' if r['confirmed'] else ''}, {r['contended']} contended/noisy rows; "
                  f"first {args.rounds} rounds: {ratios}; planted caught: 10% {caught[1.10]}/{len(r['planted'][1.10])}, "
                  f"25% {caught[1.25]}/{len(r['planted'][1.25])}", flush=True)
    finally:
        for b in burners:
            b.kill()
    n = len(rows)
    print(f"\nfalse positives (whole gate, confirmation included): {sum(r['fails'] for r in rows)}/{n} runs (goal 0)")
    print(f"  before confirmation (first {args.rounds} rounds): rank test {sum(any(v[0] for v in r['first'].values()) for r in rows)}/{n}, "
          f"bootstrap {sum(any(v[1] for v in r['first'].values()) for r in rows)}/{n}")
    for factor, goal in ((1.10, "≥ 19/20"), (1.25, "20/20")):
        rank = [sum(v[0] for v in r["planted"][factor]) for r in rows]
        boot = [sum(v[1] for v in r["planted"][factor]) for r in rows]
        total = sum(len(r["planted"][factor]) for r in rows)
        print(f"planted {factor - 1:.0%} slowdowns caught: rank test {sum(rank)}/{total}, bootstrap {sum(boot)}/{total} (goal {goal} of runs)")
    ratios = np.array([v[2] for r in rows for v in r["first"].values()])
    print(f"clean Hodges–Lehmann ratios: p5 ×{np.quantile(ratios, 0.05):.3f}, median ×{np.median(ratios):.3f}, "
          f"p95 ×{np.quantile(ratios, 0.95):.3f}, max ×{ratios.max():.3f} over {ratios.size} cell comparisons")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=Path("results/ci-baseline"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--preset", default="ci")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the sweeps (.ci/run uses 1)")
    parser.add_argument("--recheck", action="store_true", help="re-check the runs already in --work; sweep nothing")
    parser.add_argument("--ab", action="store_true", help="the A/B gate (dsbench ab) instead of the stored-baseline mode")
    parser.add_argument("--base", default="HEAD", help="--ab: the commit the checkout is timed against (HEAD: the same code)")
    parser.add_argument("--rounds", type=int, default=5, help="--ab: rounds a side before any confirmation")
    parser.add_argument("--load", type=int, default=0, help="--ab: CPU-burning neighbour processes during the runs")
    parser.add_argument("--isa", default=None, help="--ab: ATEN_CPU_CAPABILITY for both sides (e.g. avx2)")
    args = parser.parse_args()
    if args.ab:
        args.preset = "ci-timing" if args.preset == "ci" else args.preset
        return main_ab(args)
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

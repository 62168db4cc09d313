"""Does the per-cell contention check see a neighbour that starts mid-cell (issue 31)?

Runs N small one-cell sweeps quiet and N with two CPU burners (`python -c "while True: pass"`)
started part-way through the cell's workload, and prints how many of each were marked
contended. The burners start `--at` of the way into the workload, timed from a quiet run's own
setup and workload times. "Quiet" is only as quiet as the machine: a run that warns because
of someone else's processes is a true positive.

    python scripts/contention_reliability.py --n 10
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

SPEC = """
name = "contention-reliability"
device = "cpu"
[model]
size = "debug"
n_layers = 1
[axes]
workload = ["train"]
[train]
steps = {steps}
batch_size = 4
seq_len = 64
eval_batches = 0
[measure]
warmup = 1
threads = 1
calibrate = false
"""
BURNER = "while True: pass"


def run_sweep(spec: Path, out: Path, burn_after_s: float | None) -> tuple[dict, float]:
    """One sweep in its own process; burners (two) started burn_after_s after it starts (the
    row's `burned`: whether they started before the sweep ended)."""
    start = time.perf_counter()
    sweep = subprocess.Popen([sys.executable, "-m", "dsbench", "run", "sweep", str(spec), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    burners = []
    try:
        if burn_after_s is not None:
            try:
                sweep.wait(timeout=burn_after_s)
            except subprocess.TimeoutExpired:
                burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(2)]
        sweep.wait()
    finally:
        for burner in burners:  # only the processes this script started, by their handles
            burner.kill()
            burner.wait()
    row = {**pd.read_parquet(out / "cells.parquet").iloc[0].to_dict(), "burned": bool(burners)}
    return row, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="sweeps of each kind")
    parser.add_argument("--steps", type=int, default=1000, help="train steps of the cell (its length)")
    parser.add_argument("--at", type=float, default=0.5, help="how far into the workload the burners start (0..1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsbench-contention-") as tmp:
        spec = Path(tmp) / "spec.toml"
        spec.write_text(SPEC.format(steps=args.steps))
        probe, total = run_sweep(spec, Path(tmp) / "probe", None)
        lead = total - probe["workload_wall_s"]  # start-up, setup, writing: before and after the workload
        delay = lead * 0.8 + args.at * probe["workload_wall_s"]  # most of the lead comes before the workload
        print(f"workload {probe['workload_wall_s']:.1f} s of {total:.1f} s; burners at {delay:.1f} s", flush=True)
        table = {}
        for kind, after in (("quiet", None), ("burners mid-cell", delay)):
            rows = [run_sweep(spec, Path(tmp) / f"{kind[0]}{i}", after)[0] for i in range(args.n)]
            table[kind] = rows
            for r in rows:
                print(f"  {kind}: burners ran={r['burned']} contended={bool(r['contended'])} share={r['cpu_share']:.2f} "
                      f"others={r['cpu_others_cores']:.2f} {r['contention'] or ''}", flush=True)
        print(f"\n| sweeps | n | warned |\n|---|---|---|")
        for kind, rows in table.items():
            print(f"| {kind} | {len(rows)} | {sum(bool(r['contended']) for r in rows)} |")


if __name__ == "__main__":
    main()

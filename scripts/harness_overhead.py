"""Where a sweep's wall time goes: measured work vs the harness around it.

    python scripts/harness_overhead.py RESULTS_DIR

Reads run.json and cells.parquet; prints the sweep's wall time, the sum of the cells' timed
steps (what the benchmark measures), their untimed work (warm-up, eval, data), and the cost of
starting each cell's process (interpreter + imports) and building its model and data.
"""

from __future__ import annotations

import sys

from dsbench.results import load_results


def main(path: str) -> None:
    res = load_results(path)
    cells, run = res.cells, res.run
    wall = run["sweep_wall_s"]
    measured = cells["measured_work_s"].sum()
    workload = cells["workload_wall_s"].sum()
    startup, setup, cell_wall = cells["worker_startup_s"], cells["setup_s"], cells["cell_wall_s"]
    print(f"run {run['run_id']}: {len(cells)} cells")
    print(f"sweep wall time                 {wall:8.2f} s")
    print(f"  device probe + calibration    {run.get('probe_s', float('nan')):8.2f} s")
    print(f"  sum of cell process lifetimes {cell_wall.sum():8.2f} s")
    print(f"    timed steps (measured work) {measured:8.2f} s  ({measured / wall:.0%} of the sweep)")
    print(f"    untimed workload (warm-up, eval, sync) {workload - measured:8.2f} s")
    print(f"    process start to ready      {startup.sum():8.2f} s  (per cell: median {startup.median():.2f} s, max {startup.max():.2f} s)")
    print(f"    data + model build          {setup.sum():8.2f} s  (per cell: median {setup.median():.2f} s)")
    other = cell_wall.sum() - workload - startup.sum() - setup.sum()
    print(f"    exit, result write, rest    {other:8.2f} s")
    print(f"  parent (spawn, fragments, progress) {wall - cell_wall.sum() - run.get('probe_s', 0):8.2f} s")


if __name__ == "__main__":
    main(sys.argv[1])

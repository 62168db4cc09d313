"""What a measurement competed with: the contention columns, their limits, the thread choice."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from dsbench import contention
from dsbench.contention import ContentionMeter, choose_threads, contention_reason, measurement_warnings

QUIET = {"cpu_share": 0.98, "cpu_others_cores": 0.1, "cpu_steal_fraction": 0.0}


def test_quiet_measurement_is_not_contended():
    assert contention_reason(QUIET, threads=1) is None


@pytest.mark.parametrize("change, words", [
    ({"cpu_share": 0.5}, "got 50% of a core with 1 thread(s) (limit 90%)"),
    ({"cpu_steal_fraction": 0.2}, "the hypervisor took 20% of the CPU time (steal; limit 5%)"),
])
def test_each_limit_names_its_reason(change, words):
    assert words in contention_reason({**QUIET, **change}, threads=1)


def test_two_threads_on_one_busy_core_are_not_starved():
    """Tiny ops leave a second thread idle: half the threads' time is one whole core."""
    assert contention_reason({**QUIET, "cpu_share": 0.5}, threads=2) is None
    assert "got 60% of a core with 2 thread(s)" in contention_reason({**QUIET, "cpu_share": 0.3}, threads=2)


def test_others_beyond_the_free_cores(monkeypatch):
    monkeypatch.setattr(contention, "usable_cores", lambda: 2)
    assert contention_reason({**QUIET, "cpu_others_cores": 1.0}, threads=1) is None  # one core free beside one thread
    assert "other processes kept 1.8 cores busy, 1 free" in contention_reason({**QUIET, "cpu_others_cores": 1.8}, threads=1)
    assert contention_reason({**QUIET, "cpu_others_cores": 1.0}, threads=2) is not None  # none free beside two threads


def test_meter_measures_a_busy_loop():
    with ContentionMeter(threads=1) as meter:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
    row = meter.columns()
    assert 0.3 < row["cpu_share"] <= 1.05  # a spinning thread gets its core unless the machine is very busy
    assert set(row) >= {"cpu_others_cores", "cpu_steal_fraction", "ctx_switches_involuntary_per_s", "loadavg_1m", "contended", "contention"}
    assert row["contended"] == (row["contention"] is not None)


def test_thread_choice_and_its_reason(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(2) == (2, "measure.threads")
    assert choose_threads(0) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(contention, "usable_cores", lambda: 4)
    monkeypatch.setattr(contention, "busy_cores_now", lambda: 1.2)
    assert choose_threads(0) == (3, "free cores: 3 of 4 (others kept 1.2 busy at the start)")
    monkeypatch.setattr(contention, "busy_cores_now", lambda: 7.0)
    assert choose_threads(0)[0] == 1  # never fewer than one


def test_warnings_name_contended_and_noisy_cells():
    cells = pd.DataFrame([
        {"label": "a", "status": "ok", "step_time_ms_p10": 10.0, "step_time_ms_p90": 11.0, "contended": False},
        {"label": "b", "status": "ok", "step_time_ms_p10": 10.0, "step_time_ms_p90": 30.0, "contended": False},
        {"label": "c", "status": "ok", "step_time_ms_p10": 10.0, "step_time_ms_p90": 11.0, "contended": True, "contention": "why"},
        {"label": "d", "status": "error", "step_time_ms_p10": None, "step_time_ms_p90": None, "contended": True},
    ])
    assert measurement_warnings(cells) == ["b: noisy, step-time p90/p10 = 3.00 (limit 2)", "c: contended (why)"]


def test_report_names_contended_cells(tmp_path):
    from fixture_results import ci_cells, write_results

    from dsbench.report import build_report

    cells = ci_cells()
    cells[0].update(contended=True, contention="got 41% of the CPU its 1 thread(s) asked for (limit 90%)")
    cells[2].update(step_time_ms_p90=cells[2]["step_time_ms_p10"] * 7.7)  # the smoke cell a busy machine gave
    out = build_report([write_results(tmp_path / "run", cells)], out=tmp_path / "report")
    md = (out / "index.md").read_text()
    assert "2 measurement(s) contended or noisy" in md
    assert "got 41% of the CPU" in md and "p90/p10 = 7.70 (limit 2)" in md


def test_a_left_out_span_leaves_every_column():
    """A compiled cell's compiling steps are left out (dsbench/compiled.py): the columns then
    describe the rest. Here the rest sleeps, so its CPU share is near 0 where the whole was ~½."""
    import time

    from dsbench.contention import ContentionMeter

    def spin(cpu_s: float) -> None:
        start = time.process_time()
        while time.process_time() - start < cpu_s:
            pass

    def measure(leave_out: bool) -> float:
        with ContentionMeter(1) as meter:
            before = meter.snapshot()
            spin(0.3)
            if leave_out:
                meter.leave_out(before, meter.snapshot())
            time.sleep(0.3)
        return meter.columns()["cpu_share"]

    assert measure(leave_out=False) > 0.3
    assert measure(leave_out=True) < 0.1


def _samples(per_step: list[tuple[float, float]], step_s: float = 0.5) -> list[tuple]:
    """Snapshots every step_s of a 1-thread cell: each step (own cores, others' cores) busy."""
    busy = own = 0.0
    out = [((0.0, 0.0, 0.0), (0.0, 0), 0.0)]
    for i, (mine, others) in enumerate(per_step, 1):
        own += mine * step_s
        busy += (mine + others) * step_s
        out.append(((busy, 0.0, 2 * i * step_s), (own, 0), i * step_s))
    return out


def test_a_neighbour_that_starts_mid_cell_is_seen(monkeypatch):
    """Quiet for 9 s, then two burners for the last second: the whole-cell average passes (others
    0.2 cores, share 0.97) but the last window fails the same rule."""
    monkeypatch.setattr(contention, "usable_cores", lambda: 2)
    quiet, burnt = (1.0, 0.0), (0.67, 1.33)
    samples = _samples([quiet] * 18 + [burnt] * 2)
    whole = {"cpu_share": samples[-1][1][0] / 10, "cpu_others_cores": (samples[-1][0][0] - samples[-1][1][0]) / 10,
             "cpu_steal_fraction": 0.0}
    assert contention_reason(whole, threads=1) is None
    reason = contention.window_reason(samples, threads=1)
    assert reason.startswith("in a 1.0 s window from t = 8.5 s: got 84% of a core"), reason  # half in the burn
    assert contention.window_reason(_samples([quiet] * 20), threads=1) is None


def test_a_window_in_a_left_out_span_is_not_judged(monkeypatch):
    monkeypatch.setattr(contention, "usable_cores", lambda: 2)
    samples = _samples([(1.0, 0.0)] * 4 + [(0.3, 1.7)] * 2 + [(1.0, 0.0)] * 4)
    assert contention.window_reason(samples, threads=1) is not None
    assert contention.window_reason(samples, threads=1, left_spans=[(2.0, 3.0)]) is None


def test_the_meter_samples_while_the_cell_runs():
    with ContentionMeter(1) as meter:
        time.sleep(3 * contention.SAMPLE_S)
    assert len(meter._samples) >= 3 and not meter._sampler.is_alive()


def test_the_instruction_gate_turns_the_sampler_off(monkeypatch):
    """Under valgrind a sampler's wake-ups would count with wall time: with the gate's variable set
    the meter keeps only its start and end snapshots, and still gives every column."""
    import time as time_lib

    from dsbench import contention, instructions

    assert instructions.count_env(None)[contention.NO_SAMPLER_ENV] == "1"
    monkeypatch.setenv(contention.NO_SAMPLER_ENV, "1")
    with contention.ContentionMeter(1) as meter:
        time_lib.sleep(3 * contention.SAMPLE_S)
    assert len(meter._samples) == 2
    assert "cpu_share" in meter.columns()
    monkeypatch.delenv(contention.NO_SAMPLER_ENV)
    with contention.ContentionMeter(1) as meter:
        deadline = time_lib.monotonic() + 60  # however loaded the machine, the sampler wakes in the end
        while len(meter._samples) < 2 and time_lib.monotonic() < deadline:
            time_lib.sleep(contention.SAMPLE_S)
    assert len(meter._samples) > 2  # start, at least one sample during the cell, end

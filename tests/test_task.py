"""The runner↔worker contract (dsbench/task.py): JSON round-trips, and strictness both ways."""

from __future__ import annotations

import json

import pytest

from dsbench import worker
from dsbench.spec import expand, load_preset
from dsbench.task import CellResult, CellTask, ProfileOptions, ProfileRequest, Runtime, TaskFormatError


@pytest.fixture(scope="module")
def cells():
    return expand(load_preset("ci"), "cpu")  # train, prefill and decode cells


def _task(cell, profile=True) -> CellTask:
    runtime = Runtime(peak_flops_per_s=1.5e12, peak_source="calibrated:mm", calibration={"copy_bytes_per_s": 2e10},
                      threads=2, spawn_time=1_700_000_000.25)
    return CellTask(cell, runtime, ProfileRequest("/tmp/run", ProfileOptions(steps=2, warmup=1)) if profile else None)


def test_task_round_trips_for_every_workload(cells):
    assert {c.axes["workload"] for c in cells} == {"train", "prefill", "decode"}
    for cell in cells:
        for profile in (True, False):
            task = _task(cell, profile)
            back = CellTask.from_json(task.to_json())
            assert back == task and back.cell.cell_id == cell.cell_id and back.cell.label() == cell.label()


def test_result_round_trips_with_nan_and_series():
    result = CellResult("ok", None, {"tokens_per_s_median": 12.5, "mfu": None, "final_loss": float("nan")},
                        [(0, "loss", 5.5, None, None, None), (3, "expert_load", 0.25, 1, 7, "code")])
    back = CellResult.from_json(result.to_json())
    assert back.series == result.series and back.status == "ok" and back.error is None
    assert back.row["tokens_per_s_median"] == 12.5 and back.row["mfu"] is None and back.row["final_loss"] != back.row["final_loss"]


@pytest.mark.parametrize("where, change, message", [
    ("task", lambda d: d.update(extra=1), "task.extra: unknown field; expected: cell, runtime, profile"),
    ("task", lambda d: d.pop("runtime"), "task.runtime: missing; expected: cell, runtime, profile"),
    ("runtime", lambda d: d["runtime"].pop("threads"), "task.runtime.threads: missing"),
    ("runtime", lambda d: d["runtime"].update(spawn="now"), "task.runtime.spawn: unknown field"),
    ("profile", lambda d: d["profile"]["options"].update(stpes=2), "task.profile.options.stpes: unknown field; expected: steps, warmup"),
    ("profile", lambda d: d["profile"].pop("root"), "task.profile.root: missing"),
    ("cell", lambda d: d["cell"].update(cell_id="000000000000"), "task.cell.cell_id: '000000000000' is not the id"),
])
def test_task_with_a_field_missing_or_unknown_is_refused_by_name(cells, where, change, message):
    d = json.loads(_task(cells[0]).to_json())
    change(d)
    with pytest.raises(TaskFormatError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        CellTask.from_json(json.dumps(d))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(rows=[]), "result.rows: unknown field; expected: status, error, row, series"),
    (lambda d: d.pop("series"), "result.series: missing"),
    (lambda d: d.update(status="fine"), "result.status: 'fine' is not one of ok, oom, error, timeout, diverged"),
    (lambda d: None, None),
])
def test_result_with_a_field_missing_or_unknown_is_refused_by_name(change, message):
    d = json.loads(CellResult("error", "RuntimeError: boom", {"cell_wall_s": 1.0}, []).to_json())
    change(d)
    if message is None:
        assert CellResult.from_json(json.dumps(d)).error == "RuntimeError: boom"
        return
    with pytest.raises(TaskFormatError, match="^" + message.replace(".", r"\.")):
        CellResult.from_json(json.dumps(d))


def test_worker_refuses_a_malformed_task_before_running_anything(cells, tmp_path):
    """The runner then records the worker's exit with this last log line (runner._death_status)."""
    d = json.loads(_task(cells[0], profile=False).to_json())
    d["runtime"]["gpu"] = 0
    task_path, result_path = tmp_path / "task.json", tmp_path / "result.json"
    task_path.write_text(json.dumps(d))
    with pytest.raises(TaskFormatError, match="task.runtime.gpu: unknown field"):
        worker.main([str(task_path), str(result_path)])
    assert not result_path.exists()

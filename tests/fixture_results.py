"""Results folders written directly (run.json + parquet), for report and check tests: every
status, emulated rows, MoE/MLA/FP8 metrics that a real sweep may not produce yet, in seconds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from dsbench.results import SCHEMA_VERSION

DOMAINS = ("words", "arith")
SPEED_NOTE = "bf16 on CPU: for numerics; its speed depends on the CPU's ISA and does not predict a GPU"


def make_cell(workload="train", ffn="dense", attention="mha", precision="fp32", balance="n/a", status="ok",
              batch_size=8, seq_len=128, context_len=None, new_tokens=None, index=0, **overrides) -> dict:
    """One cells.parquet row with plausible, predictable metrics (ratios between variants are fixed)."""
    axes = [workload, ffn, attention, precision] + ([balance] if balance != "n/a" else [])
    shape = f"b{batch_size}×" + (f"ctx{context_len}+{new_tokens}" if workload == "decode" else f"t{seq_len}")
    label = "/".join(axes) + " " + shape
    row = {
        "run_id": None, "cell_id": hashlib.sha256(label.encode()).hexdigest()[:12], "status": status, "error": None,
        "label": label, "workload": workload, "ffn": ffn, "attention": attention, "precision": precision, "balance": balance,
        "device": "cpu", "d_model": 64, "n_layers": 2, "batch_size": batch_size,
        "seq_len": None if workload == "decode" else seq_len, "context_len": context_len, "new_tokens": new_tokens,
        "steps": 20 if workload == "train" else None, "replicate": 0, "seed": 0, "cell_index": index,
    }
    if status != "ok":
        row["error"] = overrides.pop("error", f"{status} happened")
        row.update(overrides)
        return row
    speed = {"fp32": 1.0, "bf16": 0.8, "fp8": 0.5}.get(precision, 1.0) * (0.7 if ffn != "dense" else 1.0)
    tokens = batch_size * (1 if workload == "decode" else seq_len)
    step_ms = 10.0 / speed * (0.05 if workload == "decode" else 1.0)
    kv = {"mha": 1024, "mla": 256}.get(attention, 1024) // (2 if precision != "fp32" else 1)
    row.update({
        "params_total": 100_000 if ffn == "dense" else 400_000, "params_active": 100_000, "params_embedding": 16_384,
        "flops_per_token": 6e5, "flops_convention": "test", "kv_cache_bytes_per_token": kv, "tokens_per_step": tokens,
        "step_time_ms_median": step_ms, "step_time_ms_p10": 0.95 * step_ms, "step_time_ms_p90": 1.1 * step_ms,
        "step_time_ms_mean": step_ms, "step_time_n": 20,
        "tokens_per_s_median": tokens / step_ms * 1e3, "tokens_per_s_p10": tokens / (1.1 * step_ms) * 1e3,
        "tokens_per_s_p90": tokens / (0.95 * step_ms) * 1e3,
        "peak_mem_bytes": 300 * 2**20 if ffn == "dense" else 500 * 2**20, "mfu": 0.3 * speed,
        "emulated": precision == "fp8", "speed_note": SPEED_NOTE if precision == "bf16" else None,
        "final_loss": 2.0 + (0.01 if precision == "fp8" else 0) - (0.1 if ffn != "dense" else 0) if workload == "train" else None,
        "eval_loss": 2.1 if workload == "train" else None,
        "first_loss": 5.5 if workload == "train" else None,
        "maxvio_global": ({"aux": 0.25, "bias": 0.05}.get(balance)) if ffn != "dense" and workload == "train" else None,
        "kv_cache_bytes_per_token_measured": kv if workload != "train" else None,
    })
    row.update(overrides)
    return row


def make_series(cell: dict, steps: int = 20, n_layers: int = 2, n_experts: int = 8) -> list[dict]:
    """Series rows for one ok cell: step times; for train, loss; for routed train, MoE metrics."""
    if cell["status"] != "ok":
        return []
    rows = [dict(step=s, metric="step_time_ms", value=cell["step_time_ms_median"] * (1 + 0.01 * (s % 3))) for s in range(steps)]
    if cell["workload"] != "train":
        return rows
    offset = 0.01 if cell["precision"] == "fp8" else 0.0
    rows += [dict(step=s, metric="loss", value=5.5 * 0.9**s + 2.0 + offset) for s in range(steps)]
    if cell["ffn"] == "dense":
        return rows
    rows += [dict(step=s, metric="maxvio_batch", value=0.5 * 0.9**s + cell["maxvio_global"]) for s in range(steps)]
    for layer in range(n_layers):
        rows += [dict(step=s, metric="maxvio_batch", value=0.5 * 0.9**s, layer=layer) for s in range(steps)]
        rows += [dict(step=s, metric="expert_load", value=100 + 10 * ((e + s + layer) % 4), layer=layer, index=e)
                 for s in range(steps) for e in range(n_experts)]
        rows += [dict(step=-1, metric="routing_by_domain", value=(2.0 if e % len(DOMAINS) == d else 1.0) / (1.5 * n_experts),
                      layer=layer, index=e, domain=name) for d, name in enumerate(DOMAINS) for e in range(n_experts)]
    return rows


def write_results(path: Path, cells: list[dict], series: list[tuple[dict, list[dict]]] | None = None, name: str = "fixture",
                  axes: dict | None = None, schema_version: int = SCHEMA_VERSION, run_id: str | None = None) -> Path:
    """A results folder as `dsbench run sweep` leaves it (run.json, cells.parquet, series.parquet)."""
    path.mkdir(parents=True, exist_ok=True)
    run_id = run_id or path.name
    axes = axes or {a: list(dict.fromkeys(c[a] for c in cells)) for a in ("workload", "ffn", "attention", "precision", "balance")}
    info = {"schema_version": schema_version, "run_id": run_id, "name": name, "created_at": "2026-01-01T00:00:00+00:00",
            "status": "complete", "dsbench_version": "0.1.0", "spec_source": "fixture",
            "spec": {"name": name, "description": "fixture", "device": "cpu", "size": "debug", "model": {}, "axes": axes,
                     "train": {"steps": 20}, "measure": {"warmup": 1, "repeats": 20}},
            "git": {"sha": "0" * 40, "dirty": False},
            "environment": {"python_version": "3.11", "torch_version": "2.x", "cpu_model": "test CPU", "cpu_count_logical": 2}}
    (path / "run.json").write_text(json.dumps(info))
    frame = pd.DataFrame([{**c, "run_id": run_id} for c in cells])
    frame.to_parquet(path / "cells.parquet", index=False)
    records = []
    for cell in cells:
        for r in make_series(cell) if series is None else []:
            records.append({"run_id": run_id, "cell_id": cell["cell_id"], "layer": None, "index": None, "domain": None, **r})
    for cell, rows in series or []:
        records += [{"run_id": run_id, "cell_id": cell["cell_id"], "layer": None, "index": None, "domain": None, **r} for r in rows]
    columns = ["run_id", "cell_id", "step", "metric", "value", "layer", "index", "domain"]
    s = pd.DataFrame(records, columns=columns).astype({"step": "int64", "value": "float64", "layer": "Int64", "index": "Int64"})
    s.to_parquet(path / "series.parquet", index=False)
    return path


def rich_cells() -> list[dict]:
    """Many cells: train over ffn × attention × precision × balance, decode over two contexts,
    a prefill, and one cell of each failure status."""
    cells = []
    for ffn, balances in (("dense", ("n/a",)), ("deepseekmoe", ("aux", "bias"))):
        for attention in ("mha", "mla"):
            for precision in ("bf16", "fp8"):
                for balance in balances:
                    cells.append(make_cell("train", ffn, attention, precision, balance))
    for attention in ("mha", "mla"):
        for ctx in (128, 512):
            cells.append(make_cell("decode", "dense", attention, "bf16", batch_size=4, context_len=ctx, new_tokens=32))
    cells.append(make_cell("prefill", "dense", "mha", "bf16"))
    failures = {"oom": "OutOfMemoryError: CUDA out of memory", "error": "RuntimeError: <b>boom</b> & friends",
                "timeout": "exceeded measure.timeout_s = 60 s and was killed", "diverged": "Diverged: train loss is NaN at step 3"}
    for i, (status, message) in enumerate(failures.items()):
        cells.append(make_cell("prefill", "dense", "mha", "bf16", status=status, seq_len=256 * (i + 1), error=message))
    for i, c in enumerate(cells):
        c["cell_index"] = i
    return cells


def ci_cells() -> list[dict]:
    """Like the `ci` preset: fp32 (timed) and bf16 (numerics only) for each workload."""
    cells = []
    for workload in ("train", "prefill", "decode"):
        for precision in ("fp32", "bf16"):
            extra = {"batch_size": 4, "context_len": 128, "new_tokens": 32} if workload == "decode" else {}
            cells.append(make_cell(workload, precision=precision, **extra))
    for i, c in enumerate(cells):
        c["cell_index"] = i
    return cells

"""A Cell: one point of a sweep's matrix, its identity (the cell_id every result, baseline and
resume keys on), its label, and its JSON form for the worker process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from dsbench.schema import AXES, PART_SECTIONS
from dsbench.variants import registry
from dsbench.variants.config import ModelConfig
from dsbench.workloads import WORKLOADS



@dataclass(frozen=True)
class Cell:
    """One point of the matrix: a model config, one workload's settings, how it is measured."""

    axes: dict  # workload, ffn, attention, precision, balance ("n/a" where it does not apply), dotted axes
    model: ModelConfig
    workload: dict  # settings of this cell's workload only
    measure: dict  # warmup, repeats, and replicate ≥ 1 for extra replicates (timeout is not identity)
    seed: int
    data: str
    device: str
    plugins: tuple[str, ...] = ()  # imported before the config is rebuilt (not identity)
    parallel: dict = field(default_factory=dict)  # {"ep": R, …} for a cell over R processes; {} for one
    data_digest: str | None = None  # what a data file holds (data.data_digest); None for the built-in corpora

    @property
    def ep(self) -> int:
        return int(self.parallel.get("ep", 1))

    @property
    def cell_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def identity(self) -> dict:
        """What the cell runs. The rule: the five named axes, the model config (each part holds
        only the fields its variant reads), the workload's settings, warmup/repeats/replicate,
        seed, data (and a data file's content digest) and device, and the parallel settings of a multi-process cell (a one-process
        cell has none, so its id is what it was before they existed). Dotted axes are not
        identity (what they set is in the config or settings), so a cell has one id whichever
        sweep built it, and a new field, variant or setting changes no existing id unless
        existing cells read it."""
        axes = {k: v for k, v in self.axes.items() if k in AXES}
        identity = {"axes": axes, "model": self.model.to_dict(), "workload": self.workload,
                    "measure": self.measure, "seed": self.seed, "data": self.data, "device": self.device}
        if self.parallel:
            identity["parallel"] = self.parallel
        if self.data_digest is not None:  # a data file's contents, not only its path
            identity["data_digest"] = self.data_digest
        return identity

    def label(self) -> str:
        a = self.axes
        parts = [a["workload"], a["ffn"], a["attention"], a["precision"]]
        if a["balance"] != "n/a":
            parts.append(a["balance"])
        parts += [f"{k}={v}" for k, v in a.items() if k not in AXES and v != "n/a"]
        for key, value in self.parallel.items():  # what a dotted axis does not already show
            if f"parallel.{key}" not in a:
                parts.append(f"{key}={value}")
        shape = WORKLOADS[a["workload"]].shape_label(self.workload)
        replicate = self.measure.get("replicate", 0)
        return "/".join(parts) + " " + shape + (f" #{replicate}" if replicate else "")

    def to_json(self) -> str:
        return json.dumps({**self.identity(), "axes": self.axes, "plugins": list(self.plugins), "parallel": self.parallel,
                           "cell_id": self.cell_id})

    @staticmethod
    def from_json(text: str) -> Cell:
        d = json.loads(text)
        plugins = tuple(d.get("plugins", ()))
        registry.import_plugins(plugins)
        model = dict(d["model"])
        parts = {s: registry.part_config(s, model[s]["kind"], model.pop(s))[0] for s in PART_SECTIONS}
        cfg = ModelConfig(**model, **parts)
        return Cell(d["axes"], cfg, d["workload"], d["measure"], d["seed"], d["data"], d["device"], plugins, d.get("parallel", {}),
                    d.get("data_digest"))

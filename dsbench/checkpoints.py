"""Trained weights that later cells of a sweep reuse instead of training again.

A speculative cell needs a trained model (its MTP drafts are only as good as their training),
and every cell of a sweep runs in its own process. A cell that trains an MTP model saves its
final weights under the results folder's `weights/`, keyed by everything the weights depend on:
the model config, the training settings that change the weights (not eval_batches, not timing),
the number of steps, the seed and the data. A speculative cell with the same key loads them and
records that it did; one with none trains and saves. Writes are atomic (a temporary file, then
a rename), so a killed cell never leaves a half-written checkpoint that another cell would load.
Not identity: a loaded checkpoint is, bit for bit, the weights the same training produces.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

# The [train] settings the trained weights depend on (eval_batches and the measure section do not).
WEIGHT_SETTINGS = ("batch_size", "seq_len", "lr", "weight_decay", "beta1", "beta2", "grad_clip", "mtp_lambda")


class WeightCache:
    def __init__(self, folder: str | Path, seed: int, data: str):
        self.folder, self.seed, self.data = Path(folder), seed, data

    def key(self, model_config: dict, train_settings: dict, steps: int) -> str:
        described = {"model": model_config, "train": {k: train_settings.get(k) for k in WEIGHT_SETTINGS},
                     "steps": steps, "seed": self.seed, "data": self.data}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str, model: torch.nn.Module) -> dict | None:
        """Load the weights saved under key into model and return what was saved with them
        ({"final_loss": …}); None if there are none."""
        path = self.path(key)
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state"])
        return saved["info"]

    def save(self, key: str, model: torch.nn.Module, info: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "info": info}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

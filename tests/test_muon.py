"""train.optimizer = muon (dsbench/optimizers.py): which parameters Muon takes, one step against
torch's Muon and AdamW applied by hand to the same split, and the spec's refusal."""

from __future__ import annotations

import subprocess
import sys

import torch

from dsbench import optimizers
from dsbench.variants.config import config_from_size
from dsbench.variants.decoder import build_model

SETTINGS = {"optimizer": "muon", "lr": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95}


def test_muon_takes_the_hidden_matrices_only():
    model = build_model(config_from_size("debug", residual="mhc"))
    muon, adamw = optimizers.muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names, adamw_names = {names[id(p)] for p in muon}, {names[id(p)] for p in adamw}
    assert {"embed.weight", "head.weight"} <= adamw_names  # the ends stay with AdamW (V4 §2.4)
    assert all(p.dim() == 2 for p in muon) and all(p.dim() < 2 or names[id(p)] in ("embed.weight", "head.weight") for p in adamw)
    assert "blocks.0.attn_res.hc.fn" in muon_names and "blocks.0.attn_res.hc.base" in adamw_names
    assert any(n.endswith("norm.weight") for n in adamw_names)


def test_one_step_equals_torch_muon_and_adamw():
    torch.manual_seed(0)
    model = build_model(config_from_size("debug"))
    reference = build_model(config_from_size("debug"))
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 9))
    for m in (model, reference):
        m.forward_losses(tokens[:, :-1], tokens[:, 1:]).total().backward()
    optimizers.make_optimizer(model, SETTINGS).step()
    muon, rest = optimizers.muon_split(reference)
    torch.optim.Muon(muon, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
    decayed = [p for p in rest if p.dim() >= 2]
    torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                      lr=1e-2, betas=(0.9, 0.95)).step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_muon_holds_less_state_than_adamw():
    cfg = config_from_size("debug")
    share = optimizers.muon_share(cfg)
    assert 0 < share < 1
    assert optimizers.state_floats(SETTINGS, cfg, 1000) < optimizers.state_floats({"optimizer": "adamw"}, cfg, 1000)


def test_unknown_optimizer_refused_in_one_line(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "bad"\ndevice = "cpu"\n[model]\nsize = "debug"\n[train]\noptimizer = "sgd"\n')
    proc = subprocess.run([sys.executable, "-m", "dsbench", "run", "sweep", str(spec), "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "optimizer" in lines[0] and "sgd" in lines[0] and "adamw" in lines[0] and "muon" in lines[0]


def test_step_times_align_with_the_timed_steps():
    """Train rows carry each timed step's seconds at its step index, for loss at equal wall time."""
    from dsbench.workloads.train import _step_time_series

    rows = _step_time_series([0.5, 0.25], steps=5)  # 3 warm-up steps untimed
    assert [(r[0], r[2]) for r in rows] == [(3, 0.5), (4, 0.25)]
    assert all(r[1] == "step_time_s" for r in rows)

"""How the instruction-count gate responds to planted slowdowns, and how far clean counts spread.

    python scripts/instructions_reliability.py --clean 2 --kinds compute,copy,sleep --fractions 0.10,0.25 --work DIR

Each planted run installs this checkout's HEAD into DIR (as `dsbench ab` installs its base) and
appends a plant to the copy's dsbench/worker.py: every model the worker builds gets a forward
that, after the real one, does the extra work:
  compute: a matmul adding FRACTION of the forward's FLOPs (2 × params × tokens), ×3 in training
           (forward + backward);
  copy:    a clone of FRACTION of the parameters' bytes (×3 in training);
  sleep:   time.sleep(FRACTION × 1 ms) per forward;
  thread:  torch.set_num_threads(threads − 1) (a no-op at the gate's one thread).
The clean runs count the unpatched checkout. Each planted count is compared with every clean
count by dsbench.instructions.Verdict at its threshold; a clean pair failing is a false positive.
Prints one line per count and a table; writes DIR/counts.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

from dsbench import ab
from dsbench.instructions import THRESHOLD, Verdict, count_side

PLANT = '''

# --- planted by scripts/instructions_reliability.py ---
import math as _math
_plain_build_model = build_model
_PLANT_KIND, _PLANT_FRACTION = {kind!r}, {fraction!r}


def _plant(model, inputs):
    scale = _PLANT_FRACTION * (3 if model.training else 1)
    params = sum(p.numel() for p in model.parameters())
    if _PLANT_KIND == "compute":  # tokens x D @ D x K: 2·tokens·D·K FLOPs = scale · 2·params·tokens
        tokens, width = inputs.numel(), model.cfg.d_model
        k = max(1, _math.ceil(scale * params / width))
        torch.randn(tokens, width) @ torch.randn(width, k)
    elif _PLANT_KIND == "copy":
        torch.zeros(max(1, int(scale * params))).clone()
    elif _PLANT_KIND == "sleep":
        time.sleep(_PLANT_FRACTION * 1e-3)
    elif _PLANT_KIND == "thread":
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))


def build_model(cfg):
    model = _plain_build_model(cfg)
    forward = model.forward

    def planted(inputs, *args, **kwargs):
        out = forward(inputs, *args, **kwargs)
        _plant(model, inputs)
        return out

    model.forward = planted
    return model
'''


def planted_site(work: Path, kind: str, fraction: float) -> Path:
    root = ab.repo_root()
    site = ab.install_base(ab.resolve_ref("HEAD", root), root, work)
    worker = site / "dsbench" / "worker.py"
    worker.write_text(worker.read_text() + PLANT.format(kind=kind, fraction=fraction))
    return site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", type=int, default=2)
    parser.add_argument("--kinds", default="compute,copy,sleep")
    parser.add_argument("--fractions", default="0.10,0.25")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = open(args.work / "counts.jsonl", "a")
    clean, planted = [], []
    for i in range(args.clean):
        clean.append(_record(log, count_side("cachegrind", args.work / f"clean-{i}", None, "clean"), "clean", 0.0))
    for kind, fraction in itertools.product(args.kinds.split(","), map(float, args.fractions.split(","))):
        folder = args.work / f"{kind}-{fraction:g}"
        site = planted_site(folder, kind, fraction)
        planted.append(_record(log, count_side("cachegrind", folder / "count", str(site), kind), kind, fraction))
    report(clean, planted, args.threshold)


def _record(log, row: dict, kind: str, fraction: float) -> dict:
    row.update(kind=kind, fraction=fraction, loadavg_1m=os.getloadavg()[0])
    log.write(json.dumps(row) + "\n")
    log.flush()
    print(f"{kind} {fraction:.0%}: {row['per_step']:,.0f} instructions/step ({row['wall_s']:.0f} s, load {row['loadavg_1m']:.2f})", flush=True)
    return row


def report(clean: list[dict], planted: list[dict], threshold: float) -> None:
    steps = [c["per_step"] for c in clean]
    if len(steps) > 1:
        print(f"clean spread: max/min ×{max(steps) / min(steps):.4f} over {len(steps)} counts; threshold ×{1 + threshold:.2f}")
    pairs = [Verdict(a, b, threshold) for a, b in itertools.permutations(steps, 2)]
    print(f"clean pairs failed: {sum(v.fails for v in pairs)}/{len(pairs)}")
    print("| planted | fraction | ratio to clean (min–max) | caught |\n|---|---|---|---|")
    for p in planted:
        verdicts = [Verdict(c, p["per_step"], threshold) for c in steps]
        ratios = [v.ratio for v in verdicts]
        print(f"| {p['kind']} | {p['fraction']:.0%} | ×{min(ratios):.4f}–×{max(ratios):.4f} | {sum(v.fails for v in verdicts)}/{len(verdicts)} |")


if __name__ == "__main__":
    main()

"""`python -m dsbench.probe DEVICE PRECISIONS CALIBRATE`: the device facts a sweep records.

Runs in its own process (see runner.py) and prints JSON: the environment, and for each
precision the calibration and the peak FLOP/s that MFU is taken against.
"""

from __future__ import annotations

import json
import sys

import torch

from dsbench.hardware import calibrate, environment, peak_flops_per_s, with_best_known
from dsbench.variants.precision import precision_of


def probe(device: str, precisions: list[str], do_calibrate: bool, budget_s: float = 3.0) -> dict:
    peaks = {}
    for name in precisions:
        precision = precision_of(name)
        # The arithmetic that runs: autocast dtype in training, the inference dtype otherwise.
        dtype = precision.autocast_dtype or precision.inference_dtype
        # FP8 GEMMs are no torch.mm in the autocast dtype: a calibration of that dtype would never
        # apply to the "fp8" peak (peak_flops_per_s refuses it), so none is measured.
        measurable = precision.fp8_recipe is None
        calibration = calibrate(torch.device(device), dtype, budget_s) if do_calibrate and measurable else None
        calibration = with_best_known(calibration) if calibration else None  # the best ceiling this machine has shown
        peak, source = peak_flops_per_s(device, precision.peak_key, calibration)
        peaks[name] = {"peak_flops_per_s": peak, "peak_source": source, "calibration": calibration}
    return {"environment": environment(), "device": device, "peaks": peaks}


def main(argv: list[str]) -> int:
    device, precisions, do_calibrate = argv
    print(json.dumps(probe(device, precisions.split(","), do_calibrate == "1")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

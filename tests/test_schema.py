"""dsbench/schema.py: the names every layer spells once, importable without torch."""

from __future__ import annotations

import subprocess
import sys

from dsbench import schema


def test_schema_metrics_results_and_check_import_without_torch():
    """A finder that refuses torch: the schema and the torch-free modules that read it still import."""
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import dsbench.schema, dsbench.metrics, dsbench.results, dsbench.check\n"
            "assert dsbench.metrics.metric_of('ffn.n_experts').group == 'axis'\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_model_keys_are_the_model_fields_no_axis_sets():
    from dsbench.spec import AXIS_FIELDS
    from dsbench.variants.config import MODEL_FIELDS

    assert schema.MODEL_KEYS == ("size", *(f for f in MODEL_FIELDS if ("model", f) not in AXIS_FIELDS))


def test_axes_are_the_registries_axes():
    from dsbench.spec import available_axis_values

    assert set(available_axis_values()) == set(schema.AXES)
    assert set(available_axis_values()["workload"]) == {"train", "prefill", "decode", "speculative"}
    assert schema.PART_SECTIONS == ("attention", "ffn")

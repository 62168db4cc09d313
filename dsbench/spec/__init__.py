"""Sweep specs: TOML (or a shipped preset) → validated SweepSpec → the matrix of Cells.

Every rejection is a `SpecError` whose message is one line naming the key, the bad value and
what is allowed; the CLI prints it and exits 2 before anything runs.

One module per job, the public names re-exported here (`from dsbench.spec import X`):
- load.py: a TOML file or a preset → parse_spec
- sweep.py: SweepSpec; `[[sweep]]` blocks and dotted-key points, each validated as a plain spec
- sections.py: the harness's sections ([measure], [parallel]), the registered workloads' sections, the keys
- checks.py: each key against its field, then the combinations a point's cells make
- parallel.py: [parallel] and the expert-parallel checks
- expand.py: a SweepSpec → its Cells, and the model config each builds
"""

from __future__ import annotations

from dsbench.cell import Cell  # noqa: F401 (importable from here)
from dsbench.errors import SpecError  # noqa: F401
from dsbench.schema import AXES, DOTTED_MEASURE_KEYS, MODEL_KEYS, PART_SECTIONS  # noqa: F401
from dsbench.validate import (as_table, check_choice, check_float, check_int, check_section, check_str,  # noqa: F401
                              check_value, reject_unknown)
from dsbench.workloads import WORKLOADS, DecodeSettings, PrefillSettings, SpeculativeSettings, TrainSettings, max_batch  # noqa: F401

from .checks import dotted_field_exists  # noqa: F401
from .expand import MAX_CELLS, base_config, cell_configs, expand, kernel_families, kernel_plan, part_configs  # noqa: F401
from .load import load_preset, load_spec_file, preset_names  # noqa: F401
from .parallel import PARALLEL_WORKLOADS, ParallelSettings, parallel_applies, parallel_of  # noqa: F401
from .sections import (AXIS_FIELDS, DEFAULT_AXES, DEVICES, SECTIONS, SPEC_VERSION, MeasureSettings,  # noqa: F401
                       available_axis_values, default_axes, dotted_sections, sweep_keys, top_keys,
                       workload_sections)
from .sweep import SweepSpec, parse_spec  # noqa: F401

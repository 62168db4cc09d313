"""The names a spec, a cell, a results table and a report spell the same way, in one place.

Torch-free on purpose: dsbench.metrics, dsbench.results and dsbench.check import it in processes
that never build a model (tests/test_schema.py holds it so). The workloads' own sections are not
here: each workload registers its section (dsbench/workloads/), and `dotted_sections()` lists them
where they are known.
"""

from __future__ import annotations

AXES = ("workload", "ffn", "attention", "precision", "balance")  # the named axes, in expansion order
PART_SECTIONS = ("attention", "ffn")  # the model's parts, each a variant with its own config
# The [model] keys a spec may set: a named size, then the model-wide fields of variants/config.py's
# MODEL_FIELDS that no axis sets (tests/test_schema.py holds the two equal).
MODEL_KEYS = ("size", "d_model", "n_layers", "vocab_size", "max_seq_len", "norm_eps", "tie_embeddings", "init_std", "mtp",
              "residual", "hc_mult", "hc_sinkhorn_iters")
RUN_SECTIONS = ("measure", "parallel")  # the harness's own sections beside the workloads'
# The registered workloads' sections, in registration order: dsbench.workloads.register appends
# each (so a torch-free reader sees them once the workloads are imported, and no list spells them).
WORKLOAD_SECTIONS: list[str] = []
KERNELS_SECTION = "kernels"  # [kernels] op family = implementation
# The [measure] keys that change what a cell runs, so can be swept; the rest say only how it is timed.
DOTTED_MEASURE_KEYS = ("compile",)


def dotted_sections(workloads) -> tuple[str, ...]:
    """Sections whose fields can be swept as dotted-key axes ("ffn.n_experts" = [8, 64]), in the
    order errors list them; `workloads`: the registered workloads' names."""
    return ("model", *PART_SECTIONS, *workloads, *RUN_SECTIONS, KERNELS_SECTION)

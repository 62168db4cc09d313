"""Reports people read: results folders → reports/<run>/{index.html, index.md, figures/*.png, tables/*.csv}.

    build_report(["results/cpu-small"])                        # → reports/cpu-small
    build_report(["results/a", "results/b"], out="reports/ab", baseline="results/ci-baseline")

index.html is self-contained (figures inline as data: URIs; opens from disk); index.md is for
GitHub and CI job summaries and links figures/. Sections: environment and spec, failures, the
cells, the ablation view (for each axis, B ÷ A of every main metric with all else fixed),
multi-token prediction (when some cell has MTP), the comparison with a baseline (dsbench.check),
and the figures.

The package, one module per part: data (ReportData, prepare, formatting), ablation (B ÷ A over
dsbench.pairing's pairs), figures (the registry and the per-cell figures), comparisons (KV vs
context, FP8 − BF16 gap, B ÷ A vs model size), heatmaps (routing), profiles, mtp (multi-token
prediction: loss by depth, speculative decoding; only when the results hold MTP cells), sections,
render (HTML and Markdown) and build (build_report).

Figures come from a registry: each FigureDef names the cells columns and series metrics it
needs and is skipped when a run does not have them, so a new metric needs only a new entry.
Speed figures grey and label emulated rows (FP8 without FP8 tensor cores) and hatch rows with a
speed_note (bf16 on a CPU). All user-supplied text is escaped in the HTML and the Markdown.
"""

# Importing the figure modules registers their figures, in this order (each workload's own report
# module after the routing heatmaps).
import importlib

from dsbench.report import comparisons, heatmaps  # noqa: F401
from dsbench.workloads import report_sections

for _section in report_sections():
    importlib.import_module(_section.partition(":")[0])
from dsbench.report import profiles  # noqa: F401, E402
from dsbench.report.ablation import ablation, ablation_summary
from dsbench.report.build import build_report
from dsbench.report.data import ReportData, prepare
from dsbench.report.figures import FIGURES, FigureDef, figure, render_figures
from dsbench.report.render import Section, render_html, render_md

__all__ = ["FIGURES", "FigureDef", "ReportData", "Section", "ablation", "ablation_summary", "build_report", "figure",
           "prepare", "render_figures", "render_html", "render_md"]


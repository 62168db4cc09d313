"""build_report: results folders → reports/<run>/{index.html, index.md, figures/*.png, tables/*.csv}."""

from __future__ import annotations

from pathlib import Path

from dsbench.check import load_checked
from dsbench.report.compiled import compiled_section
from dsbench.report.data import prepare, safe_name
from dsbench.report.first_screen import cards_section
from dsbench.report.mtp import mtp_section
from dsbench.report.profiles import profiles_section
from dsbench.report.render import render_html, render_md
from dsbench.report.sections import (ablation_section, baseline_section, cells_section, claims_section, failures_section,
                                     figures_section, overview_section)
from dsbench.results import Results, ResultsError


def build_report(results: list, out: str | Path | None = None, baseline: str | Path | None = None) -> Path:
    """Render one or more results folders (paths or Results) into `out` (default reports/<run>); returns out."""
    if not results:
        raise ResultsError("report: pass at least one results folder")
    runs = [r if isinstance(r, Results) else load_checked(r, "report") for r in results]
    data = prepare(runs)
    out = Path(out) if out else Path("reports") / safe_name("+".join(data.keys))
    figures_dir, tables_dir = out / "figures", out / "tables"
    for d in (figures_dir, tables_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in [*d.glob("*.png"), *d.glob("*.csv")]:  # a re-render leaves no stale figure behind
            old.unlink()
    # First the cards (every comparison's answer), then the figures; the rest below, collapsed.
    sections = [cards_section(data, figures_dir, tables_dir), figures_section(data, figures_dir)]
    if baseline is not None:
        sections.append(baseline_section(data, Path(baseline), tables_dir))
    claims = claims_section(runs, tables_dir)  # only when the runs hold evidence for an empirical claim
    details = [cells_section(data, tables_dir), ablation_section(data, tables_dir)]
    details.append(compiled_section(data, tables_dir))  # only when some cell ran under torch.compile
    details.append(mtp_section(data, tables_dir))  # only when some cell trained with MTP or decoded speculatively
    details.append(profiles_section(data, out, tables_dir))  # only when cells were profiled
    details += [failures_section(data, tables_dir), overview_section(data, tables_dir)]
    for s in details:
        if s is not None:
            s.collapsed = True
    sections += [s for s in (claims, *details) if s is not None]
    title = f"dsbench report: {', '.join(data.keys)}"
    (out / "index.html").write_text(render_html(title, sections), encoding="utf-8")
    (out / "index.md").write_text(render_md(title, sections, out), encoding="utf-8")
    return out

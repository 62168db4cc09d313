"""build_report: results folders → reports/<run>/{index.html, index.md, figures/*.png, tables/*.csv}."""

from __future__ import annotations

from pathlib import Path

from dsbench.check import load_checked
from dsbench.report.data import prepare, safe_name
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
    sections = [overview_section(data, tables_dir), failures_section(data, tables_dir), cells_section(data, tables_dir),
                ablation_section(data, tables_dir)]
    mtp = mtp_section(data, tables_dir)  # only when some cell trained with MTP or decoded speculatively
    if mtp is not None:
        sections.append(mtp)
    if baseline is not None:
        sections.append(baseline_section(data, Path(baseline), tables_dir))
    claims = claims_section(runs, tables_dir)  # only when the runs hold evidence for an empirical claim
    if claims is not None:
        sections.append(claims)
    profiles = profiles_section(data, out, tables_dir)  # only when cells were profiled
    if profiles is not None:
        sections.append(profiles)
    sections.append(figures_section(data, figures_dir))
    title = f"dsbench report: {', '.join(data.keys)}"
    (out / "index.html").write_text(render_html(title, sections), encoding="utf-8")
    (out / "index.md").write_text(render_md(title, sections, out), encoding="utf-8")
    return out

"""build_report: results folders → reports/<run>/{index.html, index.md, figures/*.png, tables/*.csv}."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from pathlib import Path

from dsbench.check import check, load_checked
from dsbench.errors import UsageError
from dsbench.report.compiled import compiled_section
from dsbench.report.light import light_section
from dsbench.report.data import prepare, safe_name
from dsbench.report.first_screen import cards_section
from dsbench.report.profiles import profiles_section
from dsbench.report.render import render_html, render_md
from dsbench.report.stamp import generator, write_generator
from dsbench.report.sections import (ablation_section, baseline_section, cells_section, claims_section, failures_section,
                                     figures_section, overview_section)
from dsbench.results import Results, ResultsError
from dsbench.workloads import report_sections


def build_report(results: list, out: str | Path | None = None, baseline: str | Path | None = None) -> Path:
    """Render one or more results folders (paths or Results) into `out` (default reports/<run>); returns out.

    Every input is read and checked first (the baseline too), then the report is drawn in a
    temporary sibling of `out` and moved into place: a bad input or a failed drawing writes nothing.
    """
    if not results:
        raise ResultsError("report: pass at least one results folder")
    runs = [r if isinstance(r, Results) else load_checked(r, "report") for r in results]
    checks = None if baseline is None else [check(Path(baseline), run.path) for run in runs]  # --baseline: one line, exit 2
    data = prepare(runs)
    out = Path(out) if out else Path("reports") / safe_name("+".join(data.keys))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {str(out)!r} is a file; give a folder for the report")
    made = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name[:40]}.", dir=out.parent))
    except OSError as e:
        _remove_empty(made)
        raise UsageError(f"--out: cannot write a report in {str(out)!r} ({e.strerror or type(e).__name__}); choose a writable folder") from None
    try:
        _render(data, runs, work, checks, baseline)  # a sibling: relative links from it hold for out
        _move_into(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        _remove_empty(made)
        raise
    return out


def workload_sections(data, tables_dir: Path) -> list:
    """The sections registered workloads bring (Workload.report_section), in registration order."""
    sections = []
    for target in report_sections():
        module, _, function = target.partition(":")
        sections.append(getattr(importlib.import_module(module), function)(data, tables_dir))
    return sections


def _render(data, runs, out: Path, checks, baseline) -> None:
    figures_dir, tables_dir = out / "figures", out / "tables"
    for d in (figures_dir, tables_dir):
        d.mkdir(parents=True, exist_ok=True)
    # First the cards (every comparison's answer), then the figures; the rest below, collapsed.
    sections = [cards_section(data, figures_dir, tables_dir), figures_section(data, figures_dir)]
    if checks is not None:
        sections.append(baseline_section(data, Path(baseline), tables_dir, checks))
    claims = claims_section(runs, tables_dir)  # only when the runs hold evidence for an empirical claim
    details = [cells_section(data, tables_dir), ablation_section(data, tables_dir)]
    details.append(light_section(data, tables_dir))  # only when the rows carry implementations or their light
    details.append(compiled_section(data, tables_dir))  # only when some cell ran under torch.compile
    details += workload_sections(data, tables_dir)  # each only when the results hold cells for it (MTP's: trained with MTP or decoded speculatively)
    details.append(profiles_section(data, out, tables_dir))  # only when cells were profiled
    details += [failures_section(data, tables_dir), overview_section(data, tables_dir)]
    for s in details:
        if s is not None:
            s.collapsed = True
    sections += [s for s in (claims, *details) if s is not None]
    title = f"dsbench report: {', '.join(data.keys)}"
    stamp = generator()
    (out / "index.html").write_text(render_html(title, sections, stamp), encoding="utf-8")
    (out / "index.md").write_text(render_md(title, sections, out, stamp), encoding="utf-8")
    write_generator(out, stamp, [_as_given(run.path) for run in runs], None if baseline is None else _as_given(Path(baseline)))


def _as_given(path: Path) -> str:
    """A path under the working directory as a relative one (a committed report names its
    results as `results/<run>`), any other as it is."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _move_into(work: Path, out: Path) -> None:
    """The new report's files replace the old ones of the same name (a re-render leaves no stale
    figure behind); anything else a user put in out stays."""
    out.mkdir(exist_ok=True)
    for item in work.iterdir():
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(item, target)
    work.rmdir()


def _missing_parents(out: Path) -> list[Path]:
    """out's ancestors that do not exist yet, deepest first (removed again if nothing is written)."""
    missing, p = [], out.parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()

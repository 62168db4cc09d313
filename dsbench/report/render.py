"""Sections, written once and rendered twice: HTML (self-contained: figures inline as data:
URIs, opens from disk) and Markdown (for GitHub and CI job summaries; figures linked). All
user-supplied text is escaped in both."""

from __future__ import annotations

import base64
import datetime as dt
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dsbench import __version__
from dsbench.check import fmt_value, md_escape
from dsbench.report.data import present


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.emulated td { color: #999; background: #f4f4f4; }
tr.noted td { background: #f4f8fc; }
tr.failed td { background: #fdecea; }
tr.fail td { background: #fdecea; font-weight: bold; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.muted { color: #777; font-size: 13px; }
"""


def html_table(header: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    esc = html.escape
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{esc(classes[i])}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc('' if v is None else str(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_escape(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def frame_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    return list(frame.columns), [[fmt_value(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else ("–" if not present(v) else str(v))
                                  for v in row] for row in frame.itertuples(index=False)]


@dataclass
class Section:
    """One report section, written once and rendered to both HTML and Markdown."""

    title: str
    blocks: list = field(default_factory=list)  # ("text", str) | ("table", header, rows, classes) | ("details", summary, [blocks]) | ("figure", dict)

    def text(self, s: str) -> "Section":
        self.blocks.append(("text", s))
        return self

    def table(self, header, rows, classes=None) -> "Section":
        self.blocks.append(("table", header, rows, classes))
        return self


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="muted">dsbench {html.escape(__version__)} · generated {html.escape(_now())}</p>']
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [_html_block(b) for b in s.blocks]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_block(block) -> str:
    kind = block[0]
    if kind == "text":
        return f"<p>{html.escape(block[1])}</p>"
    if kind == "table":
        return html_table(block[1], block[2], block[3])
    if kind == "details":
        return f"<details><summary>{html.escape(block[1])}</summary>\n" + "\n".join(_html_block(b) for b in block[2]) + "\n</details>"
    if kind == "links":
        return "<ul>" + "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for text, href in block[1]) + "</ul>"
    fig = block[1]
    data = base64.b64encode(fig["file"].read_bytes()).decode("ascii")
    return (f'<figure><h3>{html.escape(fig["title"])}</h3><img alt="{html.escape(fig["title"])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(fig['caption'])}</figcaption></figure>")


def render_md(title: str, sections: list[Section], root: Path) -> str:
    out = [f"# {md_escape(title)}", "", f"dsbench {__version__} · generated {_now()}", ""]
    for s in sections:
        out += [f"## {md_escape(s.title)}", ""]
        out += [_md_block(b, root) for b in s.blocks]
    return "\n".join(out) + "\n"


def _md_block(block, root: Path) -> str:
    kind = block[0]
    if kind == "text":
        return md_escape(block[1]) + "\n"
    if kind == "table":
        return md_table(block[1], block[2]) + "\n"
    if kind == "details":
        return f"<details><summary>{md_escape(block[1])}</summary>\n\n" + "\n".join(_md_block(b, root) for b in block[2]) + "\n</details>\n"
    if kind == "links":
        return "\n".join(f"- [{md_escape(text)}]({href.replace(' ', '%20')})" for text, href in block[1]) + "\n"
    fig = block[1]
    rel = fig["file"].relative_to(root).as_posix()
    return f"### {md_escape(fig['title'])}\n\n![{md_escape(fig['title'])}]({rel})\n\n{md_escape(fig['caption'])}\n"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_csv(frame: pd.DataFrame, folder: Path, name: str) -> None:
    frame.to_csv(folder / f"{name}.csv", index=False)

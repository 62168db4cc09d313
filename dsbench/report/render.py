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

from dsbench.check import fmt_value, md_escape
from dsbench.report.data import present
from dsbench.report.stamp import generator, stamp_line


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0.6em auto; max-width: 1380px; color: #222; padding: 0 0.8em; }
h1 { font-size: 20px; margin: 0.2em 0; }
h1 + p.muted { margin: 0 0 0.4em; }
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
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(430px, 1fr)); gap: 8px; margin: 0.3em 0; align-items: start; }
.card { border: 1px solid #bbb; border-radius: 6px; padding: 4px 8px; background: #fcfcfc; }
.card h3 { font-size: 14px; margin: 0; }
.card p { margin: 2px 0; font-size: 11.5px; line-height: 1.3; }
.card .body { display: flex; gap: 6px; align-items: flex-start; }
.card table { font-size: 11px; margin: 2px 0; }
.card th, .card td { padding: 1px 4px; }
.card img { width: 215px; border: none; }
section:first-of-type h2 { font-size: 17px; margin: 0.3em 0 0.1em; }
section:first-of-type > p { margin: 0.2em 0; font-size: 13px; }
.card.runs .body { flex-direction: column; }
.card.runs img { width: 320px; }
section > p:first-child { margin-top: 0.2em; }
details.section > summary h2 { display: inline; }
details.section { margin: 0.6em 0; }
table.sortable th { cursor: pointer; }
"""
# A few lines, inline (the page opens from disk, no CDN): click a header of a sortable table to sort
# its rows by that column, numbers as numbers ('×0.952', '1,234', '12.5%' read as numbers).
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var rows = Array.from(table.querySelectorAll('tr')).slice(1);
      var key = function (r) { var t = r.children[col].textContent, n = parseFloat(t.replace(/[×,%]/g, ''));
                               return isNaN(n) ? t : n; };
      var up = th.dataset.dir !== 'asc'; th.dataset.dir = up ? 'asc' : 'desc';
      rows.sort(function (x, y) {
        var a = key(x), b = key(y);
        var c = typeof a === typeof b ? (a < b ? -1 : a > b ? 1 : 0) : (typeof a === 'number' ? -1 : 1);
        return up ? c : -c;
      });
      rows.forEach(function (r) { r.parentNode.appendChild(r); });
    });
  });
});
"""


def html_table(header: list[str], rows: list[list], classes: list[str] | None = None, sortable: bool = False) -> str:
    esc = html.escape
    out = ['<table class="sortable">' if sortable else "<table>", "<tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>"]
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
    # ("text", str) | ("table", header, rows, classes[, sortable]) | ("details", summary, [blocks]) | ("figure", dict)
    # | ("links", [(text, href)]) | ("cards", [card dict: title, subtitle, header, rows, classes, lines, figure])
    blocks: list = field(default_factory=list)
    collapsed: bool = False  # HTML: inside a closed <details>, for what lies below the first screen

    def text(self, s: str) -> "Section":
        self.blocks.append(("text", s))
        return self

    def table(self, header, rows, classes=None, sortable: bool = False) -> "Section":
        self.blocks.append(("table", header, rows, classes, sortable))
        return self


def render_html(title: str, sections: list[Section], stamp: dict | None = None) -> str:
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="muted">{html.escape(stamp_line(stamp or generator()))} · generated {html.escape(_now())}</p>']
    for s in sections:
        heading, blocks = f"<h2>{html.escape(s.title)}</h2>", "\n".join(_html_block(b) for b in s.blocks)
        body.append(f'<details class="section"><summary>{heading}</summary>\n{blocks}\n</details>' if s.collapsed
                    else f"<section>{heading}\n{blocks}\n</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{SORT_JS}</script>\n</body></html>\n")


def _html_block(block) -> str:
    kind = block[0]
    if kind == "text":
        return f"<p>{html.escape(block[1])}</p>"
    if kind == "table":
        return html_table(block[1], block[2], block[3], sortable=len(block) > 4 and block[4])
    if kind == "cards":
        return '<div class="cards">' + "\n".join(_html_card(c) for c in block[1]) + "</div>"
    if kind == "details":
        return f"<details><summary>{html.escape(block[1])}</summary>\n" + "\n".join(_html_block(b) for b in block[2]) + "\n</details>"
    if kind == "links":
        return "<ul>" + "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for text, href in block[1]) + "</ul>"
    fig = block[1]
    return (f'<figure><h3>{html.escape(fig["title"])}</h3>{_img(fig)}'
            f"<figcaption>{html.escape(fig['caption'])}</figcaption></figure>")


def _img(fig: dict) -> str:
    data = base64.b64encode(fig["file"].read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(fig["title"])}" src="data:image/png;base64,{data}">'


def _html_card(card: dict) -> str:
    esc = html.escape
    several = card["header"][-1] != "n"  # a column per run
    return (f'<div class="card{" runs" if several else ""}"><h3>{esc(card["title"])}</h3><p class="muted">{esc(card["subtitle"])}</p>'
            f'<div class="body">{html_table(card["header"], card["rows"], card["classes"])}{_img(card["figure"])}</div>'
            + "".join(f"<p>{esc(line)}</p>" for line in card["lines"]) + "</div>")


def render_md(title: str, sections: list[Section], root: Path, stamp: dict | None = None) -> str:
    out = [f"# {md_escape(title)}", "", f"{stamp_line(stamp or generator())} · generated {_now()}", ""]
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
    if kind == "cards":
        return "\n".join(_md_card(c, root) for c in block[1])
    if kind == "details":
        return f"<details><summary>{md_escape(block[1])}</summary>\n\n" + "\n".join(_md_block(b, root) for b in block[2]) + "\n</details>\n"
    if kind == "links":
        return "\n".join(f"- [{md_escape(text)}]({href.replace(' ', '%20')})" for text, href in block[1]) + "\n"
    fig = block[1]
    rel = fig["file"].relative_to(root).as_posix()
    return f"### {md_escape(fig['title'])}\n\n![{md_escape(fig['title'])}]({rel})\n\n{md_escape(fig['caption'])}\n"


def _md_card(card: dict, root: Path) -> str:
    rel = card["figure"]["file"].relative_to(root).as_posix()
    lines = "\n\n".join(md_escape(line) for line in card["lines"])
    return (f"### {md_escape(card['title'])}\n\n{md_escape(card['subtitle'])}\n\n{md_table(card['header'], card['rows'])}\n\n"
            f"{lines}\n\n![{md_escape(card['title'])}]({rel})\n")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_csv(frame: pd.DataFrame, folder: Path, name: str) -> None:
    frame.to_csv(folder / f"{name}.csv", index=False)

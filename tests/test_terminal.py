"""User text reaches the terminal as text, never as rich markup (issue 19, class 1): every error
that quotes a spec value, a path or a preset name, and every finished cell's line, over many
bracketed strings. Before, "[/x]" raised MarkupError and "[bold]fp32" lost its brackets."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dsbench.cli import app
from dsbench.runner import _cell_line
from dsbench.terminal import stderr_console, styled

NASTY = ["[/x]", "[bold]fp32", "a[/b]", "[red]", "[/]", "x[link=y]z", "[[", "]]", "[bold red]oops[/]", "\\[escaped]"]


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400", "NO_COLOR": "1"})


def one_line_naming(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize("text", NASTY)
def test_an_unknown_preset_is_quoted_as_given(text):
    one_line_naming(run("run", "sweep", "--preset", text, "--dry-run"), text)


@pytest.mark.parametrize("text", NASTY)
def test_a_bad_axis_value_in_a_spec_is_quoted_as_given(tmp_path, text):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\ndevice = "cpu"\n[axes]\nprecision = ["' + text.replace("\\", "\\\\") + '"]\n')
    one_line_naming(run("run", "sweep", str(spec), "--dry-run"), text)


def toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\") + '"'


@pytest.mark.parametrize("text", NASTY)
def test_a_spec_name_with_brackets(tmp_path, text):
    spec = tmp_path / "s.toml"
    spec.write_text(f"name = {toml_str(text)}\ndevice = \"cpu\"\n")
    one_line_naming(run("run", "sweep", str(spec), "--out", str(tmp_path / "out")), text)


@pytest.mark.parametrize("text", NASTY)
def test_a_data_path_with_brackets(tmp_path, text):
    spec = tmp_path / "s.toml"
    spec.write_text(f"name = \"s\"\ndevice = \"cpu\"\ndata = {toml_str(text + '.txt')}\n")
    one_line_naming(run("run", "sweep", str(spec), "--out", str(tmp_path / "out")), text + ".txt")


@pytest.mark.parametrize("text", NASTY)
def test_a_missing_baseline_path_with_brackets(tmp_path, text):
    folder = tmp_path / ("base" + text.replace("/", "_"))
    one_line_naming(run("check", "--baseline", str(folder), "--current", str(tmp_path)), repr(str(folder)))  # quoted as Python quotes it


@pytest.mark.parametrize("text", NASTY)
def test_a_failed_cells_line_prints_its_label_and_error_as_text(text):
    """What the sweep prints for each finished cell, mid-sweep, in the parent process."""
    buffer = io.StringIO()
    console = Console(file=buffer, markup=False, width=400)
    row = {"status": "error", "cell_id": "abc", "label": f"train/{text}", "error": f"RuntimeError: {text}"}
    console.print(_cell_line(row))
    assert f"train/{text}: RuntimeError: {text}" in buffer.getvalue()


def test_the_consoles_have_markup_off_and_styles_stay_on_known_text():
    assert stderr_console()._markup is False
    text = styled(("error:", "red"), " [/x] stays")
    assert text.plain == "error: [/x] stays" and any(span.style == "red" for span in text.spans)

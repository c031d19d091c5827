"""The terminal side of vnetctl's output (CliRunner is never a terminal): rich tables whose
cells are never read as markup, the empty-list sentence on stdout, errors on stderr."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from vnet.cli import output


@pytest.fixture
def tty(monkeypatch: pytest.MonkeyPatch) -> tuple[io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=out, force_terminal=True, width=100, emoji=False,
                                                   color_system=None))
    monkeypatch.setattr(output, "err_console", Console(file=err, force_terminal=True, width=100, emoji=False,
                                                       color_system=None))
    return out, err


def test_table_on_a_terminal(tty: tuple[io.StringIO, io.StringIO]) -> None:
    out, err = tty
    output.table(("name", "labels"), [["web", "note=[bold]x[/bold]"], [output.styled("[red]db", "red"), ":ok:"]],
                 empty="no networks", title="nets [b]")
    text = out.getvalue()
    assert "┃ name" in text and "│ web" in text  # a real table, not tab-separated
    assert "note=[bold]x[/bold]" in text and "[red]db" in text and ":ok:" in text and "nets [b]" in text
    assert "\t" not in text and err.getvalue() == ""


def test_empty_and_errors_on_a_terminal(tty: tuple[io.StringIO, io.StringIO]) -> None:
    out, err = tty
    output.table(("name",), [], empty="no networks")
    assert out.getvalue().strip() == "no networks" and err.getvalue() == ""  # a terminal: stdout
    output.print_error("conflict", "regex '^[a-z]+$' [/]", trace_id="abc")
    assert err.getvalue().splitlines() == ["error: regex '^[a-z]+$' [/] (conflict)", "trace id: abc"]
    output.fields([("labels", "a=[i]b[/i]")], title="network x")
    assert "a=[i]b[/i]" in out.getvalue()

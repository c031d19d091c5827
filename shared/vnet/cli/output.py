"""How ``vnetctl`` prints: one place for JSON, tables, errors and the terminal/pipe split.

The rules (docs/cli.md says the same for users):

* ``--json``: stdout holds exactly one JSON document. A verb about one object prints the
  object; a list prints ``{"items": [...]}`` (``network ls`` adds ``next_cursor``); a verb
  that takes several arguments prints ``{"items": [...], "errors": [...]}`` however many
  were given. A failure prints ``{"error": {"code", "message", "details", "trace_id"}}``
  on stdout too (a script reads one stream) and exits nonzero.
* Tables on a terminal are rich tables; when stdout is not a terminal they are
  tab-separated lines (a header, then one line per row) that no width truncates, and a
  table's title goes to stderr.
  No rows: a sentence ("no networks"), on stderr when piped so stdout stays parseable.
* Text that comes from a server or a user (names, messages, labels) never passes through
  rich markup: table cells are :class:`rich.text.Text`, lines use :func:`escape`.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Sequence
from typing import Any, NoReturn

import click
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vnet.core.errors import VNetError

__all__ = ["Cell", "console", "err_console", "escape", "styled"]

# emoji=False: ":name:" in a server's text stays as it is (escape() does not cover emoji codes).
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)

# Wide enough that nothing a server sends is wrapped or cut when stdout is a pipe or a file.
PIPE_WIDTH = 1_000_000

# Exit codes (docs/cli.md): 1 a request failed, 2 the command line is wrong or the config
# unreadable, 3 `status`: a service is not running, 4 `health`: degraded.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_DEGRADED = 4

Cell = str | Text


class _Mode:
    json = False


MODE = _Mode()


def configure(json_output: bool) -> None:
    """Per invocation (the consoles outlive one in tests): JSON or not, and the pipe width."""
    MODE.json = json_output
    for c in (console, err_console):
        if not c.is_terminal:
            c.soft_wrap = True
            c.width = PIPE_WIDTH


def stdout_is_terminal() -> bool:
    return console.is_terminal


def styled(text: str, style: str) -> Text:
    """A cell with a style; the text itself is never read as markup."""
    return Text(text, style=style)


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def emit(obj: Any) -> None:
    """One JSON document on stdout."""
    click.echo(msgspec.json.format(msgspec.json.encode(obj)).decode())


def emit_items(items: Sequence[Any], **extra: Any) -> None:
    emit({"items": list(items), **extra})


def error_doc(code: str, message: str, details: dict[str, Any] | None = None,
              trace_id: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details or {}, "trace_id": trace_id}


def vnet_error_doc(err: VNetError) -> dict[str, Any]:
    return error_doc(err.code, err.message, err.details, err.trace_id)


def print_error(code: str, message: str, *, details: dict[str, Any] | None = None, trace_id: str | None = None,
                subject: str | None = None) -> None:
    """One error line on stderr (code and trace id dimmed); nothing in it is read as markup."""
    line = Text.assemble(("error", "red"), ": ", f"{subject}: " if subject else "", message, (f" ({code})", "dim"))
    err_console.print(line, highlight=False)
    if trace_id:
        err_console.print(Text(f"trace id: {trace_id}", style="dim"), highlight=False)


def fail(code: str, message: str, *, exit_code: int = EXIT_ERROR, details: dict[str, Any] | None = None,
         trace_id: str | None = None) -> NoReturn:
    """The command failed as a whole: the JSON error document or an error line, and exit."""
    if MODE.json:
        emit({"error": error_doc(code, message, details, trace_id)})
    else:
        print_error(code, message, details=details, trace_id=trace_id)
    sys.exit(exit_code)


def fail_with(err: VNetError, exit_code: int = EXIT_ERROR) -> NoReturn:
    fail(err.code, err.message, exit_code=exit_code, details=err.details, trace_id=err.trace_id)


def note(text: str) -> None:
    """A sentence instead of output (``no networks``): stdout on a terminal, stderr when piped."""
    target = console if console.is_terminal else err_console
    target.print(Text(text), highlight=False)


def say(markup: str) -> None:
    """A human line with markup; every server-provided part of it must be :func:`escape` d."""
    console.print(markup, highlight=False)


def warn(text: str) -> None:
    err_console.print(Text.assemble(("warning", "yellow"), ": ", text), highlight=False)


def _plain(cell: Cell) -> str:
    s = cell.plain if isinstance(cell, Text) else cell
    return s.replace("\t", " ").replace("\n", " ")


def table(columns: Sequence[str], rows: Iterable[Sequence[Cell]], *, empty: str, title: str | None = None,
          right: Collection[str] = (), fold: Collection[str] = ()) -> None:
    """A rich table on a terminal, tab-separated lines in a pipe, ``empty`` when no rows."""
    rows = list(rows)
    if not rows:
        note(empty)
        return
    if not console.is_terminal:
        if title:  # a caption for people (which table this is); stdout keeps only the rows
            err_console.print(Text(title), highlight=False)
        click.echo("\t".join(columns))
        for r in rows:
            click.echo("\t".join(_plain(c) for c in r))
        return
    t = Table(title=Text(title) if title else None)
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left", no_wrap=col not in fold,
                     overflow="fold" if col in fold else "ellipsis")
    for r in rows:
        t.add_row(*(c if isinstance(c, Text) else Text(c) for c in r))
    console.print(t)


def fields(pairs: Iterable[tuple[str, Cell]], *, title: str | None = None) -> None:
    """One object as field/value lines (``inspect``): a two-column table, or ``field<TAB>value``."""
    pairs = list(pairs)
    if not console.is_terminal:
        for k, v in pairs:
            click.echo(f"{k}\t{_plain(v)}")
        return
    t = Table(show_header=False, title=Text(title) if title else None)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in pairs:
        t.add_row(k, v if isinstance(v, Text) else Text(v))
    console.print(t)

"""How the CLI speaks: Rich tables for people, ``--json`` for programs, one-line errors.

Every value that came from a database, a certificate or the network is shown as text: never
read as Rich markup (a name such as ``[/]`` or ``[bold red]``) or as an emoji code, and with
every character that could control a terminal escaped (:func:`certpulse.display.printable`).
Commands get this by printing data only through :func:`table`, :func:`print_fields`,
:func:`shown` (a value put into a markup string) or :func:`print_lines` (text of many lines);
errors go through :func:`fail_line`. ``--json`` (:func:`emit_json`) is the exact data, with
JSON's own escapes.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from certpulse.display import printable, printable_lines

# emoji=False: ":skull:" in a name stays those seven characters.
console = Console(highlight=False, emoji=False)
err_console = Console(stderr=True, highlight=False, emoji=False)


def emit_json(data: Any) -> None:
    """JSON for programs. ``ensure_ascii`` (kept on purpose) writes every control and non-ASCII
    character as a ``\\uXXXX`` escape, so even JSON sent to a terminal carries no control code."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=True) + "\n")


def shown(value: object) -> str:
    """A value to put into a Rich markup string: printable (see module doc) and markup-escaped,
    e.g. ``console.print(f"[green]template {shown(name)} added[/green]")``."""
    return escape(printable("" if value is None else value))


def text(value: object, style: str = "") -> Text:
    """A value as a Rich :class:`Text`: never parsed as markup; printable."""
    return Text(printable("" if value is None else value), style=style)


def print_lines(value: str) -> None:
    """Text of several lines (a command's output, a document) as it is, line breaks kept,
    every other control escaped and no markup read."""
    console.print(Text(printable_lines(value)), end="" if value.endswith("\n") else "\n", soft_wrap=True)


def print_fields(*fields: tuple[str, object]) -> None:
    """One "name: value" line per field that has a value (``None`` is left out). A list is
    shown as its items joined by ", "."""
    for name, value in fields:
        if value is None:
            continue
        shown_value = ", ".join(printable(v) for v in value) if isinstance(value, list | tuple) else printable(value)
        console.print(Text.assemble((printable(name), "bold"), ": ", shown_value), soft_wrap=True)


# Rich lays out every cell (about half a millisecond a row): beyond this many rows a table is
# printed as plain aligned columns instead, e.g. 10,000 certificates in 0.1 s instead of 5 s.
PLAIN_TABLE_ROWS = 500


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table whose title and cells are text, never markup, with every control escaped."""
    cells = [["" if v is None else printable(v) for v in row] for row in rows]
    if len(cells) > PLAIN_TABLE_ROWS:
        _plain_table(printable(title), columns, cells)
        return
    grid = Table(title=Text(printable(title)), header_style="bold cyan", title_justify="left")
    for column in columns:
        grid.add_column(Text(column))
    for row in cells:
        grid.add_row(*(Text(cell) for cell in row))
    console.print(grid)


def _plain_table(title: str, columns: Sequence[str], cells: list[list[str]]) -> None:
    """Title, header, rule and rows, each column as wide as its widest cell; nothing is cut.
    The cells are already printable (a line break shows as ``\\n``): one line per row."""
    widths = [max([len(column), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.ljust(width) for value, width in zip(values, widths, strict=True)).rstrip()

    out = [title, line(columns), line(["-" * width for width in widths]), *(line(row) for row in cells)]
    console.file.write("\n".join(out) + "\n")
    console.file.flush()


_ASCII_SPACE = re.compile(r"[ \t\n\r\f\v]+")


def fail_line(message: str) -> str:
    """A message flattened to one line, whatever it contains: each run of ASCII white space (the
    line breaks and tabs of a multi-line message) becomes one space, and every other character
    that could control a terminal is escaped."""
    return printable(_ASCII_SPACE.sub(" ", message).strip())

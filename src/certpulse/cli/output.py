"""How the CLI speaks: Rich tables for people, ``--json`` for programs, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# Rich lays out every cell (about half a millisecond a row): beyond this many rows a table is
# printed as plain aligned columns instead, e.g. 10,000 certificates in 0.1 s instead of 5 s.
PLAIN_TABLE_ROWS = 500


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if len(cells) > PLAIN_TABLE_ROWS:
        _plain_table(title, columns, cells)
        return
    grid = Table(title=title, header_style="bold cyan", title_justify="left")
    for column in columns:
        grid.add_column(column)
    for row in cells:
        grid.add_row(*row)
    console.print(grid)


def _plain_table(title: str, columns: Sequence[str], cells: list[list[str]]) -> None:
    """Title, header, rule and rows, each column as wide as its widest cell; nothing is cut. A
    character that does not print (a line break, an escape sequence's ESC) shows as "?": one line
    per row, and nothing in a certificate's names reaches the terminal as a control code."""
    flat = [["".join(ch if ch.isprintable() else "?" for ch in cell) for cell in row] for row in cells]
    widths = [max([len(column), *(len(row[i]) for row in flat)]) for i, column in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.ljust(width) for value, width in zip(values, widths, strict=True)).rstrip()

    out = [title, line(columns), line(["-" * width for width in widths]), *(line(row) for row in flat)]
    console.file.write("\n".join(out) + "\n")
    console.file.flush()


def fail_line(message: str) -> str:
    """A message flattened to one line, whatever it contains."""
    return " ".join(message.split())

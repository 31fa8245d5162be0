"""How text that came from outside is shown to a person: on a terminal, and in a log.

Names, subjects, reasons and messages reach certpulse from principals, CSRs, certificates and
the network; any of them may hold a terminal's control codes (ESC sequences that recolour the
screen, set the window title or move the cursor; a carriage return that overwrites a line) or
characters that make text read otherwise than it is (bidi overrides, zero-width joiners). Shown
as they are, they let whoever chose them control the operator's screen.

The rule, one for every place that shows data: a character that Python does not count as
printable (:meth:`str.isprintable`: the C0 and C1 controls, DEL, the Unicode format characters
such as U+202E and U+200D, line and paragraph separators, spaces other than the ASCII space,
surrogates, private-use and unassigned code points) is written as the escape Python's ``repr``
uses for it: ``\\n``, ``\\r``, ``\\t``, ``\\xNN``, ``\\uXXXX`` or ``\\UXXXXXXXX``. Everything
else, backslashes included, is shown as it is, so an ordinary name looks the same everywhere.
(A backslash in a value is therefore not escaped: ``--json`` is the exact form.)
"""

from __future__ import annotations

import logging


def _escape(char: str) -> str:
    return repr(char)[1:-1]


def printable(value: object) -> str:
    """``value`` as one line of text that cannot control a terminal (the rule above)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def printable_lines(text: str) -> str:
    """Text of several lines (a command's output, a TOML document): each line by the rule, the
    line breaks kept. A carriage return, tab or any other control is still escaped."""
    return "\n".join(printable(line) for line in text.split("\n"))


class PrintableFormatter(logging.Formatter):
    """A log formatter that applies the rule: the message (and every value it interpolates) is
    one line with nothing a terminal or a log viewer would act on; a traceback keeps its line
    breaks, each of its lines escaped likewise."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return printable_lines(super().formatStack(stack_info))

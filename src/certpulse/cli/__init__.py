"""The ``certpulse`` command. Thin: parses arguments, calls the core, prints results.

Errors never show a traceback: a refusal prints ``certpulse: error: REASON: detail`` on one
line and exits 2; anything unexpected prints one line and exits 70.
"""

from __future__ import annotations

import logging
import sys

import typer

from certpulse import __version__
from certpulse.cli import agent_commands, binding_commands, ca_commands, event_commands, task_commands
from certpulse.cli.output import err_console, fail_line
from certpulse.display import PrintableFormatter
from certpulse.errors import CertpulseError, Refusal

app = typer.Typer(
    name="certpulse",
    help="Certificate autoenrollment, lifecycle notifications and rebind.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(ca_commands.ca_app, name="ca")
app.add_typer(ca_commands.template_app, name="template")
app.add_typer(ca_commands.principal_app, name="principal")
app.add_typer(ca_commands.request_app, name="request")
app.add_typer(ca_commands.apikey_app, name="apikey")
app.add_typer(agent_commands.agent_app, name="agent")
app.add_typer(agent_commands.cert_app, name="cert")
app.command("revoke")(ca_commands.revoke)
app.command("unrevoke")(ca_commands.unrevoke)
app.command("status")(ca_commands.status)
app.command("audit")(ca_commands.audit)
app.command("events")(event_commands.events)
app.add_typer(task_commands.task_app, name="task")
app.add_typer(binding_commands.binding_app, name="binding")


@app.command("version")
def version() -> None:
    """Print the version."""
    print(__version__)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Usage errors are the argument parser's (exit 2, with usage); our own
    refusals and anything unexpected become one line on standard error."""
    command = typer.main.get_command(app)
    _printable_last_resort()
    try:
        command.main(args=argv, prog_name="certpulse", standalone_mode=True)
    except Refusal as refusal:
        _fail(f"certpulse: error: {refusal.reason.value}: {refusal.detail}", 2)
    except CertpulseError as exc:
        _fail(f"certpulse: error: {exc}", 2)
    except Exception as exc:  # last line of defence: one line, never a traceback
        _fail(f"certpulse: internal error: {type(exc).__name__}: {exc}", 70)


def _printable_last_resort() -> None:
    """Warnings logged while no logging is set up (every command but ``agent run``) go to
    standard error through ``logging.lastResort``; they carry names and problem details from
    the CA, so they are written by the printable rule, like everything else the CLI shows."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(PrintableFormatter())
    logging.lastResort = handler


def _fail(message: str, code: int) -> None:
    err_console.print(fail_line(message), markup=False, soft_wrap=True)
    sys.exit(code)

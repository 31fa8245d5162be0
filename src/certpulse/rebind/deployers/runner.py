"""Running a consumer's reload command: an argument list, never a shell.

A reload command is given as one line (``reload=systemctl reload nginx``) and split with
:func:`shlex.split` into an argument list when the binding is added, so ``;``, ``|`` or ``$(...)``
in it are plain characters of an argument, never shell syntax. The child gets the same
treatment as a notification task's command (:mod:`certpulse.sandbox`): a fixed
environment with a fixed ``PATH`` and nothing inherited, its own process group killed at the
time limit, output captured up to a cap and the rest drained, all with bounded memory and time.

Unlike a task's command, a reload command is usually a system binary (``systemctl``,
``nginx``, ``apachectl``) that package upgrades replace, so its bytes are not pinned: only root
can add a binding, and the binaries live in root-owned folders.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from certpulse.errors import Reason, Refusal
from certpulse.rebind.deployers.base import DeployFailed
from certpulse.sandbox import (
    KILL_GRACE,
    OUTPUT_CAP,
    RunResult,
    supervise,
    task_environment,
)

DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 3600.0


def parse_command_line(text: str, what: str) -> list[str]:
    """A command line as an argument list, or a refusal when it is empty or unbalanced."""
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{what}: {exc} in {text!r}") from None
    if not argv:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{what} is empty")
    if any("\0" in arg for arg in argv):
        raise Refusal(Reason.INVALID_ARGUMENT, f"{what} holds a NUL character")
    return argv


def parse_timeout(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{what} must be seconds from 0 to {MAX_TIMEOUT:g} (got {text!r})")
    return value


def reload_options(raw: Mapping[str, str]) -> dict[str, Any]:
    """The optional ``reload`` and ``reload_timeout`` options, parsed."""
    parsed: dict[str, Any] = {}
    if "reload" in raw:
        parsed["reload"] = parse_command_line(raw["reload"], "reload")
    if "reload_timeout" in raw:
        if "reload" not in raw:
            raise Refusal(Reason.INVALID_ARGUMENT, "reload_timeout without a reload command")
        parsed["reload_timeout"] = parse_timeout(raw["reload_timeout"], "reload_timeout")
    return parsed


def run_argv(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, output_cap: int = OUTPUT_CAP) -> RunResult:
    """Run ``argv`` (``argv[0]`` looked up in the fixed ``PATH``) from ``/``; never raises for the
    command's own misbehaviour (see :class:`RunResult`)."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
            env=task_environment({}), close_fds=True, start_new_session=True)
    except OSError as exc:
        return RunResult("failed", None, b"", False, f"cannot start {argv[0]}: {exc.strerror or exc}",
                         time.monotonic() - started)
    return supervise(proc, b"", timeout=timeout, output_cap=output_cap, kill_grace=KILL_GRACE, started=started)


def output_text(result: RunResult) -> str:
    text = result.output.decode("utf-8", "replace")
    return text + ("\n[output truncated]" if result.truncated else "")


def run_or_fail(argv: Sequence[str], *, timeout: float, what: str) -> str:
    """Run ``argv``; its output, or :class:`DeployFailed` with that output when it did not exit 0."""
    result = run_argv(argv, timeout=timeout)
    text = output_text(result)
    if result.outcome != "ok":
        raise DeployFailed(f"{what} ({shlex.join(argv)}): {result.detail}", text)
    return text


def run_reload(options: Mapping[str, Any]) -> str:
    """Run the binding's ``reload`` command, if it has one; its output."""
    argv = options.get("reload")
    if not argv:
        return ""
    return run_or_fail(argv, timeout=float(options.get("reload_timeout", DEFAULT_TIMEOUT)), what="reload")


__all__ = ["DEFAULT_TIMEOUT", "output_text", "parse_command_line", "parse_timeout", "reload_options", "run_argv",
           "run_or_fail", "run_reload"]

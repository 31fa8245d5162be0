"""``certpulse task``: notification tasks (the seed's New-CertificateNotificationTask).

Task commands need only the agent's folder and store: no CA is contacted and no credential is
read, so they work while the CA is down, which is when an operator most wants them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from certpulse import clock
from certpulse.agent.daemon import task_settings
from certpulse.cli.agent_commands import AgentDir, JsonOption, agent_store
from certpulse.cli.output import console, emit_json, print_lines, shown, table
from certpulse.errors import Reason, Refusal
from certpulse.events import tasks as task_mod
from certpulse.events.tasks import TASK_TYPES
from certpulse.sandbox import DEFAULT_TIMEOUT

task_app = typer.Typer(help="Notification tasks: commands run for lifecycle events", no_args_is_help=True)

NameArgument = Annotated[str, typer.Argument(help="The task's name")]


def _when(value: object) -> str:
    return "" if value is None else str(value)


@task_app.command("add")
def task_add(
    name: Annotated[str, typer.Option("--name", help="Letters, digits, '.', '_', '-' (at most 64)")],
    task_type: Annotated[str, typer.Option("--type", help=" | ".join(TASK_TYPES))],
    command: Annotated[Path, typer.Option("--command", help="Executable run for each event (absolute path)")],
    dir_: AgentDir = None,
    arg: Annotated[list[str] | None, typer.Option("--arg", help="Argument before OLD and NEW (repeat)")] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="system or user (default: the agent's)")] = None,
    old_thumbprint: Annotated[str | None, typer.Option("--old-thumbprint",
                                                       help="Only events about this old certificate")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before the run is killed (1-3600)")]
    = DEFAULT_TIMEOUT,
    replace: Annotated[bool, typer.Option("--replace", help="Redefine an existing task and re-pin its command")]
    = False,
) -> None:
    """Register a command to run for matching events; its SHA-256 is pinned now."""
    with agent_store(dir_) as (_, config, store):
        task = task_mod.add_task(store, name=name, task_type=task_type, command=command, args=arg or (),
                                 channel=channel or config.channel, old_thumbprint=old_thumbprint, timeout=timeout,
                                 now=clock.now(), agent_channel=config.channel, replace=replace)
    console.print(f"[green]task {shown(task.name)} {'redefined' if replace else 'added'}[/green]: "
                  f"{shown(task.command)} (sha256 {task.sha256}), for {task.task_type} events on the "
                  f"{task.channel} channel from seq {task.cursor + 1}")


@task_app.command("pin")
def task_pin(name: NameArgument, dir_: AgentDir = None) -> None:
    """Re-check and re-pin the command after an intended change: a refused task gets its missed events."""
    with agent_store(dir_) as (_, _config, store):
        task, previous = task_mod.pin_task(store, name)
    same = "unchanged" if previous == task.sha256 else f"was {previous}"
    console.print(f"[green]task {shown(task.name)} pinned[/green]: sha256 {task.sha256} ({same})")


@task_app.command("remove")
def task_remove(name: NameArgument, dir_: AgentDir = None) -> None:
    """Forget a task and its history."""
    with agent_store(dir_) as (_, _config, store):
        task = task_mod.remove_task(store, name)
    console.print(f"[yellow]task {shown(task.name)} removed[/yellow]")


@task_app.command("list")
def task_list(dir_: AgentDir = None, json_: JsonOption = False) -> None:
    """Every task with its state and its last run."""
    with agent_store(dir_) as (_, _config, store):
        found = task_mod.list_tasks(store)
    if json_:
        emit_json([task.to_dict() for task in found])
        return
    table("Tasks", ["name", "type", "channel", "command", "state", "cursor", "runs", "failures", "last run",
                    "outcome", "exit", "next attempt", "last error"],
          [tuple(_when(v) for v in (
              t.name, t.task_type, t.channel, t.command, t.state, t.cursor, t.runs, t.failures, t.last_run_at,
              t.last_outcome, t.last_exit, t.next_attempt_at, " ".join((t.last_error or "").split())))
           for t in found])


@task_app.command("history")
def task_history(
    name: NameArgument,
    dir_: AgentDir = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="The newest this many runs")] = 20,
    json_: JsonOption = False,
) -> None:
    """The task's recent runs, oldest first, with their captured output."""
    with agent_store(dir_) as (_, _config, store):
        runs = task_mod.history(store, name, limit=limit)
    if json_:
        emit_json([run.to_dict() for run in runs])
        return
    table(f"Runs of {name}", ["id", "started", "event", "attempt", "outcome", "exit", "detail", "output"],
          [tuple(_when(v) for v in (
              r.id, r.started_at, "test" if r.test else f"{r.event_seq} ({r.event_id})", r.attempt, r.outcome,
              r.exit_status, " ".join(r.detail.split()),
              " ".join(r.text.split())[:200] + (" ..." if r.output_truncated else "")))
           for r in runs])


@task_app.command("test")
def task_test(name: NameArgument, dir_: AgentDir = None, json_: JsonOption = False) -> None:
    """Run the task once for a made-up event (CERTPULSE_TEST=1), as Switch-Certificate -NotifyOnly."""
    with agent_store(dir_) as (directory, _config, store):
        run = task_mod.run_test(store, name, directory=directory, now=clock.now())
    if json_:
        emit_json(run.to_dict())
    elif run.outcome != "refused":  # a refusal is said once, on standard error
        console.print(f"test run of {shown(name)}: [bold]{run.outcome}[/bold]"
                      + (f", exit status {run.exit_status}" if run.exit_status is not None else "")
                      + (f" ({shown(run.detail)})" if run.detail else ""))
        if run.output:
            print_lines(run.text)
    if run.outcome == "refused":
        raise Refusal(Reason(run.reason) if run.reason else Reason.COMMAND_UNSAFE, run.detail)
    if run.outcome != "ok":
        raise typer.Exit(1)


@task_app.command("run-pending")
def task_run_pending(dir_: AgentDir = None, json_: JsonOption = False) -> None:
    """Deliver pending events to the tasks now (the agent does this after every pulse)."""
    with agent_store(dir_) as (directory, config, store):
        summary = task_mod.dispatch(store, task_settings(config), directory, clock.now())
    if json_:
        emit_json(summary.to_dict())
        return
    if summary.busy:
        console.print("another process is delivering events to the tasks; it will deliver these too")
        return
    console.print(f"runs {summary.runs}: ok {summary.ok}, failed {summary.failed}, given up {summary.gave_up}; "
                  f"refused {summary.refused}, skipped {summary.skipped}"
                  + ("; stopped at the budget, more are pending" if summary.stopped_early else ""))


__all__ = ["task_app"]

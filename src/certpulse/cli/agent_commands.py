"""Client-side commands: agent (init, pulse, run, status) and cert (list, show, request, ...)."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from cryptography import x509

from certpulse import clock
from certpulse.agent.client import CAClient, ServerRefused, ServerUnavailable
from certpulse.agent.config import (
    AgentConfig,
    PolicyServerConfig,
    context_for_uid,
    default_dir,
    load_config,
    open_agent_store,
    resolve_dir,
    save_config,
    write_credential,
)
from certpulse.agent.daemon import deliver_tasks, run
from certpulse.agent.gather import cached_templates, planned_renewal
from certpulse.agent.local_faults import LOCAL_ERRORS, PulseNotRecorded, describe, store_unreachable
from certpulse.agent.manual import (
    export_p12,
    export_pem,
    import_p12,
    move_certificate,
    repair_store,
    request_certificate,
)
from certpulse.agent.pulse import Agent, PulseResult
from certpulse.agent.skew import STATE as skew_state
from certpulse.agent.skew import describe as describe_skew
from certpulse.agent.trust import (
    ROOTS_NAME,
    PinFile,
    roots_from_file,
    select_pinned,
    ssl_context,
)
from certpulse.cli.output import console, emit_json, err_console, fail_line, print_fields, shown, table
from certpulse.durations import parse_duration
from certpulse.errors import Reason, Refusal
from certpulse.machine.certstore import LocalStore
from certpulse.machine.locks import AgentBusy, AgentLock, Holder, Role
from certpulse.pki.fingerprint import ca_fingerprint as fingerprint_of
from certpulse.pki.fingerprint import parse_fingerprint
from certpulse.rebind.bindings import list_bindings

agent_app = typer.Typer(help="The autoenrollment agent", no_args_is_help=True)
cert_app = typer.Typer(help="The agent's certificate store", no_args_is_help=True)

AgentDir = Annotated[
    Path | None,
    typer.Option("--dir", envvar="CERTPULSE_DIR", show_default=False,
                 help="Agent folder (default: $CERTPULSE_DIR, then /var/lib/certpulse as root, "
                      "else ~/.local/share/certpulse)"),
]
# `agent pulse` when the store cannot record the pulse (or cannot be opened): sysexits' EX_IOERR.
EXIT_NOT_RECORDED = 74
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
# `agent pulse` while another one-shot pulse holds the store: how long it waits by default, and
# its exit status when that wait is over (EX_TEMPFAIL: try again later; 1 is a failed pulse, 2 a
# refusal, 70 an internal error).
PULSE_WAIT_SECONDS = 120.0
PULSE_RUNNING_EXIT = 75
log = logging.getLogger("certpulse.agent")


@contextlib.contextmanager
def agent_store(dir_: Path | None) -> Iterator[tuple[Path, AgentConfig, LocalStore]]:
    """The agent's folder, configuration and store, for commands that need no CA and no
    credential (certificates, tasks, bindings, events, status): they work while the CA is down
    and when the credential cannot be read."""
    directory = resolve_dir(dir_)
    config = load_config(directory)
    store = open_agent_store(directory, config)
    try:
        yield directory, config, store
    finally:
        store.close()


def _open(dir_: Path | None) -> Agent:
    directory = resolve_dir(dir_)
    return Agent(directory, load_config(directory))


def _unavailable(exc: ServerUnavailable) -> Refusal:
    return Refusal(Reason.UNAVAILABLE, exc.detail)


@agent_app.command("init")
def agent_init(
    server: Annotated[str, typer.Option("--server", help="Enrollment service URL (https://...)")],
    token: Annotated[str, typer.Option("--token", help="One-time enrollment token from 'principal add'")],
    dir_: AgentDir = None,
    ca_fingerprint: Annotated[str | None, typer.Option(
        "--ca-fingerprint", help="SHA-256 of the CA's root certificate (printed by 'ca init'); pins that root")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        "--ca-file", help="The CA's root certificate (PEM) to pin, instead of --ca-fingerprint")] = None,
    insecure_http: Annotated[bool, typer.Option(
        "--insecure-http", help="Allow an http:// server: the credential travels in clear (the pin still "
                                "decides which certificates are trusted)")] = False,
    refresh_interval: Annotated[str, typer.Option("--refresh-interval")] = "8h",
) -> None:
    """Pin the CA's root, exchange the one-time token for this machine's credential over a
    connection verified against that root, and write the configuration."""
    directory = resolve_dir(dir_)
    url = server.rstrip("/")
    if url.startswith("http://"):
        if not insecure_http:
            raise Refusal(Reason.INVALID_ARGUMENT, f"{url} is plain http: the credential would travel in clear and "
                                                   "anyone in the middle could answer; use https (or --insecure-http)")
    elif not url.startswith("https://"):
        raise Refusal(Reason.INVALID_ARGUMENT, f"{url} is not an https URL")
    if (ca_fingerprint is None) == (ca_file is None):
        raise Refusal(Reason.INVALID_ARGUMENT, "give exactly one of --ca-fingerprint or --ca-file: the agent "
                                               "trusts only the CA root it is told to pin")
    if (directory / "agent.toml").exists():
        raise Refusal(Reason.CONFLICT, f"{directory} already holds an agent")
    interval = parse_duration(refresh_interval)
    try:
        roots = roots_from_file(ca_file) if ca_file is not None else _fetch_pinned_root(url, ca_fingerprint or "")
        answer = CAClient.exchange_token(url, token, verify=ssl_context(roots))
    except ServerUnavailable as exc:
        raise _unavailable(exc) from None
    except ServerRefused as exc:
        raise Refusal(Reason.TOKEN_INVALID if exc.status == 401 else Reason.TOKEN_USED if exc.status == 409
                      else Reason.FORBIDDEN, f"the server refused the token: {exc.reason}: {exc.detail}") from None
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    PinFile(directory).save(roots)
    write_credential(directory, answer["credential"])
    config = AgentConfig(servers=(PolicyServerConfig(url=url, trust_roots=ROOTS_NAME,
                                                     insecure_http=url.startswith("http://")),),
                         principal=answer["principal"], refresh_interval=interval, context=context_for_uid())
    save_config(directory, config)
    open_agent_store(directory, config).close()  # creates the store
    console.print(f"[green]agent for {shown(repr(answer['principal']))} initialised in {shown(directory)}[/green]; "
                  f"pinned root SHA-256 {', '.join(fingerprint_of(r) for r in roots)}")


def _fetch_pinned_root(url: str, wanted_text: str) -> list[x509.Certificate]:
    """The root the server serves whose fingerprint is the one given: fetched without verifying
    the server (it cannot be verified yet), and trusted only because its fingerprint matches."""
    wanted = parse_fingerprint(wanted_text)
    served = []
    for item in CAClient.served_roots(url, verify=False):
        with contextlib.suppress(ValueError):
            served.append(x509.load_pem_x509_certificate(item.encode()))
    return [select_pinned(served, wanted)]


CLOCK_NOTES = ("clock-skew", "6b:not-yet-valid", "6b:issuer-not-yet-valid")


def _print_result(result: PulseResult, json_: bool) -> None:
    if json_:
        emit_json(result.to_dict())
        return
    colour = {"ok": "green", "failed": "red", "disabled": "yellow"}.get(result.outcome, "white")
    console.print(f"pulse [{colour}]{shown(result.outcome)}[/{colour}]"
                  + (f": {shown(result.error)}" if result.error else ""))
    if result.outcomes:
        table("Actions", ["action", "rule", "template", "outcome", "detail"],
              [(o.action.kind.value, o.action.rule, o.action.template, o.outcome, o.detail or o.action.detail)
               for o in result.outcomes])
    # What a clock that is off does is otherwise invisible in a pulse that is "ok": say it.
    for note in result.to_dict()["notes"]:
        if note["rule"] in CLOCK_NOTES:
            template = f" {shown(note['template'])}:" if note.get("template") else ""
            console.print(f"[yellow]{shown(note['rule'])}[/yellow]{template} {shown(note['detail'])}")


def _ignore_wake_signals() -> None:
    """For the rest of a one-shot pulse, SIGHUP and SIGUSR1 (which by default end a process) are
    logged and otherwise ignored: an older certpulse, or an operator, may send them to whoever
    holds the store lock, meaning a daemon. This pulse is pulsing already and delivers tasks when
    it ends. A handler rather than SIG_IGN, so that the commands it starts get the default back."""
    def ignored(signum: int, frame: object) -> None:
        log.warning("%s ignored: pid %d is a one-shot pulse, not the daemon; it pulses and delivers "
                    "tasks once, then exits", signal.Signals(signum).name, os.getpid())

    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, ignored)


def _take_store(lock: AgentLock, wait: float) -> int | None:
    """Hold the store lock for a one-shot pulse; or, when a daemon holds it, wake that daemon and
    return its pid. A one-shot pulse holding it is waited for, up to ``wait`` seconds; then one
    line and exit :data:`PULSE_RUNNING_EXIT`."""
    def waiting(holder: Holder) -> None:
        err_console.print(fail_line(f"another pulse holds this store ({holder.describe()}): waiting up to "
                                    f"{wait:g} s for it to end"), markup=False, soft_wrap=True)

    _ignore_wake_signals()
    try:
        daemon = lock.acquire_or_wake(Role.PULSE, clock.now, wait, signal.SIGHUP, waiting=waiting)
    except OSError as exc:  # the agent folder itself cannot be written (full, read-only)
        _not_recorded(f"the pulse cannot run: {describe(exc, lock.path.parent / 'store')[1]}")
    except AgentBusy as busy:
        err_console.print(fail_line(f"certpulse: error: {busy.reason.value}: {busy.detail} (waited {wait:g} s)"),
                          markup=False, soft_wrap=True)
        raise typer.Exit(PULSE_RUNNING_EXIT) from None
    return daemon.pid if daemon is not None else None


@agent_app.command("pulse")
def agent_pulse(
    dir_: AgentDir = None,
    plan_only: Annotated[bool, typer.Option("--plan", help="Print the plan; change nothing")] = False,
    json_: JsonOption = False,
    refresh_policy: Annotated[bool, typer.Option("--refresh-policy", help="Ignore the cached policy")] = False,
    wait: Annotated[float, typer.Option(
        "--wait", min=0, metavar="SECONDS",
        help=f"While another one-shot pulse holds the store, wait up to this long for it to end, then "
             f"pulse (0: do not wait); still held then: exit {PULSE_RUNNING_EXIT}")] = PULSE_WAIT_SECONDS,
) -> None:
    """Pulse now (as `certutil -pulse`): a running daemon is woken; otherwise pulse here, after
    any one-shot pulse in progress. `--plan` takes no lock and changes nothing."""
    directory = resolve_dir(dir_)
    config = load_config(directory)
    lock = AgentLock(directory)
    if not plan_only:
        pid = _take_store(lock, wait)
        if pid is not None:
            console.print(f"asked the running agent (pid {pid}) to pulse now")
            return
    try:
        agent = Agent(directory, config)
    except LOCAL_ERRORS as exc:
        lock.release()
        _not_recorded(f"the pulse cannot run: {describe(exc, directory / 'store')[1]}")
    except Refusal as exc:
        lock.release()
        if not store_unreachable(exc):
            raise
        _not_recorded(f"the pulse cannot run: {describe(exc, directory / 'store')[1]}")
    except BaseException:
        lock.release()
        raise
    try:
        now = clock.now()
        if plan_only:
            try:
                plan = agent.plan(now, force_policy=refresh_policy)
            except ServerUnavailable as exc:
                raise _unavailable(exc) from None
            except LOCAL_ERRORS as exc:  # --plan repairs nothing: it says what `agent pulse` would find
                raise Refusal(Reason.STORE, describe(exc, agent.store.root)[1]) from None
            if json_:
                emit_json({"actions": [a.to_dict() for a in plan.actions],
                           "notes": [n.__dict__ for n in plan.notes]})
                return
            table("Plan", ["#", "action", "rule", "template", "thumbprint", "issuers", "detail"],
                  [(i + 1, a.kind.value, a.rule, a.template, (a.thumbprint or "")[:12], ", ".join(a.issuers), a.detail)
                   for i, a in enumerate(plan.actions)])
            if plan.notes:
                table("Not done", ["rule", "template", "detail"], [(n.rule, n.template, n.detail) for n in plan.notes])
            return
        try:
            result = agent.pulse(now, force_policy=refresh_policy)
        except PulseNotRecorded as exc:
            _not_recorded(str(exc))
        finally:
            lock.release()
        _print_result(result, json_)  # the pulse is over: tasks run after it is reported
        try:
            deliver_tasks(directory, config, agent.store)
        except LOCAL_ERRORS as exc:  # the pulse is reported and recorded; the tasks try again next time
            err_console.print(fail_line(f"certpulse: warning: rebind and notification tasks not run: "
                                        f"{describe(exc, agent.store.root)[1]}"), markup=False, soft_wrap=True)
    finally:
        agent.close()
    if result.outcome == "failed":
        raise typer.Exit(1)


def _not_recorded(message: str) -> NoReturn:
    """A pulse whose outcome the store cannot hold: said here, since nothing else will say it,
    with its own exit status (74, the I/O error of sysexits), never an internal error."""
    err_console.print(fail_line(f"certpulse: error: store: {message}"), markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_NOT_RECORDED)


@agent_app.command("run")
def agent_run(
    dir_: AgentDir = None,
    pulses: Annotated[int | None, typer.Option("--pulses", min=1, help="Stop after this many pulses")] = None,
    metrics_listen: Annotated[str | None, typer.Option(
        "--metrics-listen", metavar="HOST:PORT",
        help="Also serve Prometheus metrics on HOST:PORT (unauthenticated: use 127.0.0.1)")] = None,
) -> None:
    """Run the daemon: pulse at start, then every refresh interval; SIGHUP pulses now."""

    from certpulse.agent.metrics import AgentCollector, MetricsServer, parse_listen
    from certpulse.display import PrintableFormatter

    def start_logging() -> None:
        # Messages carry names and problem details from the CA: logged by the printable rule.
        handler = logging.StreamHandler()
        handler.setFormatter(PrintableFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])

    if metrics_listen is not None:
        parse_listen(metrics_listen)  # a malformed address is refused before anything starts
    directory = resolve_dir(dir_)
    config = load_config(directory)
    if metrics_listen is None:
        start_logging()
        run(directory, config, max_pulses=pulses)
        return
    # Refuse a second daemon before taking its port, so that it says "another agent is running"
    # rather than "address in use"; run() takes the lock again for good. Logging starts once the
    # port is ours, so that a refusal is the only line printed. Not as a daemon: nothing handles
    # SIGHUP yet.
    probe = AgentLock(directory)
    probe.acquire(Role.PULSE, clock.now())
    probe.release()
    collector = AgentCollector(directory, config, clock.now)
    try:
        server = MetricsServer(collector, metrics_listen)
        try:
            start_logging()
            run(directory, config, max_pulses=pulses)
        finally:
            server.close()
    finally:
        collector.close()


@agent_app.command("repair")
def agent_repair(dir_: AgentDir = None, json_: JsonOption = False) -> None:
    """Rebuild the store's records from its certificate folders after meta.db was lost or damaged:
    a damaged meta.db is moved aside, every folder without a record whose certificate and key belong
    together is re-imported with its key, and each folder that cannot be is named with the reason
    (exit 1). Deletes nothing; running it again changes nothing. Refused while the agent runs."""
    directory = resolve_dir(dir_)
    config = load_config(directory)
    lock = AgentLock(directory)
    lock.acquire(Role.PULSE, clock.now())  # one-shot like a pulse: waited for, never signalled
    try:
        report = repair_store(directory, config, clock.now(),
                              then=lambda store: deliver_tasks(directory, config, store))
    finally:
        lock.release()
    if json_:
        emit_json(report.to_dict())
    else:
        if report.moved_aside:
            console.print(f"moved the damaged database aside to {shown(report.moved_aside)}")
        console.print(f"re-imported {len(report.imported)} certificate(s)")
        if report.imported:
            table("Re-imported", ["thumbprint", "template", "key", "not after"],
                  [(r["thumbprint"], r["template"] or "", "yes" if r["has_key"] else "no", r["not_after"])
                   for r in report.imported])
        if report.not_imported:
            table("Not imported (left as they are)", ["folder", "reason"],
                  [(r["folder"], r["reason"]) for r in report.not_imported])
        if report.request_keys_without_record:
            console.print(f"{report.request_keys_without_record} request key(s) in flights/ have no record: "
                          "the next pulse removes them")
    if report.not_imported:
        raise typer.Exit(1)


@agent_app.command("metrics")
def agent_metrics(dir_: AgentDir = None) -> None:
    """Print the agent's Prometheus metrics (text exposition) from its folder; contacts no server."""
    from prometheus_client import generate_latest

    from certpulse.agent.metrics import AgentCollector, registry_for

    directory = resolve_dir(dir_)
    collector = AgentCollector(directory, load_config(directory), clock.now)
    try:
        text = generate_latest(registry_for(collector))
    finally:
        collector.close()
    sys.stdout.write(text.decode())


@agent_app.command("status")
def agent_status(dir_: AgentDir = None, json_: JsonOption = False) -> None:
    """The last pulse, its outcome, the next one, and every certificate with its renewal time."""
    with agent_store(dir_) as (directory, config, store):
        now = clock.now()
        last = store.get_state("last_pulse")
        next_pulse = store.get_state("next_pulse")
        holder = AgentLock(directory).holder()
        running = holder.pid if holder is not None and holder.role is Role.DAEMON else None
        pulsing = holder if holder is not None and holder.role is Role.PULSE else None
        templates = cached_templates(config.servers, store.get_state, now)
        rows = []
        for record in store.certificates(include_archived=False):
            try:
                due = planned_renewal(record, store.certificate(record.thumbprint), templates, now)
            except (OSError, ValueError):  # damaged files: the next pulse repairs them or says why not
                due = None
            rows.append({**record.to_dict(), "renewal_time": due.isoformat() if due else None})
        pending = [{"request_id": f.request_id, "template": f.template_name, "status": f.status,
                    "submitted_at": (f.submitted_at or f.created_at).isoformat()} for f in store.flights()]
        bindings = [b.to_dict() for b in list_bindings(store)]
        skew = store.get_state(skew_state)
    status = {"daemon_pid": running, "pulse_running": {"pid": pulsing.pid, "since": pulsing.since} if pulsing else None,
              "last_pulse": last, "next_pulse": next_pulse, "certificates": rows,
              "pending": pending, "bindings": bindings, "clock_skew": skew}
    if json_:
        emit_json(status)
        return
    console.print(f"daemon: {'running, pid ' + str(running) if running else 'not running'}")
    if pulsing is not None:
        console.print(f"pulse running: {shown(pulsing.describe())} (a one-shot agent pulse)")
    if last:
        console.print(f"last pulse: {shown(last['started_at'])} [bold]{shown(last['outcome'])}[/bold]"
                      + (f" ({shown(last['error'])})" if last.get("error") else ""))
    else:
        console.print("last pulse: never")
    console.print(f"next pulse: {shown(next_pulse or 'when the daemon starts, or on agent pulse')}")
    if isinstance(skew, dict) and isinstance(skew.get("offset_seconds"), int | float):
        offset = dt.timedelta(seconds=skew["offset_seconds"])
        line = f"clock: {describe_skew(offset)} (measured {shown(skew.get('measured_at'))})"
        console.print(f"[bold]{line}; check the clock[/bold]" if skew.get("exceeded") else line)
    table("Certificates", ["thumbprint", "template", "version", "source", "not after", "renewal time"],
          [(r["thumbprint"], r["template_name"], f"{r['major_version']}.{r['minor_version']}", r["source"],
            r["not_after"], r["renewal_time"] or "") for r in rows])
    if pending:
        table("Pending requests", ["request", "template", "status", "submitted"],
              [(p["request_id"], p["template"], p["status"], p["submitted_at"]) for p in pending])
    attention = [b for b in bindings if b["state"] != "ok" or b["verdict"] not in (None, "ok")]
    if attention:
        table("Bindings needing attention", ["binding", "state", "check", "serves", "moving to", "last error"],
              [(b["name"], "renewed but not deployed" if b["state"] == "failed" else b["state"], b["verdict"] or "",
                (b["thumbprint"] or "")[:16], (b["target"] or "")[:16], b["last_error"] or "") for b in attention])


# -- cert -------------------------------------------------------------------------------------

@cert_app.command("list")
def cert_list(
    dir_: AgentDir = None,
    all_: Annotated[bool, typer.Option("--all", help="Include archived certificates")] = False,
    json_: JsonOption = False,
) -> None:
    """List the personal store."""
    with agent_store(dir_) as (_, _, store):
        records = store.certificates(include_archived=all_)
    if json_:
        emit_json([r.to_dict() for r in records])
        return
    table("Certificates", ["thumbprint", "template", "subject", "not after", "source", "archived"],
          [(r.thumbprint, r.template_name, r.subject, r.not_after.isoformat(), r.source, "yes" if r.archived else "")
           for r in records])


@cert_app.command("show")
def cert_show(thumbprint: str, dir_: AgentDir = None, json_: JsonOption = False) -> None:
    """Show one certificate (any unique thumbprint prefix)."""
    with agent_store(dir_) as (_, _, store):
        record = store.find(thumbprint)
        folder = store.folder(record.thumbprint)
    data = {**record.to_dict(), "folder": str(folder)}
    if json_:
        emit_json(data)
        return
    print_fields(*data.items())


@cert_app.command("request")
def cert_request(
    template: Annotated[str, typer.Option("--template")],
    dir_: AgentDir = None,
    subject: Annotated[str | None, typer.Option("--subject", help="RFC 4514 subject, e.g. CN=web.example")] = None,
    san: Annotated[list[str] | None, typer.Option("--san", help="dns:NAME, ip:ADDR or email:ADDR (repeat)")] = None,
    json_: JsonOption = False,
) -> None:
    """Enroll by hand (the seeds' certreq): the certificate is marked manually enrolled."""
    agent = _open(dir_)
    try:
        outcome = request_certificate(agent, template, clock.now(), subject=subject, sans=san or [])
        deliver_tasks(agent.directory, agent.config, agent.store)
    except ServerUnavailable as exc:
        raise _unavailable(exc) from None
    finally:
        agent.close()
    if json_:
        emit_json(outcome.to_dict())
    else:
        console.print(f"{shown(outcome.outcome)}: {shown(outcome.detail)}")
    if outcome.outcome in ("refused", "unavailable"):
        raise Refusal(Reason.FORBIDDEN if outcome.outcome == "refused" else Reason.UNAVAILABLE, outcome.detail)


@cert_app.command("import")
def cert_import(
    file: Path,
    dir_: AgentDir = None,
    password: Annotated[str | None, typer.Option("--password", help="PKCS#12 password")] = None,
) -> None:
    """Import a PKCS#12 file (key and certificate) as a manually enrolled certificate."""
    with agent_store(dir_) as (directory, config, store):
        record = import_p12(store, config, file, password, clock.now())
        deliver_tasks(directory, config, store)
    console.print(f"[green]imported {shown(record.thumbprint)}[/green] ({shown(record.subject)})")


@cert_app.command("export")
def cert_export(
    thumbprint: str,
    p12: Annotated[Path | None, typer.Option("--p12", help="PKCS#12 file to write, with the key (0600)")] = None,
    pem_: Annotated[Path | None, typer.Option("--pem", help="PEM file to write: certificate and chain, no key")] = None,
    dir_: AgentDir = None,
    password: Annotated[str | None, typer.Option("--password", help="Asked for when not given")] = None,
) -> None:
    """Export a certificate: with its private key to PKCS#12 (event 1007), or without it to PEM."""
    if (p12 is None) == (pem_ is None):
        raise Refusal(Reason.INVALID_ARGUMENT, "give exactly one of --p12 (with the key) or --pem (without)")
    if p12 is not None and password is None:
        password = typer.prompt("PKCS#12 password", hide_input=True, confirmation_prompt=True)
    with agent_store(dir_) as (directory, config, store):
        if p12 is not None:
            record = export_p12(store, thumbprint, p12, password or "", clock.now())
            deliver_tasks(directory, config, store)
        else:
            assert pem_ is not None
            record = export_pem(store, thumbprint, pem_)
    console.print(f"[green]exported {shown(record.thumbprint)}[/green] to {shown(p12 or pem_)}")


@cert_app.command("delete")
def cert_delete(
    thumbprint: str,
    dir_: AgentDir = None,
    force: Annotated[bool, typer.Option("--force", help="Even when a binding still serves it")] = False,
) -> None:
    """Delete a certificate and its key from the store (event 1004)."""
    with agent_store(dir_) as (directory, config, store):
        record = store.delete(thumbprint, clock.now(), action="manual", force=force)
        deliver_tasks(directory, config, store)
    console.print(f"[yellow]deleted {shown(record.thumbprint)}[/yellow] ({shown(record.subject)})")


@cert_app.command("replace")
def cert_replace(old: str, new: str, dir_: AgentDir = None) -> None:
    """Replace OLD by NEW (the seed's Replace-Certificate): OLD is archived, event 1001 (action replace)."""
    with agent_store(dir_) as (directory, config, store):
        old_record, new_record = store.replace(old, new, clock.now())
        deliver_tasks(directory, config, store)
    console.print(f"[green]{shown(old_record.thumbprint)} replaced by {shown(new_record.thumbprint)}[/green]")


@cert_app.command("move")
def cert_move(
    thumbprint: str,
    to: Annotated[Path, typer.Option("--to", help="The other agent's folder")],
    dir_: AgentDir = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy: keep it here too")] = False,
) -> None:
    """Move (or copy) a certificate with its key to another agent's store (events 1006 there, 1004 here)."""
    with agent_store(dir_) as (directory, config, store), agent_store(to) as (target_dir, target_config, target):
        record = move_certificate(store, thumbprint, target, clock.now(), copy=copy)
        deliver_tasks(directory, config, store)
        deliver_tasks(target_dir, target_config, target)
    console.print(f"[green]{'copied' if copy else 'moved'} {shown(record.thumbprint)}[/green] to {shown(to)}")


__all__ = ["agent_app", "cert_app", "default_dir"]

"""``certpulse binding``: the consumers of certificates, rebound when a certificate is replaced
(the seed's ``appcmd renew binding``), and the drift check that finds listeners still serving a
replaced certificate (the seed's WinRM case)."""

from __future__ import annotations

from typing import Annotated

import typer

from certpulse import clock
from certpulse.cli.agent_commands import AgentDir, JsonOption, agent_store
from certpulse.cli.output import console, emit_json, print_fields, shown, table
from certpulse.errors import Reason, Refusal
from certpulse.rebind import engine
from certpulse.rebind.bindings import add_binding, get_binding, list_bindings, remove_binding
from certpulse.rebind.deployers.base import get_deployer
from certpulse.rebind.probe import parse_probe

binding_app = typer.Typer(help="Bindings: services that use a certificate, rebound on renewal", no_args_is_help=True)
NameArgument = Annotated[str, typer.Argument(help="The binding's name")]


def _options(pairs: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Refusal(Reason.INVALID_ARGUMENT, f"--opt {pair!r} is not KEY=VALUE")
        options[key] = value if key not in options else f"{options[key]}\n{value}"
    return options


def _report(outcome: engine.Outcome) -> None:
    colour = "green" if outcome.ok else "red"
    console.print(f"[{colour}]{shown(outcome.binding)}: {'ok' if outcome.ok else 'not deployed'}[/{colour}] "
                  f"{shown(outcome.detail)}", soft_wrap=True)


@binding_app.command("add")
def binding_add(
    name: NameArgument,
    kind: Annotated[str, typer.Option("--kind", help="files | nginx | haproxy | command, or a plugin's kind")],
    cert: Annotated[str | None, typer.Option("--cert", help="Bind this certificate (thumbprint prefix)")] = None,
    template: Annotated[str | None, typer.Option("--template", help="Follow this template's newest certificate")]
    = None,
    opt: Annotated[list[str] | None, typer.Option("--opt", help="KEY=VALUE for the kind (repeat)")] = None,
    probe: Annotated[str | None, typer.Option("--probe", help="HOST:PORT[,sni=NAME] that must serve it")] = None,
    auto: Annotated[bool, typer.Option("--auto/--no-auto", help="Rebind by itself on renewal")] = True,
    dir_: AgentDir = None,
) -> None:
    """Record that a service uses a certificate, and deploy it there now."""
    if (cert is None) == (template is None):
        raise Refusal(Reason.INVALID_ARGUMENT, "give exactly one of --cert THUMBPRINT or --template NAME")
    if probe is not None:
        parse_probe(probe)
    options = get_deployer(kind)().parse_options(_options(opt or []))
    now = clock.now()
    with agent_store(dir_) as (_, _, store):
        engine.ensure_cursor(store)
        first = engine.initial_certificate(store, template, cert)
        binding = add_binding(store, name=name, kind=kind, template=template,
                              thumbprint=first.thumbprint if first else None, options=options, probe=probe,
                              auto=auto, now=now)
        if first is None:
            console.print(f"binding {shown(name)} waits for a certificate of template {shown(template or '')}")
            return
        outcome = engine.deploy(store, binding, first.thumbprint, now)
    _report(outcome)
    if not outcome.ok:
        raise typer.Exit(1)


@binding_app.command("list")
def binding_list(dir_: AgentDir = None, json_: JsonOption = False) -> None:
    """Every binding: what it serves, what it should move to, and its state."""
    with agent_store(dir_) as (_, _, store):
        found = list_bindings(store)
    if json_:
        emit_json([b.to_dict() for b in found])
        return
    table("Bindings", ["name", "kind", "follows", "serves", "moving to", "state", "check", "last error"],
          [tuple(v or "" for v in (
              b.name, b.kind, b.template or "(certificate)", (b.thumbprint or "")[:16], (b.target or "")[:16],
              "renewed but not deployed" if b.state == "failed" else b.state, b.verdict, b.last_error))
           for b in found])


@binding_app.command("show")
def binding_show(name: NameArgument, dir_: AgentDir = None, json_: JsonOption = False) -> None:
    """One binding, with its options and the output of its last deployment."""
    with agent_store(dir_) as (_, _, store):
        data = get_binding(store, name).to_dict()
    if json_:
        emit_json(data)
        return
    print_fields(*data.items())


@binding_app.command("remove")
def binding_remove(name: NameArgument, dir_: AgentDir = None) -> None:
    """Forget a binding (its deployed files stay where they are)."""
    now = clock.now()
    with agent_store(dir_) as (_, _, store):
        binding = remove_binding(store, name)
        if binding.thumbprint:
            store.release(binding.thumbprint, now)  # a replaced certificate it held is archived now
    console.print(f"binding {shown(name)} removed")


@binding_app.command("renew")
def binding_renew(
    old: Annotated[str, typer.Option("--old", help="Thumbprint the bindings serve now")],
    new: Annotated[str, typer.Option("--new", help="Thumbprint to move them to")],
    dir_: AgentDir = None,
) -> None:
    """Move every binding that serves OLD to NEW now (appcmd renew binding /oldcert /newcert)."""
    with agent_store(dir_) as (_, _, store):
        outcomes = engine.renew(store, old, new, clock.now())
    if not outcomes:
        console.print("no binding serves that certificate")
    for outcome in outcomes:
        _report(outcome)
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


@binding_app.command("deploy")
def binding_deploy(name: NameArgument, dir_: AgentDir = None) -> None:
    """Deploy a binding's certificate again now (its target, when it has not reached it yet)."""
    with agent_store(dir_) as (_, _, store):
        binding = get_binding(store, name)
        thumbprint = binding.target or binding.thumbprint
        if thumbprint is None:
            raise Refusal(Reason.CONFLICT, f"binding {name} has no certificate yet")
        outcome = engine.deploy(store, binding, thumbprint, clock.now())
    _report(outcome)
    if not outcome.ok:
        raise typer.Exit(1)


@binding_app.command("check")
def binding_check(
    names: Annotated[list[str] | None, typer.Argument(help="Only these bindings")] = None,
    dir_: AgentDir = None,
    json_: JsonOption = False,
) -> None:
    """Connect to every probed endpoint: configured, served and newest valid certificate, and a
    verdict (ok, stale, mismatch, unreachable). Exit status 1 when any is not ok."""
    with agent_store(dir_) as (_, _, store):
        results = engine.check(store, clock.now(), names=names)
    if json_:
        emit_json([r.to_dict() for r in results])
    else:
        table("Binding check", ["binding", "configured", "served", "newest", "verdict", "detail"],
              [tuple(v or "" for v in (r.binding, (r.configured or "")[:16], (r.served or "")[:16],
                                                     (r.newest or "")[:16], r.verdict, r.detail)) for r in results])
    if any(r.verdict != "ok" for r in results):
        raise typer.Exit(1)

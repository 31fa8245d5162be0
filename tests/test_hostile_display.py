"""What a principal sends never controls the operator's screen.

A value holding Rich markup (``[/]``, ``[bold red]``), an emoji code, terminal control sequences
(CSI colour, an OSC that sets the window title, a carriage return, a C1 CSI), bidi overrides and
a zero-width joiner is sent to a real CA over HTTP as a template name, a subject, a deny reason,
and put into the agent's store as a certificate's subject; then every command that prints such
values is run through the real CLI, with a wide and a narrow terminal. Each must exit as it
should, without a traceback, with no control or format character in what it writes, and with the
value still visible in its escaped form (``\\x1b``, ``\\u202e``: see ``certpulse.display``).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from agent_support import Agent, new_agent
from support import CA, TEMPLATES, Client, make_csr, new_key, root_trust, run_cli

# Markup, an emoji code, CSI (ESC [), OSC (ESC ]) ended by BEL, CR, RLO, LRI, C1 CSI, ZWJ.
HOSTILE = "[/]x[bold red]y\x1b[31mz\x1b]0;t\x07\r\u202e\u2066\x9b\u200d:skull:"
ESCAPED = "[/]x[bold red]y\\x1b[31mz\\x1b]0;t\\x07\\r\\u202e\\u2066\\x9b\\u200d:skull:"
MARKUP = "[/]x[bold red]y"  # the markup part alone: text no rule refuses
# In a subject, RFC 4514 writes the ";" as "\;": these pieces of ESCAPED survive that.
PIECES = (MARKUP, "\\x1b[31mz\\x1b]0", "t\\x07\\r\\u202e\\u2066\\x9b\\u200d:skull:")
WIDE, NARROW = "500", "40"


# -- the rule -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "shown"), [
    ("web01.example.internal", "web01.example.internal"),
    ("CN=a\\,b", "CN=a\\,b"),  # a backslash is shown as it is (RFC 4514 escapes stay readable)
    ("[bold red]x[/]", "[bold red]x[/]"),  # markup is not this rule's business: the printers show it as text
    ("\x1b[31mred", "\\x1b[31mred"),
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
    ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
    ("\x00\x7f", "\\x00\\x7f"),
    ("\x85\x9b\x9d", "\\x85\\x9b\\x9d"),  # C1: NEL, CSI, OSC
    ("abc\u202egpj.exe", "abc\\u202egpj.exe"),
    ("\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069", "\\u202a\\u202b\\u202c\\u202d\\u2066\\u2067\\u2068\\u2069"),
    ("\u200b\u200c\u200d\u200e\u200f\ufeff", "\\u200b\\u200c\\u200d\\u200e\\u200f\\ufeff"),
    ("\u2028\u2029\u00a0", "\\u2028\\u2029\\xa0"),
    ("\ud800", "\\ud800"),  # a lone surrogate (from surrogateescape) would not even encode
    ("\U000e0041", "\\U000e0041"),  # a tag character
    ("Zürich, 東京, émoji 🔒", "Zürich, 東京, émoji 🔒"),
    (42, "42"),
])
def test_printable_escapes_what_a_terminal_would_act_on(given: object, shown: str) -> None:
    from certpulse.display import printable

    assert printable(given) == shown
    assert printable(shown) == shown  # idempotent: escaping twice changes nothing


def test_printable_lines_keeps_line_breaks_only() -> None:
    from certpulse.display import printable_lines

    assert printable_lines("one\x1b[2J\ntwo\r\n\tthree\n") == "one\\x1b[2J\ntwo\\r\n\\tthree\n"


def test_fail_line_is_one_printable_line() -> None:
    from certpulse.cli.output import fail_line

    assert fail_line("certpulse: error: x:  a\nb\r\n\tc  ") == "certpulse: error: x: a b c"
    assert fail_line("no template named '\x1b]0;t\x07\u202e'") == "no template named '\\x1b]0;t\\x07\\u202e'"
    assert fail_line("a\x85b\u2028c") == "a\\x85b\\u2028c"  # not taken for white space and dropped


def test_printers_show_markup_as_text_and_escape_controls(capsys: pytest.CaptureFixture[str]) -> None:
    from certpulse.cli import output

    output.table(f"Title {HOSTILE}", ["name", "value"], [(HOSTILE, None), ("plain", 7)])
    output.print_fields(("subject", HOSTILE), ("names", [HOSTILE, "b"]), ("missing", None))
    output.console.print(f"[green]added {output.shown(HOSTILE)}[/green]")
    output.print_lines(f"line one {HOSTILE}\nline two\n")
    out = capsys.readouterr().out
    assert all(line.isprintable() for line in out.split("\n")), out
    assert out.count(ESCAPED) == 6, out  # title, cell, two fields, the markup line, print_lines
    assert f"subject: {ESCAPED}\n" in out
    assert f"names: {ESCAPED}, b\n" in out
    assert "missing" not in out
    assert "\U0001f480" not in out  # ":skull:" is not an emoji code here


def test_a_long_table_escapes_like_a_short_one(capsys: pytest.CaptureFixture[str]) -> None:
    from certpulse.cli import output

    rows = [(str(n), f"CN=host-{n}") for n in range(output.PLAIN_TABLE_ROWS + 1)] + [("x", HOSTILE)]
    output.table("Many", ["n", "subject"], rows)
    lines = capsys.readouterr().out.split("\n")
    assert all(line.isprintable() for line in lines)
    assert lines[-2].split(maxsplit=1) == ["x", ESCAPED]


def test_json_output_carries_no_raw_control_character(capsys: pytest.CaptureFixture[str]) -> None:
    from certpulse.cli import output

    output.emit_json({"subject": HOSTILE})
    out = capsys.readouterr().out
    assert out.isascii() and all(line.isprintable() for line in out.split("\n"))
    assert json.loads(out) == {"subject": HOSTILE}  # and it is still the exact value


def test_log_lines_follow_the_rule() -> None:
    from certpulse.display import PrintableFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrintableFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("certpulse.test.hostile")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("refusing the certificate for %s: %s", HOSTILE, "detail\nsecond line")
        try:
            raise ValueError(f"bad {HOSTILE}")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().split("\n")
    assert lines[0] == f"WARNING refusing the certificate for {ESCAPED}: detail\\nsecond line"
    assert lines[1] == "ERROR failed"
    assert lines[2].startswith("Traceback")  # the traceback keeps its lines...
    assert f"ValueError: bad {ESCAPED}" in lines  # ...each escaped
    assert all(line.isprintable() for line in lines)


def test_syslog_gets_one_printable_line_per_event() -> None:
    from certpulse.machine.events import Event
    from certpulse.machine.syslog import SyslogForwarder

    folder = Path(tempfile.mkdtemp(prefix="cp-syslog-", dir="/tmp"))  # a socket path must be short
    address = folder / "log"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(30)
    try:
        forward = SyslogForwarder(str(address))
        forward([Event(seq=1, event_id=1006, channel="system", time=dt.datetime.now(dt.UTC), uid=0,
                       action="import", old=None, new=None, template=HOSTILE, detail=f"line one\n{HOSTILE}",
                       data={})])
        message = receiver.recv(65536).decode()
    finally:
        receiver.close()
        address.unlink(missing_ok=True)
        folder.rmdir()
    assert message.rstrip("\x00").isprintable(), message
    assert f"template={ESCAPED} line one\\n{ESCAPED}" in message


# -- through the real CA and the real CLI -------------------------------------------------------

def _assert_clean(result: subprocess.CompletedProcess[str], *, code: int = 0) -> str:
    """Exit status, no traceback, and nothing but printable characters on each line written."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    written = result.stdout + result.stderr
    assert "Traceback" not in written, written
    bad = [line for line in written.split("\n") if not line.isprintable()]
    assert bad == [], bad
    return written


def _strings(data: Any) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        data = list(data.values())
    return [s for item in data for s in _strings(item)] if isinstance(data, list | tuple) else []


def _holds(data: Any) -> bool:
    """Whether JSON output holds the hostile text as it was sent (not a refusal's repr of it)."""
    return any("\x1b[31mz" in text for text in _strings(data))


def _visible(out: str) -> bool:
    """Whether the hostile text is in ``out`` whole, in its escaped form."""
    return all(piece in out for piece in PIECES)


def _cli(ca: CA, *args: str, columns: str, code: int = 0) -> str:
    result = run_cli(*args, "--dir", str(ca.dir), check=False, env={"COLUMNS": columns})
    return _assert_clean(result, code=code)


def _json(ca: CA, *args: str) -> Any:
    return json.loads(ca.cli(*args, "--json").stdout)


def _one_line_error(written: str) -> str:
    lines = written.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("certpulse: error: "), written
    return lines[0]


@pytest.fixture(scope="module")
def hostile(pki: CA, ca_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Hostile values put into the CA as a principal (and a manager over HTTP) could: whatever
    the CA accepts or refuses is stored, audited, or both."""
    folder = tmp_path_factory.mktemp("hostile")
    # A template whose display name is hostile (TOML takes JSON's string escapes).
    text = (TEMPLATES / "webserver.toml").read_text()
    text = text.replace('name = "webserver"', 'name = "hostile-display"')
    text = text.replace('display_name = "Web server"', f"display_name = {json.dumps(HOSTILE)}")
    (folder / "hostile.toml").write_text(text)
    added = pki.cli("template", "add", str(folder / "hostile.toml"), check=False)
    _assert_clean(added, code=added.returncode)

    token = pki.add_principal("hostile-web.example.internal", "--group", "webservers", "--group", "approvers")
    principal = Client.enrolled(ca_url, token, verify=root_trust(pki))
    submitted: dict[str, int] = {}
    # 1. an unknown template named with the hostile text (audited with the name asked for)
    ordinary_csr = make_csr(cn="hostile-web.example.internal")[1]
    submitted["unknown template"] = principal.submit(HOSTILE, ordinary_csr).status_code
    # 2. a hostile organisation in a subject the template takes from the request
    key = new_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web1.example.internal"),
                                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, HOSTILE)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("web1.example.internal")]), critical=False)
           .sign(key, hashes.SHA256()))
    submitted["hostile O"] = principal.submit(
        "webserver", csr.public_bytes(serialization.Encoding.PEM).decode()).status_code
    # 3. a hostile common name and DNS name (refused: the refusal's detail echoes them)
    for what, build in (("hostile CN", lambda: make_csr(cn=HOSTILE, dns=["web2.example.internal"])),
                        ("hostile DNS", lambda: make_csr(dns=[HOSTILE.replace(" ", "") + ".example.internal"]))):
        try:
            submitted[what] = principal.submit("webserver", build()[1]).status_code
        except ValueError:  # the CSR library refused to build it: nothing to send
            submitted[what] = 0
    # 4. a request waiting for approval, denied by a manager with a hostile reason
    pending = principal.submit("approval-required", make_csr(cn="hostile-web.example.internal")[1])
    assert pending.status_code == 202, pending.text
    request_id = pending.json()["id"]
    admin = httpx.Client(base_url=ca_url, headers={"Authorization": f"Bearer {pki.admin_key}"}, timeout=30,
                         verify=root_trust(pki))
    denied = admin.post(f"/v1/requests/{request_id}/deny", json={"reason": HOSTILE})
    if denied.status_code != 200:  # a rule against control characters: the markup alone then
        denied = admin.post(f"/v1/requests/{request_id}/deny", json={"reason": MARKUP})
    assert denied.status_code == 200, denied.text
    return {"submitted": submitted, "denied": request_id}


def test_ca_commands_show_hostile_values_as_text(pki: CA, hostile: dict[str, Any]) -> None:
    """Every server-side command that prints names, subjects, reasons or audit details, on a
    terminal wide enough to show each value whole."""
    entries = _json(pki, "audit", "--limit", "1000")
    out = _cli(pki, "audit", "--limit", "1000", columns=WIDE)
    assert MARKUP in out  # the deny reason, at least, is there and shown as text
    if _holds([(e["template"], e["detail"]) for e in entries]):
        assert _visible(out)

    requests = _json(pki, "request", "list")
    listed = _cli(pki, "request", "list", columns=WIDE)
    assert _visible(listed) == _holds([(r["template"], r["requester"], r["names"]) for r in requests])
    _cli(pki, "request", "list", "--status", "denied", columns=WIDE)
    for request in requests:
        out = _cli(pki, "request", "show", str(request["id"]), columns=WIDE)
        if request["id"] == hostile["denied"]:
            assert MARKUP in out
        if _holds(request):
            assert _visible(out), (request, out)
            if request["status"] == "issued":  # the certificate's status shows its subject too
                serial = _json(pki, "request", "show", str(request["id"]))["serial"]
                assert _visible(_cli(pki, "status", serial, columns=WIDE))
    if hostile["submitted"]["hostile O"] == 201:  # the CA took the organisation: it was shown above
        assert any(_holds(r) and r["status"] == "issued" for r in requests)

    _cli(pki, "template", "list", columns=WIDE)
    _cli(pki, "principal", "list", columns=WIDE)
    _cli(pki, "ca", "issuers", columns=WIDE)
    if any(t["name"] == "hostile-display" for t in _json(pki, "template", "list")):
        out = _cli(pki, "template", "show", "hostile-display", columns=WIDE)
        assert MARKUP in out


def test_ca_commands_on_a_narrow_terminal(pki: CA, hostile: dict[str, Any]) -> None:
    """Rich wraps and cuts cells to fit: still nothing but printable text, and no crash."""
    _cli(pki, "audit", "--limit", "1000", columns=NARROW)
    _cli(pki, "request", "list", columns=NARROW)
    _cli(pki, "request", "show", str(hostile["denied"]), columns=NARROW)
    _cli(pki, "template", "list", columns=NARROW)


def test_refusals_that_echo_a_hostile_name_are_one_clean_line(pki: CA, hostile: dict[str, Any]) -> None:
    for args in (("template", "show", HOSTILE), ("principal", "add", HOSTILE), ("ca", "set-issuer", HOSTILE)):
        line = _one_line_error(_cli(pki, *args, columns=WIDE, code=2))
        assert MARKUP in line and "\\x1b[31m" in line, line


# -- the agent's side -------------------------------------------------------------------------

def _hostile_p12(folder: Path) -> Path:
    """A PKCS#12 file whose certificate's subject is the hostile text (a file is data too)."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTILE),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, MARKUP)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), critical=False)
            .sign(key, hashes.SHA256()))
    path = folder / "hostile.p12"
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"hostile", key, cert, None, serialization.BestAvailableEncryption(b"pw")))
    return path


@pytest.fixture(scope="module")
def hostile_agent(pki: CA, ca_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Agent, str]:
    folder = tmp_path_factory.mktemp("hostile-agent")
    agent = new_agent(pki, ca_url, folder / "agent", "webservers")
    agent.pulse()
    imported = agent.run("cert", "import", str(_hostile_p12(folder)), "--password", "pw",
                         env={"COLUMNS": WIDE})
    assert _visible(_assert_clean(imported))
    thumbprint = next(c["thumbprint"] for c in agent.certs() if _holds(c))
    return agent, thumbprint


def test_agent_store_commands(hostile_agent: tuple[Agent, str]) -> None:
    agent, thumbprint = hostile_agent

    def run(*args: str, columns: str = WIDE) -> str:
        return _assert_clean(agent.run(*args, check=False, env={"COLUMNS": columns}))

    assert _visible(run("cert", "list"))
    assert _visible(run("cert", "list", "--all"))
    shown = run("cert", "show", thumbprint)
    assert "subject: OU=[/]x[bold red]y,CN=[/]x[bold red]y\\x1b[31mz" in shown and _visible(shown)
    run("agent", "status")
    run("agent", "pulse", "--plan")
    metrics = run("agent", "metrics")  # the subject is a label: printable, then in Prometheus' escapes
    assert 'CN=[/]x[bold red]y\\\\x1b[31mz' in metrics, metrics
    events = run("events")
    if _holds([(e["template"], e["detail"]) for e in json.loads(run("events", "--json"))]):
        assert _visible(events)
    for args in (("cert", "list"), ("agent", "status"), ("events",)):
        run(*args, columns=NARROW)


def test_agent_refusals_that_echo_a_hostile_name_are_one_clean_line(hostile_agent: tuple[Agent, str]) -> None:
    agent, _ = hostile_agent
    for args in (("cert", "request", "--template", HOSTILE), ("cert", "show", HOSTILE),
                 ("cert", "request", "--template", "webserver", "--subject", f"CN={MARKUP}\x1b[31m",
                  "--san", "dns:web3.example.internal")):
        result = agent.run(*args, check=False, env={"COLUMNS": WIDE})
        _assert_clean(result, code=2)
        line = _one_line_error(result.stderr)
        # the value echoed in escaped form, or refused without echoing it (the CA names the control
        # character instead, e.g. "holds the control character U+001B")
        assert "\\x1b" in line or MARKUP in line or "U+001B" in line, line


def test_deleting_a_certificate_with_a_hostile_subject(hostile_agent: tuple[Agent, str],
                                                      tmp_path: Path) -> None:
    agent, _ = hostile_agent
    # a second import of the same file: delete it by thumbprint and read what is said about it
    imported = agent.run("cert", "import", str(_hostile_p12(tmp_path)), "--password", "pw")
    thumbprint = next(c["thumbprint"] for c in agent.certs() if _holds(c) and c["thumbprint"] in imported.stdout)
    out = _assert_clean(agent.run("cert", "delete", thumbprint, check=False, env={"COLUMNS": WIDE}))
    assert _visible(out)

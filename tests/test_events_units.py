"""The pure parts of lifecycle events: the expiry monitor as a table of cases (no clock, no
network), and the event log's own rules on a real SQLite store (sequence numbers, transactions,
retention)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from certpulse.agent import gather
from certpulse.agent.config import AgentConfig, PolicyServerConfig, write_credential
from certpulse.agent.expiry import expiry_notices
from certpulse.agent.model import Options, StoredCertificate, StoreSnapshot, TemplatePolicy
from certpulse.agent.planner import Plan, plan
from certpulse.agent.pulse import Agent
from certpulse.agent.trust import ROOTS_NAME, PinFile
from certpulse.machine import cursors
from certpulse.machine import schema as et
from certpulse.machine.certstore import LocalStore
from certpulse.machine.events import CertFacts, EventDraft, EventId
from certpulse.machine.log import latest_seq, prune, read_events
from certpulse.pki import template_info
from certpulse.pki.keys import PrivateKey
from certpulse.sql.db import read, write
from pki_factory import Authority
from test_planner import DAY, NOW, YEAR, cert, manual, manual_tpl, server, tpl

AUTO = tpl("machine")
MANUAL = manual_tpl("web")
ENROLL_ONLY = tpl("enroll-only", rights=frozenset({"read", "enroll"}))
ON = Options()


def notices(certs: list[StoredCertificate], *, options: Options = ON, now: dt.datetime = NOW, percent: int = 10,
            raised: frozenset[tuple[str, str]] = frozenset()) -> list[tuple[str, str]]:
    snapshot = StoreSnapshot(certificates=tuple(certs))
    handled = plan(options, [server(AUTO, MANUAL, ENROLL_ONLY)], snapshot, now).handled
    found = expiry_notices(options, snapshot, now, handled=handled, warning_percent=percent, raised=raised)
    return [(n.thumbprint, n.threshold) for n in found]


# (id, certificates, options, expected (thumbprint, threshold) pairs)
CASES: list[tuple[str, list[StoredCertificate], Options, list[tuple[str, str]]]] = [
    ("plenty-left", [cert("a", None, left=100 * DAY, source="manual")], ON, []),
    ("no-template-close", [cert("a", None, left=30 * DAY, source="manual")], ON, [("a", "close")]),
    ("no-template-expired", [cert("a", None, left=-DAY, source="manual")], ON, [("a", "expired")]),
    ("exactly-ten-percent", [cert("a", None, left=YEAR / 10, source="manual")], ON, [("a", "close")]),
    ("just-above-ten-percent", [cert("a", None, left=YEAR / 10 + dt.timedelta(seconds=1), source="manual")], ON, []),
    ("autoenrolled-is-renewed-by-the-agent", [cert("a", AUTO, left=10 * DAY)], ON, []),
    ("autoenrolled-expired-is-replaced-by-the-agent", [cert("a", AUTO, left=-DAY)], ON, []),
    ("autoenroll-off", [cert("a", AUTO, left=10 * DAY)], Options(enroll=False), [("a", "close")]),
    ("disabled-agent-raises-nothing", [cert("a", None, left=10 * DAY)], Options(enabled=False), []),
    ("manual-renewed-with-manage", [manual("a", MANUAL, left=10 * DAY)], ON, []),
    ("manual-without-manage", [manual("a", MANUAL, left=10 * DAY)], Options(manage=False), [("a", "close")]),
    ("no-autoenroll-permission", [cert("a", ENROLL_ONLY, left=10 * DAY)], ON, [("a", "close")]),
    ("archived-is-not-watched", [cert("a", None, left=10 * DAY, source="manual", archived=True)], ON, []),
    ("older-copy-beside-a-newer-one", [cert("old", None, left=10 * DAY, source="manual"),
                                       cert("new", AUTO, left=300 * DAY)], ON, [("old", "close")]),
    ("older-copy-of-a-held-template", [cert("old", AUTO, left=10 * DAY), cert("new", AUTO, left=300 * DAY)],
     Options(enroll=False), []),
    ("additional-store-always-watched", [cert("a", AUTO, left=10 * DAY, source="manual", store="/etc/ssl/extra")],
     ON, [("a", "close")]),
    ("same-certificate-in-two-stores-once", [cert("a", None, left=10 * DAY, source="manual"),
                                             cert("a", None, left=10 * DAY, source="manual", store="/x")],
     ON, [("a", "close")]),
]


@pytest.mark.parametrize(("certs", "options", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_expiry_monitor(certs: list[StoredCertificate], options: Options, expected: list[tuple[str, str]]) -> None:
    assert notices(certs, options=options) == expected


def test_older_copy_of_a_template_held_by_a_newer_certificate_is_left_to_lapse() -> None:
    # Autoenrollment on: the newer certificate carries the template, the old copy is not renewed.
    assert notices([cert("old", AUTO, left=10 * DAY), cert("new", AUTO, left=300 * DAY)]) == []


def test_each_threshold_is_raised_once_whatever_the_clock_does() -> None:
    watched = [cert("a", None, left=30 * DAY, source="manual")]
    assert notices(watched) == [("a", "close")]
    raised = frozenset({("a", "close")})
    assert notices(watched, raised=raised) == []  # the next pulse
    assert notices(watched, raised=raised, now=NOW - 40 * DAY) == []  # the clock set back
    assert notices(watched, raised=raised, now=NOW + 5 * DAY) == []  # and forward again
    assert notices(watched, raised=raised, now=NOW + 31 * DAY) == [("a", "expired")]
    raised |= {("a", "expired")}
    assert notices(watched, raised=raised, now=NOW + 31 * DAY) == []
    assert notices(watched, raised=raised, now=NOW) == []  # set back to before expiry: nothing repeats


def test_a_certificate_found_already_expired_gets_only_the_expired_event() -> None:
    watched = [cert("a", None, left=-DAY, source="manual")]
    assert notices(watched) == [("a", "expired")]
    assert notices(watched, raised=frozenset({("a", "expired")}), now=NOW - 20 * DAY) == []


def test_warning_percent_is_a_share_of_the_lifetime() -> None:
    short = [cert("a", None, left=3 * DAY, lifetime=10 * DAY, source="manual")]  # 30 % left
    assert notices(short, percent=30) == [("a", "close")]
    assert notices(short, percent=50) == [("a", "close")]
    assert notices(short, percent=29) == []
    assert notices(short, percent=10) == []


def test_the_monitor_takes_the_plans_word_for_what_the_agent_handles() -> None:
    """The monitor does not judge for itself: whatever the plan says the agent takes care of is
    left alone, and everything else in the personal store is watched."""
    certs = (cert("auto", AUTO, left=10 * DAY), cert("foreign", None, left=10 * DAY, source="manual"),
             cert("extra", None, left=10 * DAY, source="manual", store="/etc/ssl/extra"))

    def watched(handled: set[str]) -> list[str]:
        found = expiry_notices(ON, StoreSnapshot(certificates=certs), NOW, handled=frozenset(handled),
                               warning_percent=10, raised=frozenset())
        return [n.thumbprint for n in found]

    assert watched(set()) == ["extra", "auto", "foreign"]  # by store, then thumbprint
    assert watched({"auto"}) == ["extra", "foreign"]
    assert watched({"foreign"}) == ["extra", "auto"]  # a certificate of no template, when the plan says so
    # Handled goes by thumbprint: a certificate in the personal and an additional store is one.
    assert watched({"extra"}) == ["auto", "foreign"]


# -- the log on a real store ------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    opened = LocalStore(tmp_path / "store", channel="user")
    yield opened
    opened.close()


def _certificate(name: str, *, template: TemplatePolicy | None = None,
                 lifetime: dt.timedelta = YEAR) -> tuple[PrivateKey, x509.Certificate]:
    """A server certificate of a CA of its own (the store checks no chain), of ``template``."""
    authority = Authority.root("Events CA", not_before=NOW, not_after=NOW + 10 * YEAR, path_length=0)
    issued = authority.issue(name, sans=[name], not_before=NOW, not_after=NOW + lifetime,
                             ekus=(x509.ExtendedKeyUsageOID.SERVER_AUTH.dotted_string,),
                             template=template_info.TemplateInfo(template.oid, 2, 0) if template is not None else None)
    assert issued.key is not None
    return issued.key, issued.certificate


def test_install_renew_archive_delete_each_write_their_events(store: LocalStore) -> None:
    key, first = _certificate("one.example")
    new_key, second = _certificate("one.example")
    a = store.install(key=key, cert=first, chain=[], source="auto", now=NOW, template_name="machine")
    b = store.install(key=new_key, cert=second, chain=[], source="auto", now=NOW + DAY, template_name="machine",
                      replaces=(a.thumbprint,), replace_action="renew")
    store.delete(a.thumbprint, NOW + 2 * DAY, action="manual")
    events = read_events(store.engine)
    assert [(e.event_id, e.action) for e in events] == [
        (1006, "enroll"), (1006, "enroll"), (1001, "renew"), (1005, "cleanup"), (1004, "manual")]
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    assert all(e.channel == "user" for e in events)
    replace = events[2]
    assert (replace.old_thumbprint, replace.new_thumbprint) == (a.thumbprint, b.thumbprint)
    assert replace.new is not None and replace.new.sha256 == b.sha256 and replace.new.template == "machine"
    assert replace.new.subject_names == ("one.example",)
    assert replace.new.ekus == ("serverAuth (1.3.6.1.5.5.7.3.1)",)
    assert replace.new.expiration == second.not_valid_after_utc and replace.new.store == "personal"
    # Installing the same version again (a resumed install) raises nothing more.
    store.install(key=new_key, cert=second, chain=[], source="auto", now=NOW + DAY, template_name="machine",
                  replaces=(a.thumbprint,))
    assert len(read_events(store.engine)) == 5


def test_an_event_is_never_written_without_its_change(store: LocalStore) -> None:
    key, first = _certificate("two.example")
    record = store.install(key=key, cert=first, chain=[], source="manual", now=NOW)

    class Boom(Exception):
        pass

    def failing_append(*args: object, **kwargs: object) -> None:
        raise Boom

    import certpulse.machine.certstore as store_module

    original = store_module.event_log.append
    store_module.event_log.append = failing_append  # type: ignore[assignment]
    try:
        with pytest.raises(Boom):
            store.archive(record.thumbprint, NOW)
    finally:
        store_module.event_log.append = original
    assert store.find(record.thumbprint).archived is False  # the change rolled back with its event
    assert [e.event_id for e in read_events(store.engine)] == [1006]


def test_sequence_numbers_survive_retention_and_retention_spares_undelivered_events(store: LocalStore) -> None:
    facts = CertFacts(thumbprint="AB" * 20, sha256="CD" * 32, subject="CN=x", subject_names=("x",), ekus=(),
                      template=None, template_oid=None, store="personal", not_before=NOW, expiration=NOW + YEAR)
    for i in range(300):
        store.record([EventDraft(EventId.EXPORTED, old=facts, detail=str(i))], NOW + i * dt.timedelta(minutes=1))
    with write(store.engine) as conn:
        conn.execute(et.tasks.insert().values(
            name="t", task_type="export", command="/bin/true", args=json.dumps([]), channel="user", timeout=5,
            sha256="0" * 64, created_at=NOW, state="ok", attempts=0, runs=0, failures=0))
        cursors.create(conn, cursors.task_consumer("t"), 50)
    later = NOW + 2 * DAY
    assert prune(store.engine, now=later, max_age=DAY, max_count=100) == 50  # only what task "t" has seen
    with write(store.engine) as conn:
        cursors.advance(conn, cursors.task_consumer("t"), 300)
    assert prune(store.engine, now=later, max_age=10 * YEAR, max_count=100) == 150
    remaining = read_events(store.engine)
    assert [e.seq for e in remaining] == list(range(201, 301))
    assert prune(store.engine, now=later, max_age=DAY, max_count=100) == 100  # all older than a day
    with read(store.engine) as conn:
        assert latest_seq(conn) == 300
    [event] = store.record([EventDraft(EventId.EXPORTED, old=facts)], later)
    assert event.seq == 301  # never reused


def test_retention_spares_what_the_rebind_engine_has_not_read(store: LocalStore, tmp_path: Path) -> None:
    """D4: the rebind engine's cursor counts like a task's. Before the cursors table it lived in
    the state table, and retention pruned events rebind had not acted on."""
    from certpulse.rebind import engine as rebind

    facts = CertFacts(thumbprint="AC" * 20, sha256="CD" * 32, subject="CN=r", subject_names=("r",), ekus=(),
                      template=None, template_oid=None, store="personal", not_before=NOW, expiration=NOW + YEAR)
    store.record([EventDraft(EventId.EXPORTED, old=facts) for _ in range(10)], NOW)
    assert rebind.ensure_cursor(store) == 10  # the first binding: rebind reads from here on
    store.record([EventDraft(EventId.EXPORTED, old=facts) for _ in range(290)], NOW)
    later = NOW + 2 * DAY
    assert prune(store.engine, now=later, max_age=DAY, max_count=100) == 10  # only what rebind has read
    assert read_events(store.engine)[0].seq == 11
    rebind.process(store, tmp_path, later)  # reads everything (no binding moves for 1007s)
    with read(store.engine) as conn:
        assert cursors.get(conn, cursors.REBIND) == 300
    assert prune(store.engine, now=later, max_age=DAY, max_count=100) == 290
    assert read_events(store.engine) == []


def test_a_consumer_cursor_never_moves_backwards(store: LocalStore) -> None:
    with write(store.engine) as conn:
        cursors.create(conn, "rebind", 40)
        assert cursors.advance(conn, "rebind", 30) is False
        assert cursors.advance(conn, "rebind", 45) is True
        assert cursors.move_from(conn, "rebind", 40, 50) is False  # it is at 45 now, not 40
        assert cursors.get(conn, "rebind") == 45
        assert cursors.lowest(conn) == 45


def test_undelivered_events_are_kept_only_up_to_the_hard_limit(store: LocalStore) -> None:
    facts = CertFacts(thumbprint="EF" * 20, sha256="01" * 32, subject="CN=y", subject_names=("y",), ekus=(),
                      template=None, template_oid=None, store="personal", not_before=NOW, expiration=NOW + YEAR)
    store.record([EventDraft(EventId.EXPORTED, old=facts) for _ in range(1100)], NOW)
    with write(store.engine) as conn:
        conn.execute(et.tasks.insert().values(
            name="stuck", task_type="export", command="/bin/true", args="[]", channel="user", timeout=5,
            sha256="0" * 64, created_at=NOW, state="refused", attempts=0, runs=0, failures=0))
        cursors.create(conn, cursors.task_consumer("stuck"), 0)
    assert prune(store.engine, now=NOW + YEAR, max_age=DAY, max_count=100) == 100  # 1100 - 10 x 100
    assert len(read_events(store.engine)) == 1000


def test_event_filters(store: LocalStore) -> None:
    facts = dataclasses.replace(
        CertFacts(thumbprint="12" * 20, sha256="34" * 32, subject="CN=z", subject_names=("z",), ekus=(),
                  template="t", template_oid=None, store="personal", not_before=NOW, expiration=NOW + YEAR))
    store.record([EventDraft(EventId.CLOSE_TO_EXPIRATION, old=facts)], NOW)
    store.record([EventDraft(EventId.EXPIRED, old=facts)], NOW + DAY)
    assert [e.event_id for e in read_events(store.engine, event_ids=[1002])] == [1002]
    assert [e.event_id for e in read_events(store.engine, since=NOW + DAY)] == [1002]
    assert read_events(store.engine, channel="system") == []
    assert [e.event_id for e in read_events(store.engine, limit=1, newest=True)] == [1002]
    assert [e.template for e in read_events(store.engine)] == ["t", "t"]


# -- the monitor in a pulse --------------------------------------------------------------------------


def test_the_pulse_monitor_uses_the_plans_handled_set_and_plans_when_it_has_none(tmp_path: Path) -> None:
    """After a pulse that planned, the monitor takes that plan's word; after one that could not
    plan (no policy server answered), it plans on what it has."""
    directory = tmp_path / "agent"
    directory.mkdir()
    write_credential(directory, "unused")
    PinFile(directory).save([Authority.root("Monitor Root").certificate])
    unreachable = PolicyServerConfig(url="http://127.0.0.1:9/cep", trust_roots=ROOTS_NAME, insecure_http=True)
    agent = Agent(directory, AgentConfig(servers=(unreachable,), principal="monitor.example"))
    try:
        prints = []
        for name in ("a", "b"):
            key, issued = _certificate(f"{name}.example", template=AUTO, lifetime=100 * DAY)
            prints.append(agent.store.install(key=key, cert=issued, chain=[], source="auto", now=NOW,
                                              template_name=AUTO.name).thumbprint)
        a, b = prints
        now = NOW + 95 * DAY  # 5 % of the lifetime left: close to expiration, unless the agent renews it

        def warned() -> set[str | None]:
            return {e.old_thumbprint for e in read_events(agent.store.engine, event_ids=(1003,))}

        # The plan handles a, not b. With no policy at hand a second opinion would handle neither.
        agent._monitor_expiry(gather.snapshot(agent.store, [], now), Plan((), (), handled=frozenset({a})), now)
        assert warned() == {b}
        # No plan, and a policy that autoenrolls the template: planning handles a.
        agent.policies = [gather.GatheredPolicy(server(AUTO), gather.Trust(roots=(), issuers={}, kra=()))]
        agent._monitor_expiry(None, None, now)
        assert warned() == {b}
        # No plan and no policy: nothing is handled.
        agent.policies = []
        agent._monitor_expiry(None, None, now)
        assert warned() == {a, b}
    finally:
        agent.close()

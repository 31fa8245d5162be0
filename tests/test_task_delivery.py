"""Delivering lifecycle events to notification tasks: real store, real events, real processes.

Events are raised the way the agent raises them (``LocalStore.install`` writes 1006,
``LocalStore.replace`` 1001 and 1005); the dispatcher is called with an explicit ``now`` so that
backoff is driven forward without waiting. The recorder task appends what it was given (argv,
the event on stdin, its environment) to a log, and fails for the sequence numbers listed in a
control file, so success and failure are switched without changing the pinned script.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import select

from certpulse.agent.config import AgentConfig, PolicyServerConfig, save_config
from certpulse.agent.skew import Measurement, observe
from certpulse.errors import Refusal
from certpulse.events.tasks import (
    Dispatcher,
    TaskSettings,
    add_task,
    dispatch,
    dispatch_lock,
    get_task,
    history,
    list_tasks,
    pin_task,
    remove_task,
    run_test,
)
from certpulse.machine import schema as et
from certpulse.machine.certstore import LocalStore
from certpulse.machine.events import CertFacts, EventDraft, EventId
from certpulse.machine.log import append, read_events
from certpulse.pki.keys import PrivateKey
from certpulse.sandbox import OUTPUT_CAP
from certpulse.sql.db import read, write
from pki_factory import self_signed
from support import run_cli

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)


@dataclasses.dataclass
class World:
    directory: Path
    config: AgentConfig
    store: LocalStore
    scripts: Path
    out: Path

    def add(self, name: str, task_type: str, command: Path, **extra: Any) -> None:
        add_task(self.store, name=name, task_type=task_type, command=command, channel=self.config.channel,
                 now=NOW, agent_channel=self.config.channel, **extra)

    @property
    def settings(self) -> TaskSettings:
        return TaskSettings(retries=self.config.task_retries, base_backoff=self.config.task_retry_backoff)

    def dispatch(self, now: dt.datetime = NOW, **extra: Any) -> Any:
        return dispatch(self.store, self.settings, self.directory, now, **extra)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    directory = tmp_path / "agent"
    directory.mkdir(mode=0o700)
    config = AgentConfig(servers=(PolicyServerConfig(url="http://127.0.0.1:9", trust_roots="trust/roots.pem",
                                                     insecure_http=True),), principal="x", task_retries=2,
                         task_retry_backoff=MINUTE)
    save_config(directory, config)
    scripts = tmp_path / "scripts"
    scripts.mkdir(mode=0o700)
    out = tmp_path / "out"
    out.mkdir()
    store = LocalStore(directory / "store", channel=config.channel)
    yield World(directory, config, store, scripts, out)
    store.close()


def write_script(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(0o700)
    return path


def recorder(world: World, name: str = "rec", tag: str = "v1") -> Path:
    """A task that logs argv, the event and its environment, and fails for listed sequence numbers."""
    log, fail = world.out / f"{name}.log", world.out / f"{name}.fail"
    return write_script(world.scripts / f"{name}.py", f"""#!{sys.executable}
import json, os, sys
event = json.loads(sys.stdin.read())
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"tag": {tag!r}, "argv": sys.argv[1:], "event": event, "env": dict(os.environ)}}) + "\\n")
fails = open({str(fail)!r}).read().split() if os.path.exists({str(fail)!r}) else []
print("ran for", event["seq"])
sys.exit(3 if str(event["seq"]) in fails else 0)
""")


def calls(world: World, name: str = "rec") -> list[dict[str, Any]]:
    log = world.out / f"{name}.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def fail_for(world: World, *seqs: int, name: str = "rec") -> None:
    (world.out / f"{name}.fail").write_text(" ".join(str(s) for s in seqs))


def make_cert(common_name: str) -> tuple[PrivateKey, x509.Certificate]:
    issued = self_signed(common_name, start=NOW - MINUTE)
    assert issued.key is not None
    return issued.key, issued.certificate


def install(world: World, common_name: str = "host.example") -> str:
    """Install a certificate with its key: event 1006. Its thumbprint."""
    key, cert = make_cert(common_name)
    return world.store.install(key=key, cert=cert, chain=[], source="manual", now=NOW, template_name="x").thumbprint


def events_of(world: World, event_id: EventId) -> list[Any]:
    return read_events(world.store.engine, event_ids=[event_id])


def runs_of(world: World, name: str) -> list[Any]:
    return history(world.store, name, limit=1000)


# -- registering ------------------------------------------------------------------------------------

def test_add_refuses_bad_names_types_channels_timeouts_and_unsafe_commands(world: World) -> None:
    good = recorder(world)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"name": "no spaces"}, "task name"),
        ({"task_type": "reboot"}, "task type"),
        ({"channel": "user"}, "system channel only"),
        ({"timeout": 0.5}, "timeout must be"),
        ({"timeout": 7200}, "timeout must be"),
        ({"old_thumbprint": "xyz"}, "not a 40-digit"),
        ({"args": ["a\0b"]}, "NUL"),
    ]
    for change, message in bad:
        args: dict[str, Any] = {"name": "t", "task_type": "new", "command": good, "channel": "system",
                                "now": NOW, "agent_channel": "system", **change}
        with pytest.raises(Refusal) as caught:
            add_task(world.store, **args)
        assert message in caught.value.detail, (change, caught.value.detail)
    good.chmod(0o722)
    with pytest.raises(Refusal) as unsafe:
        world.add("t", "new", good)
    assert unsafe.value.reason.value == "command-unsafe"
    good.chmod(0o700)
    world.add("t", "new", good)
    with pytest.raises(Refusal) as twice:
        world.add("t", "new", good)
    assert twice.value.reason.value == "conflict"
    assert [t.name for t in list_tasks(world.store)] == ["t"]


def test_a_new_task_reacts_only_to_events_raised_after_it(world: World) -> None:
    before = install(world, "before.example")
    world.add("rec", "new", recorder(world))
    after = install(world, "after.example")
    summary = world.dispatch()
    assert (summary.runs, summary.ok) == (1, 1)
    assert [c["event"]["new"]["thumbprint"] for c in calls(world)] == [after]
    assert before != after
    task = get_task(world.store, "rec")
    assert (task.state, task.runs, task.last_outcome, task.last_exit) == ("ok", 1, "ok", 0)
    assert runs_of(world, "rec")[0].output == f"ran for {task.cursor}\n".encode()


def test_a_replace_event_reaches_the_task_with_old_and_new_thumbprints(world: World) -> None:
    old, new = install(world, "old.example"), install(world, "new.example")
    world.add("rec", "replace", recorder(world), args=["--site", "Default Web Site"])
    world.store.replace(old, new, NOW)
    world.dispatch()
    [call] = calls(world)
    replace_event = events_of(world, EventId.REPLACE)[0]
    assert call["argv"] == ["--site", "Default Web Site", old, new]
    assert call["event"]["id"] == 1001 and call["event"]["seq"] == replace_event.seq
    assert (call["event"]["old"]["thumbprint"], call["event"]["new"]["thumbprint"]) == (old, new)
    env = call["env"]
    assert (env["CERTPULSE_OLD_THUMBPRINT"], env["CERTPULSE_NEW_THUMBPRINT"]) == (old, new)
    assert env["CERTPULSE_EVENT_ID"] == "1001" and env["CERTPULSE_EVENT_NAME"] == "replace"
    assert env["CERTPULSE_EVENT_SEQ"] == str(replace_event.seq) and env["CERTPULSE_TASK"] == "rec"
    assert env["CERTPULSE_DIR"] == str(world.directory) and "CERTPULSE_TEST" not in env


def test_a_hostile_subject_reaches_the_task_as_plain_data(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libevil.so")
    monkeypatch.setenv("PYTHONPATH", str(world.out))
    marker = Path(f"/tmp/cp-{os.getpid()}")  # short: a CN holds at most 64 characters
    marker.unlink(missing_ok=True)
    subject = f"$(touch {marker})`touch {marker}`\na;b|c"
    world.add("rec", "new", recorder(world), args=[f"$(touch {marker})", "'; touch x '"])
    thumb = install(world, subject)
    world.dispatch()
    [call] = calls(world)
    assert call["event"]["new"]["subject_names"] == [subject]  # byte for byte, newline included
    assert call["event"]["new"]["subject"].startswith("CN=$(touch ")
    assert call["argv"] == [f"$(touch {marker})", "'; touch x '", "", thumb]
    assert not marker.exists()
    assert "LD_PRELOAD" not in call["env"] and "PYTHONPATH" not in call["env"]
    assert call["env"]["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- delivery rules ---------------------------------------------------------------------------------

def test_a_swapped_script_is_refused_once_and_repinning_delivers_what_it_missed(world: World) -> None:
    script = recorder(world)
    world.add("rec", "new", script)
    cursor = get_task(world.store, "rec").cursor
    first = install(world, "one.example")
    recorder(world, tag="v2")  # same path, new content
    summary = world.dispatch()
    assert summary.refused == 1 and summary.runs == 0
    assert calls(world) == []  # the changed script never ran
    task = get_task(world.store, "rec")
    assert (task.state, task.cursor) == ("refused", cursor)
    assert "changed since it was registered" in (task.last_error or "")
    second = install(world, "two.example")
    assert world.dispatch().refused == 0
    refusals = events_of(world, EventId.TASK_REFUSED)
    assert len(refusals) == 1 and refusals[0].data["task"] == "rec"
    assert refusals[0].data["reason"] == "command-changed"
    assert [r.outcome for r in runs_of(world, "rec")] == ["refused"]

    pin_task(world.store, "rec")
    assert get_task(world.store, "rec").state == "ok"
    world.dispatch()
    delivered = calls(world)
    assert [(c["tag"], c["event"]["new"]["thumbprint"]) for c in delivered] == [("v2", first), ("v2", second)]


def test_failures_are_retried_with_backoff_in_order_then_given_up_with_1103(world: World) -> None:
    world.add("rec", "new", recorder(world))
    world.add("watch", "failure", recorder(world, "watch"))
    install(world, "first.example")
    first = events_of(world, EventId.NEW)[-1].seq
    fail_for(world, first)

    assert world.dispatch(NOW).failed == 1
    task = get_task(world.store, "rec")
    assert (task.state, task.attempts, task.failures) == ("retrying", 1, 1)
    assert task.next_attempt_at is not None and NOW + MINUTE <= task.next_attempt_at < NOW + 2 * MINUTE

    install(world, "second.example")  # waits behind the first: delivery is in order
    second = events_of(world, EventId.NEW)[-1].seq
    assert world.dispatch(NOW + 30 * dt.timedelta(seconds=1)).runs == 0
    assert world.dispatch(NOW + MINUTE + dt.timedelta(seconds=1)).failed == 1
    task = get_task(world.store, "rec")
    assert task.attempts == 2 and task.next_attempt_at is not None
    assert task.next_attempt_at >= NOW + 3 * MINUTE  # the backoff doubled
    assert world.dispatch(NOW + 2 * MINUTE + dt.timedelta(seconds=30)).runs == 0

    summary = world.dispatch(NOW + 4 * MINUTE)
    assert (summary.failed, summary.gave_up, summary.ok) == (1, 1, 1)
    assert [c["event"]["seq"] for c in calls(world)] == [first, first, first, second]
    [given_up] = events_of(world, EventId.TASK_FAILED)
    assert given_up.data == {"task": "rec", "event_seq": first, "event_id": 1006, "exit_status": 3,
                             "outcome": "failed", "attempts": 3}
    task = get_task(world.store, "rec")
    assert (task.state, task.runs, task.failures, task.cursor) == ("ok", 4, 3, given_up.seq)  # past 1103 too
    assert [r.outcome for r in runs_of(world, "rec")] == ["failed", "failed", "failed", "ok"]
    world.dispatch(NOW + 5 * MINUTE)
    assert calls(world, "watch") == []  # 1103 never reaches a task: a failing task cannot loop


def test_the_failed_state_stays_until_a_later_success(world: World) -> None:
    world.config = dataclasses.replace(world.config, task_retries=0)
    world.add("rec", "new", recorder(world))
    install(world)
    fail_for(world, events_of(world, EventId.NEW)[-1].seq)
    world.dispatch()
    assert get_task(world.store, "rec").state == "failed"
    assert world.dispatch(NOW + MINUTE).runs == 0  # given up: the cursor moved past it
    install(world, "later.example")
    world.dispatch(NOW + MINUTE)
    assert get_task(world.store, "rec").state == "ok"


def test_a_task_that_outlives_its_timeout_is_killed_and_counted_as_a_failure(world: World) -> None:
    world.config = dataclasses.replace(world.config, task_retries=0)
    sleeper = write_script(world.scripts / "sleep.sh", "#!/bin/sh\necho going to sleep\nexec sleep 1000\n")
    world.add("sleepy", "new", sleeper, timeout=1)
    install(world)
    started = time.monotonic()
    summary = world.dispatch(kill_grace=0.5)
    assert time.monotonic() - started < 300  # killed at its 1 s timeout, not left to sleep 1000 s
    assert (summary.runs, summary.failed, summary.gave_up) == (1, 1, 1)
    [run] = runs_of(world, "sleepy")
    assert run.outcome == "timeout" and run.output == b"going to sleep\n" and "timed out after 1 s" in run.detail
    task = get_task(world.store, "sleepy")
    assert (task.state, task.failures, task.last_outcome) == ("failed", 1, "timeout")
    assert events_of(world, EventId.TASK_FAILED)[0].data["outcome"] == "timeout"


def test_delivery_resumes_at_the_durable_cursor_in_a_new_process(world: World) -> None:
    world.add("rec", "new", recorder(world))
    install(world, "a.example")
    install(world, "b.example")
    install(world, "c.example")
    seqs = [e.seq for e in events_of(world, EventId.NEW)]
    summary = world.dispatch(max_runs=1)
    assert summary.runs == 1 and summary.stopped_early
    assert get_task(world.store, "rec").cursor == seqs[0]
    # Another store object, as after a restart, delivers the next one ...
    again = LocalStore(world.directory / "store", channel="system")
    try:
        Dispatcher(again, world.settings, world.directory, max_runs=1).run(NOW)
    finally:
        again.close()
    # ... and another process the rest.
    out = run_cli("task", "run-pending", "--dir", str(world.directory), "--json")
    assert json.loads(out.stdout)["runs"] == 1
    assert [c["event"]["seq"] for c in calls(world)] == seqs  # each once, in order
    assert world.dispatch().runs == 0


def test_one_tasks_backlog_does_not_starve_the_others(world: World) -> None:
    world.add("a-busy", "new", recorder(world, "busy"))
    world.add("b-other", "new", recorder(world, "other"))
    for n in range(7):
        install(world, f"{n}.example")
    summary = world.dispatch(max_runs=6)
    assert summary.stopped_early
    assert (len(calls(world, "busy")), len(calls(world, "other"))) == (5, 1)
    world.dispatch()
    assert (len(calls(world, "busy")), len(calls(world, "other"))) == (7, 7)


def test_the_old_thumbprint_filter_picks_the_events_of_one_certificate(world: World) -> None:
    a, b, c, d = (install(world, f"{n}.example") for n in "abcd")
    world.add("rec", "replace", recorder(world), old_thumbprint=a.lower())
    world.store.replace(c, d, NOW)
    world.store.replace(a, b, NOW)
    world.dispatch()
    assert [call["argv"] for call in calls(world)] == [[a, b]]
    assert get_task(world.store, "rec").cursor == read_events(world.store.engine)[-1].seq


def test_a_system_task_does_not_run_for_an_event_an_unprivileged_user_raised(world: World) -> None:
    world.add("rec", "new", recorder(world))
    _, cert = make_cert("forged.example")
    with write(world.store.engine) as conn:
        [forged] = append(conn, [EventDraft(EventId.NEW, action="enroll", new=CertFacts.of(cert, template="x"))],
                          now=NOW, channel="system", uid=65534)
    real = install(world, "real.example")
    summary = world.dispatch()
    assert (summary.skipped, summary.runs) == (1, 1)
    assert [c["event"]["new"]["thumbprint"] for c in calls(world)] == [real]
    skipped, ran = runs_of(world, "rec")
    assert (skipped.outcome, skipped.event_seq) == ("skipped", forged.seq) and "uid 65534" in skipped.detail
    assert ran.outcome == "ok"


def test_one_dispatcher_at_a_time_per_agent_folder(world: World) -> None:
    world.add("rec", "new", recorder(world))
    install(world)
    with dispatch_lock(world.directory) as held:
        assert held
        assert world.dispatch().busy
        assert calls(world) == []
    assert world.dispatch().runs == 1


def test_a_flood_of_output_is_stored_capped(world: World) -> None:
    flood = write_script(world.scripts / "flood.sh", "#!/bin/sh\nhead -c 100000000 /dev/urandom\n")
    world.add("flood", "new", flood)
    install(world)
    assert world.dispatch().ok == 1  # finished (drained to the end) within the task's timeout
    [run] = runs_of(world, "flood")
    assert run.output_truncated and len(run.output) == OUTPUT_CAP


def test_task_test_runs_a_synthetic_event_and_leaves_delivery_alone(world: World) -> None:
    old, new = install(world, "old.example"), install(world, "new.example")
    world.store.replace(old, new, NOW)
    world.add("rec", "replace", recorder(world))
    before = get_task(world.store, "rec")
    run = run_test(world.store, "rec", directory=world.directory, now=NOW)
    assert run.outcome == "ok" and run.test and run.event_seq is None
    [call] = calls(world)
    assert call["event"]["synthetic"] is True and call["event"]["seq"] == 0 and call["event"]["id"] == 1001
    assert call["argv"] == [old, new]  # the newest certificate and the one it replaced
    assert call["env"]["CERTPULSE_TEST"] == "1"
    assert get_task(world.store, "rec") == before
    assert [r.test for r in runs_of(world, "rec")] == [True]


def test_task_test_on_an_empty_store_uses_placeholders_and_the_filter(world: World) -> None:
    wanted = "AB" * 20
    world.add("rec", "expire", recorder(world), old_thumbprint=wanted)
    assert run_test(world.store, "rec", directory=world.directory, now=NOW).outcome == "ok"
    [call] = calls(world)
    assert call["argv"] == [wanted, ""] and call["event"]["id"] == 1002 and call["event"]["new"] is None


def test_removing_a_task_forgets_it_and_its_history(world: World) -> None:
    world.add("rec", "new", recorder(world))
    install(world)
    world.dispatch()
    remove_task(world.store, "rec")
    with pytest.raises(Refusal):
        get_task(world.store, "rec")
    with read(world.store.engine) as conn:
        assert conn.execute(select(et.task_runs)).all() == []


# -- the command line -------------------------------------------------------------------------------

def test_the_task_commands(world: World) -> None:
    folder = str(world.directory)
    unsafe = write_script(world.scripts / "unsafe.sh", "#!/bin/sh\n")
    unsafe.chmod(0o777)
    out = run_cli("task", "add", "--dir", folder, "--name", "bad", "--type", "new", "--command", str(unsafe),
                  check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("certpulse: error: command-unsafe: ") and out.stderr.count("\n") == 1

    script = recorder(world)
    run_cli("task", "add", "--dir", folder, "--name", "rec", "--type", "new", "--command", str(script),
            "--arg", "$(id)", "--timeout", "5")
    install(world)
    tested = json.loads(run_cli("task", "test", "rec", "--dir", folder, "--json").stdout)
    assert tested["outcome"] == "ok" and tested["test"] and tested["output"] == "ran for 0\n"
    delivered = json.loads(run_cli("task", "run-pending", "--dir", folder, "--json").stdout)
    assert delivered["ok"] == 1
    [listed] = json.loads(run_cli("task", "list", "--dir", folder, "--json").stdout)
    assert (listed["name"], listed["state"], listed["runs"], listed["args"]) == ("rec", "ok", 1, ["$(id)"])
    runs = json.loads(run_cli("task", "history", "rec", "--dir", folder, "--json").stdout)
    assert [(r["test"], r["outcome"]) for r in runs] == [(True, "ok"), (False, "ok")]

    recorder(world, tag="v2")
    changed = run_cli("task", "test", "rec", "--dir", folder, check=False)
    assert changed.returncode == 2 and "certpulse: error: command-changed: " in changed.stderr
    run_cli("task", "pin", "rec", "--dir", folder)
    assert get_task(world.store, "rec").sha256 != listed["sha256"]  # pinned anew
    run_cli("task", "remove", "rec", "--dir", folder)
    assert list_tasks(world.store) == []


def test_a_skewed_clock_reaches_the_failure_tasks_once_per_episode(world: World) -> None:
    """1107 is something to act on before renewals go wrong: the ``failure`` type carries it."""
    world.add("watch", "failure", recorder(world, "watch"))
    ca = "https://ca.example:8443"
    far = dt.timedelta(minutes=9)
    observe(world.store, [Measurement(ca, far)], NOW, dt.timedelta(minutes=5))
    observe(world.store, [Measurement(ca, far)], NOW + MINUTE, dt.timedelta(minutes=5))  # the same episode
    world.dispatch(NOW + MINUTE)
    [delivered] = calls(world, "watch")
    assert delivered["event"]["id"] == EventId.CLOCK_SKEW
    assert delivered["event"]["data"]["offset_seconds"] == far.total_seconds()

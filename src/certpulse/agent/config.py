"""The agent's configuration: the seed's Group Policy settings, as TOML in the agent folder.

Every client-side command takes ``--dir``; without it ``$CERTPULSE_DIR``, then
``/var/lib/certpulse`` when running as root (the system context) and the user's data folder
otherwise (the user context).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from certpulse.durations import format_duration, parse_duration
from certpulse.errors import Reason, Refusal
from certpulse.machine.certstore import LocalStore, open_store

SYSTEM_DIR = Path("/var/lib/certpulse")
CONFIG_NAME = "agent.toml"
CREDENTIAL_NAME = "credential"


def default_dir() -> Path:
    env = os.environ.get("CERTPULSE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_DIR
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "certpulse"


def resolve_dir(given: Path | None) -> Path:
    return given if given is not None else default_dir()


def context_for_uid() -> str:
    """System context as root (machine certificates), user context otherwise."""
    return "machine" if os.geteuid() == 0 else "user"


@dataclasses.dataclass(frozen=True)
class PolicyServerConfig:
    url: str
    cost: int = 0
    is_default: bool = True
    # The pinned CA roots (PEM, relative to the agent folder): the only roots this server's TLS
    # certificate, policy roots, issuers and issued certificates may chain to (agent/trust.py).
    trust_roots: str | None = None
    credential_file: str = CREDENTIAL_NAME
    insecure_http: bool = False  # an http:// URL, allowed only by ``agent init --insecure-http``


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    servers: tuple[PolicyServerConfig, ...]
    principal: str
    enabled: bool = True
    enroll: bool = True
    manage: bool = True
    retrieve_pending: bool = True
    refresh_interval: dt.timedelta = dt.timedelta(hours=8)
    expiry_warning_percent: int = 10
    additional_stores: tuple[str, ...] = ()
    context: str = "machine"
    backoff_cap: dt.timedelta = dt.timedelta(hours=1)
    policy_refresh: dt.timedelta = dt.timedelta(minutes=10)  # the seed: templates cached >= 10 min
    # The event log: kept this long and at most this many events (undelivered ones are kept longer).
    event_retention: dt.timedelta = dt.timedelta(days=365)
    event_retention_count: int = 100_000
    syslog: bool = False  # also send every event to syslog / the journal
    syslog_address: str = "/dev/log"
    syslog_facility: str = "daemon"
    # Notification tasks: a failed run is retried this many times, with backoff from this delay.
    task_retries: int = 3
    task_retry_backoff: dt.timedelta = dt.timedelta(minutes=1)
    # Seconds one HTTP call to a policy server may take in all (connect, TLS, headers, body).
    http_deadline: float = 60.0
    # Warn (event 1107, a pulse note) when this machine's clock is further than this from the CA's.
    clock_skew_warning: dt.timedelta = dt.timedelta(minutes=5)

    @property
    def channel(self) -> str:
        """The event channel this agent writes: the seed's -System log for machines, -User for users."""
        return "system" if self.context == "machine" else "user"

    def document(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "enabled": self.enabled,
            "enroll": self.enroll,
            "manage": self.manage,
            "retrieve_pending": self.retrieve_pending,
            "refresh_interval": format_duration(self.refresh_interval),
            "expiry_warning_percent": self.expiry_warning_percent,
            "additional_stores": list(self.additional_stores),
            "context": self.context,
            "backoff_cap": format_duration(self.backoff_cap),
            "policy_refresh": format_duration(self.policy_refresh),
            "event_retention": format_duration(self.event_retention),
            "event_retention_count": self.event_retention_count,
            "syslog": self.syslog,
            "syslog_address": self.syslog_address,
            "syslog_facility": self.syslog_facility,
            "task_retries": self.task_retries,
            "task_retry_backoff": format_duration(self.task_retry_backoff),
            "http_deadline": self.http_deadline,
            "clock_skew_warning": format_duration(self.clock_skew_warning),
            "policy_servers": [
                {k: v for k, v in dataclasses.asdict(s).items() if v is not None} for s in self.servers
            ],
        }


def _bool(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise Refusal(Reason.INVALID_ARGUMENT, f"{key} must be true or false")
    return value


def load_config(directory: Path) -> AgentConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise Refusal(Reason.NOT_FOUND, f"no agent in {directory} (run 'certpulse agent init --dir {directory}' first)")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"cannot read {path}: {exc}") from None
    known = {"principal", "enabled", "enroll", "manage", "retrieve_pending", "refresh_interval",
             "expiry_warning_percent", "additional_stores", "context", "backoff_cap", "policy_refresh",
             "policy_servers", "event_retention", "event_retention_count", "syslog", "syslog_address",
             "syslog_facility", "task_retries", "task_retry_backoff", "http_deadline",
             "clock_skew_warning"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{path}: unknown setting {unknown[0]!r}")
    servers = []
    for raw in data.get("policy_servers", []):
        if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
            raise Refusal(Reason.INVALID_ARGUMENT, f"{path}: every [[policy_servers]] needs a url")
        servers.append(_server(path, raw))
    if not servers:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{path}: no [[policy_servers]]")
    percent = data.get("expiry_warning_percent", 10)
    if not isinstance(percent, int) or not 0 < percent < 100:
        raise Refusal(Reason.INVALID_ARGUMENT, "expiry_warning_percent must be a whole number from 1 to 99")
    context = data.get("context", "machine")
    if context not in ("machine", "user"):
        raise Refusal(Reason.INVALID_ARGUMENT, "context must be machine or user")
    stores = data.get("additional_stores", [])
    if not isinstance(stores, list) or not all(isinstance(s, str) for s in stores):
        raise Refusal(Reason.INVALID_ARGUMENT, "additional_stores must be a list of folders")
    count = data.get("event_retention_count", 100_000)
    if not isinstance(count, int) or isinstance(count, bool) or count < 100:
        raise Refusal(Reason.INVALID_ARGUMENT, "event_retention_count must be a whole number of at least 100")
    retries = data.get("task_retries", 3)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 20:
        raise Refusal(Reason.INVALID_ARGUMENT, "task_retries must be a whole number from 0 to 20")
    deadline = data.get("http_deadline", 60)
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or not 1 <= deadline <= 3600:
        raise Refusal(Reason.INVALID_ARGUMENT, "http_deadline must be a number of seconds from 1 to 3600")
    facility = data.get("syslog_facility", "daemon")
    if facility not in ("daemon", "user", "auth", "local0", "local1", "local2", "local3", "local4", "local5",
                        "local6", "local7"):
        raise Refusal(Reason.INVALID_ARGUMENT, "syslog_facility must be daemon, user, auth or local0..local7")
    return AgentConfig(
        servers=tuple(servers), principal=str(data.get("principal", "")),
        enabled=_bool(data, "enabled", True), enroll=_bool(data, "enroll", True),
        manage=_bool(data, "manage", True), retrieve_pending=_bool(data, "retrieve_pending", True),
        refresh_interval=parse_duration(data.get("refresh_interval", "8h")),
        expiry_warning_percent=percent, additional_stores=tuple(stores), context=context,
        backoff_cap=parse_duration(data.get("backoff_cap", "1h")),
        policy_refresh=parse_duration(data.get("policy_refresh", "10m")),
        event_retention=parse_duration(data.get("event_retention", "365d")), event_retention_count=count,
        syslog=_bool(data, "syslog", False), syslog_address=str(data.get("syslog_address", "/dev/log")),
        syslog_facility=facility, task_retries=retries,
        task_retry_backoff=parse_duration(data.get("task_retry_backoff", "1m")),
        http_deadline=float(deadline),
        clock_skew_warning=parse_duration(data.get("clock_skew_warning", "5m")),
    )


def _server(path: Path, raw: dict[str, Any]) -> PolicyServerConfig:
    """One [[policy_servers]] entry. Each names its pinned roots (``trust_roots``; ``ca_file`` is
    its older name); an http:// URL also needs ``insecure_http = true``: the agent never contacts
    a server it has no pin for, and never talks plain HTTP unless told to at init."""
    url = raw["url"].rstrip("/")
    trust = raw.get("trust_roots", raw.get("ca_file"))
    if not isinstance(trust, str) or not trust:
        raise Refusal(Reason.INVALID_ARGUMENT,
                      f"{path}: policy server {url} has no trust_roots (the pinned CA roots; "
                      "see 'agent init --ca-fingerprint')")
    insecure = raw.get("insecure_http", False)
    if not isinstance(insecure, bool):
        raise Refusal(Reason.INVALID_ARGUMENT, "insecure_http must be true or false")
    if not url.startswith(("https://", "http://")):
        raise Refusal(Reason.INVALID_ARGUMENT, f"{path}: policy server {url} is not an https URL")
    if url.startswith("http://") and not insecure:
        raise Refusal(Reason.INVALID_ARGUMENT,
                      f"{path}: policy server {url} is plain http; use https, or set insecure_http = true")
    return PolicyServerConfig(url=url, cost=int(raw.get("cost", 0)), is_default=bool(raw.get("is_default", True)),
                              trust_roots=trust, credential_file=str(raw.get("credential_file", CREDENTIAL_NAME)),
                              insecure_http=insecure)


def save_config(directory: Path, config: AgentConfig) -> None:
    path = directory / CONFIG_NAME
    header = ("# certpulse agent configuration (the seed's autoenrollment Group Policy).\n"
              "# enabled / enroll / manage / retrieve_pending: the AE options; refresh_interval: pulse period\n"
              "# (random jitter is added); expiry_warning_percent: share of lifetime left for event 1003;\n"
              "# additional_stores: folders of PEM certificates that are only monitored for expiry;\n"
              "# policy_refresh: how long a downloaded policy is reused (the seed: at least 10 minutes);\n"
              "# event_retention / event_retention_count: how long and how many lifecycle events are kept;\n"
              "# syslog: also send events to syslog (syslog_address, syslog_facility);\n"
              "# task_retries / task_retry_backoff: how often and how soon a failed notification task is retried;\n"
              "# clock_skew_warning: warn (event 1107) when this machine's clock is further than this from the CA's.\n")
    path.write_text(header + tomli_w.dumps(config.document()))


def open_agent_store(directory: Path, config: AgentConfig, *, check: bool = True) -> LocalStore:
    """The store of the agent in ``directory``, writing on the agent's channel; its events also go
    to syslog when the agent is configured so, whichever command raised them. Needs no
    credential: commands that only read or change the store work without one."""
    return open_store(directory, channel=config.channel,
                      syslog_address=config.syslog_address if config.syslog else None,
                      syslog_facility=config.syslog_facility, check=check)


def read_credential(directory: Path, server: PolicyServerConfig) -> str:
    path = directory / server.credential_file
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise Refusal(Reason.UNAUTHENTICATED, f"cannot read the agent credential {path}: {exc.strerror}") from None


def write_credential(directory: Path, credential: str, name: str = CREDENTIAL_NAME) -> None:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, credential.encode() + b"\n")
    finally:
        os.close(fd)

"""A CA's home folder: where its keys, certificates, database and settings live.

Every server-side command takes ``--dir``; without it ``$CERTPULSE_CA_DIR``, then
:data:`SYSTEM_CA_DIR`. Several CAs can run side by side, each in its own folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import tomli_w

from certpulse.errors import Reason, Refusal
from certpulse.sql.db import sqlite_url

SYSTEM_CA_DIR = Path("/var/lib/certpulse-ca")
CONFIG_NAME = "ca.toml"


def resolve_ca_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    env = os.environ.get("CERTPULSE_CA_DIR")
    return Path(env) if env else SYSTEM_CA_DIR


@dataclasses.dataclass(frozen=True)
class CAConfig:
    """What ``ca.toml`` holds. The database URL may point at PostgreSQL."""

    name: str
    database_url: str
    policy_id: str
    max_request_bytes: int = 64 * 1024
    token_lifetime_hours: int = 24


@dataclasses.dataclass(frozen=True)
class CADir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    def default_database_url(self) -> str:
        return sqlite_url(self.root.resolve() / "ca.db")

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load(self) -> CAConfig:
        if not self.exists():
            raise Refusal(
                Reason.NOT_FOUND,
                f"no CA in {self.root} (run 'certpulse ca init --dir {self.root}' first)",
            )
        try:
            data = tomllib.loads(self.config_path.read_text())
            return CAConfig(
                name=str(data["name"]),
                database_url=str(data["database_url"]),
                policy_id=str(data["policy_id"]),
                max_request_bytes=int(data.get("max_request_bytes", 64 * 1024)),
                token_lifetime_hours=int(data.get("token_lifetime_hours", 24)),
            )
        except (OSError, tomllib.TOMLDecodeError, KeyError, ValueError) as exc:
            raise Refusal(Reason.STORE, f"cannot read {self.config_path}: {exc}") from None

    def save(self, config: CAConfig) -> None:
        self.config_path.write_text(tomli_w.dumps(dataclasses.asdict(config)))


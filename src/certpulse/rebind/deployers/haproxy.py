"""``haproxy``: the combined PEM written, then haproxy told — without a restart when it can be.

Options:

* ``pem`` (required) — the combined PEM file (leaf, chain, key) that a ``bind ... ssl crt``
  line loads, as ``PATH`` or ``PATH:OWNER:GROUP:MODE`` like the ``files`` options.
* ``stats_socket`` — the unix socket of haproxy's runtime API (``stats socket PATH level admin``
  in its ``global`` section: updating certificates needs the admin level). The new certificate
  goes into the running process with ``set ssl cert NAME <<`` and ``commit ssl cert NAME``: no
  reload, no dropped connection. The file is still written so that the next start loads it.
* ``cert_name`` — the name haproxy knows the certificate by: the path as written in its
  configuration (default: ``pem``).
* ``reload`` — instead of the socket, a command line (``systemctl reload haproxy``), run without
  a shell like the ``files`` reload; ``reload_timeout`` its time limit in seconds (default 60).

Exactly one of ``stats_socket`` and ``reload``: a haproxy binding that tells haproxy nothing
would only be found stale by the next probe. Answers of the runtime API (haproxy 2.2 and later):
``Transaction created for certificate NAME!`` (or ``updated``) for ``set``, ``Committing NAME`` and
dots then ``Success!`` for ``commit``; anything else is an error (``Can't update``, ``Can't
commit``, ``inconsistencies between private key and certificate``), after which the transaction
is aborted so the running haproxy keeps the certificate it serves.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from cryptography import x509

from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import thumbprint
from certpulse.rebind.deployers.atomic import FileSpec, deploy_files, restore_files
from certpulse.rebind.deployers.base import Backup, Deployer, DeployFailed, Material
from certpulse.rebind.deployers.files import refuse_unknown
from certpulse.rebind.deployers.runner import reload_options, run_reload

API_TIMEOUT = 10.0  # seconds for one runtime API command, connection included
MAX_ANSWER = 1024 * 1024
_SET_OK = ("Transaction created for certificate", "Transaction updated for certificate")
_NAME = re.compile(r"^[^\s\\*'\"#;][^\s\\'\"#;]*\Z")


def _refuse(detail: str) -> Refusal:
    return Refusal(Reason.INVALID_ARGUMENT, detail)


class RuntimeApi:
    """haproxy's runtime API on a unix socket: one command per connection (haproxy answers and
    closes in its non-interactive mode), every step bounded by ``timeout``."""

    def __init__(self, path: str, *, timeout: float = API_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def ask(self, command: bytes) -> str:
        deadline = time.monotonic() + self.timeout
        answer = bytearray()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(command)
                while len(answer) <= MAX_ANSWER:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("no complete answer in time")
                    sock.settimeout(remaining)
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        except OSError as exc:
            raise DeployFailed(f"haproxy's runtime API at {self.path}: {exc.strerror or exc}",
                               answer.decode("utf-8", "replace")) from None
        return answer.decode("utf-8", "replace")

    def replace_certificate(self, name: str, pem: bytes) -> str:
        """Stage ``pem`` as certificate ``name`` and commit it; the answers. On any refusal the
        transaction is aborted and :class:`DeployFailed` carries haproxy's words."""
        payload = b"".join(line + b"\n" for line in pem.splitlines() if line.strip())
        staged = self.ask(b"set ssl cert " + name.encode() + b" <<\n" + payload + b"\n")
        if not staged.startswith(_SET_OK):
            self._abort(name)
            raise DeployFailed(f"haproxy refused the certificate for {name}: {_first_line(staged)}", staged)
        committed = self.ask(b"commit ssl cert " + name.encode() + b"\n")
        if not (committed.startswith("Committing") and "\nSuccess!" in committed):
            self._abort(name)
            raise DeployFailed(f"haproxy did not commit the certificate for {name}: {_error_line(committed)}",
                               staged + committed)
        return staged + committed

    def loaded_thumbprint(self, name: str) -> str | None:
        """SHA-1 of the certificate haproxy has committed under ``name`` (``show ssl cert``), or
        None when it knows no such certificate."""
        answer = self.ask(b"show ssl cert " + name.encode() + b"\n")
        match = re.search(r"^SHA1 FingerPrint: ([0-9A-Fa-f]{40})$", answer, re.MULTILINE)
        return match[1].upper() if match else None

    def _abort(self, name: str) -> None:
        # Nothing was committed either way; the refusal is what gets reported.
        with contextlib.suppress(DeployFailed):
            self.ask(b"abort ssl cert " + name.encode() + b"\n")


def _first_line(answer: str) -> str:
    return next((line for line in answer.splitlines() if line.strip()), "no answer")


def _error_line(answer: str) -> str:
    lines = [line for line in answer.splitlines() if line.strip() and not line.startswith("Committing")]
    return lines[0] if lines else _first_line(answer)


class HaproxyDeployer(Deployer):
    """Combined PEM, then the runtime API (hot) or a reload command."""

    kind: ClassVar[str] = "haproxy"
    summary: ClassVar[str] = "combined PEM, then haproxy's runtime API (no restart) or a reload command"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"pem", "stats_socket", "cert_name", "reload", "reload_timeout"})

    def parse_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        refuse_unknown(raw, self.OPTIONS, self.kind)
        if "pem" not in raw:
            raise _refuse("pem=PATH is required: the combined PEM haproxy's 'bind ... ssl crt' loads")
        spec = FileSpec.parse(raw["pem"], "pem", secret=True)
        options: dict[str, Any] = {"pem": spec.to_json()}
        if ("stats_socket" in raw) == ("reload" in raw):
            raise _refuse("give exactly one of stats_socket=PATH (runtime API, no restart) or reload=COMMAND")
        if "stats_socket" in raw:
            path = raw["stats_socket"]
            if not path.startswith("/") or "\0" in path:
                raise _refuse(f"stats_socket: {path!r} is not an absolute path")
            options["stats_socket"] = path
        if "cert_name" in raw and "stats_socket" not in raw:
            raise _refuse("cert_name is only used with stats_socket")
        name = raw.get("cert_name", spec.path)
        if not _NAME.match(name):
            raise _refuse(f"cert_name {name!r}: haproxy's name for it may hold no spaces, quotes, "
                          "backslashes, '#' or ';' and may not start with '*'")
        if "stats_socket" in raw:
            options["cert_name"] = name
        options |= reload_options(raw)
        return options

    def deploy(self, options: Mapping[str, Any], material: Material) -> Backup:
        spec = FileSpec.from_json(options["pem"])
        return Backup(files=deploy_files([(spec, material.combined_pem, True)]))

    def reload(self, options: Mapping[str, Any], material: Material, *, old_thumbprint: str | None = None) -> str:
        if options.get("stats_socket"):
            return RuntimeApi(options["stats_socket"]).replace_certificate(options["cert_name"],
                                                                          material.combined_pem)
        return run_reload(options)

    def restore(self, options: Mapping[str, Any], backup: Backup) -> None:
        """The previous file back and, with a runtime API, the previous certificate back in the
        running haproxy when it holds another one (the new one was committed, and then something
        later failed). A haproxy that is not running loads the restored file when it starts."""
        restore_files(backup.files)
        previous = backup.files[0].content if backup.files else None
        if not options.get("stats_socket") or previous is None:
            return
        api = RuntimeApi(options["stats_socket"])
        try:
            loaded = api.loaded_thumbprint(options["cert_name"])
        except DeployFailed:
            return  # not running: nothing in memory to put back
        wanted = _leaf_thumbprint(previous)
        if loaded is not None and wanted is not None and loaded != wanted:
            api.replace_certificate(options["cert_name"], previous)


def _leaf_thumbprint(pem: bytes) -> str | None:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return None
    return thumbprint(certificates[0]) if certificates else None


__all__ = ["HaproxyDeployer", "RuntimeApi"]

"""``command``: a command told the OLD and NEW thumbprints, the shape of IIS's
``appcmd renew binding /oldcert:OLD /newcert:NEW`` — for consumers that look certificates up by
thumbprint themselves (a Windows-style store, a keystore updated by its own tool).

Options:

* ``command`` (required) — the absolute path of the executable. It is checked and pinned like a
  notification task's command (:mod:`certpulse.sandbox`): owned by root or the agent's
  user, writable by nobody else, no folder on its way writable by others; its SHA-256 is stored
  with the binding, and at reload time exactly the checked bytes run. A command changed since
  ``binding add`` is refused, never run (add the binding again to re-pin it).
* ``args`` — extra arguments, as one shell-like line split with :func:`shlex.split` (no shell
  ever runs); they come before OLD and NEW.
* ``timeout`` — seconds before its process group is killed (default 60).

The command runs as ``COMMAND [ARGS...] OLD NEW``, OLD being empty for a first deployment, with
a fixed environment holding ``CERTPULSE_OLD_THUMBPRINT`` and ``CERTPULSE_NEW_THUMBPRINT`` too and
the new certificate's PEM on standard input. Nothing is written to disk, so there is nothing to
restore: a command that fails must leave its consumer as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from certpulse.errors import Reason, Refusal
from certpulse.rebind.deployers.base import Backup, Deployer, DeployFailed, Material
from certpulse.rebind.deployers.files import refuse_unknown
from certpulse.rebind.deployers.runner import DEFAULT_TIMEOUT, output_text, parse_command_line, parse_timeout
from certpulse.sandbox import allowed_uids, check_command, run_command, task_environment


class CommandDeployer(Deployer):
    """A pinned command run with OLD and NEW thumbprints."""

    kind: ClassVar[str] = "command"
    summary: ClassVar[str] = "a pinned command run as COMMAND [ARGS] OLD NEW (appcmd renew binding's shape)"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"command", "args", "timeout"})

    def parse_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        refuse_unknown(raw, self.OPTIONS, self.kind)
        if "command" not in raw:
            raise Refusal(Reason.INVALID_ARGUMENT, "command=PATH is required")
        if not raw["command"].startswith("/"):
            raise Refusal(Reason.INVALID_ARGUMENT, f"command: {raw['command']!r} is not an absolute path")
        path, sha256 = check_command(raw["command"], allowed_uids=allowed_uids())
        options: dict[str, Any] = {"command": str(path), "sha256": sha256}
        options["args"] = parse_command_line(raw["args"], "args") if raw.get("args", "").strip() else []
        if "timeout" in raw:
            options["timeout"] = parse_timeout(raw["timeout"], "timeout")
        return options

    def deploy(self, options: Mapping[str, Any], material: Material) -> Backup:
        return Backup()

    def reload(self, options: Mapping[str, Any], material: Material, *, old_thumbprint: str | None = None) -> str:
        old = old_thumbprint or ""
        env = task_environment({"CERTPULSE_OLD_THUMBPRINT": old, "CERTPULSE_NEW_THUMBPRINT": material.thumbprint})
        result = run_command(options["command"], options["sha256"], args=[*options.get("args", []), old,
                                                                          material.thumbprint],
                             stdin=material.cert_pem, env=env,
                             timeout=float(options.get("timeout", DEFAULT_TIMEOUT)))
        text = output_text(result)
        if result.outcome != "ok":
            reason = f"{result.reason}: " if result.reason else ""
            raise DeployFailed(f"{options['command']}: {reason}{result.detail}", text)
        return text

    def restore(self, options: Mapping[str, Any], backup: Backup) -> None:
        return None


__all__ = ["CommandDeployer"]

"""Deployer plugins: one per kind of consumer (``files``, ``nginx``, ``haproxy``, ``command``, and
any kind a third-party package declares in the ``certpulse.deployers`` entry-point group). The
interface and the discovery are in :mod:`certpulse.rebind.deployers.base`."""

from certpulse.rebind.deployers.base import (
    Backup,
    Deployer,
    DeployFailed,
    FileSnapshot,
    Material,
    get_deployer,
    load_deployers,
)

__all__ = ["Backup", "DeployFailed", "Deployer", "FileSnapshot", "Material", "get_deployer", "load_deployers"]

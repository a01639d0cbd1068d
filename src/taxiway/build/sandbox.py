"""Run a buildpack's executable inside the build image.

A private mount namespace (``unshare -m``) with the build image's root bound
read-only, the build's own folders bound in (``/workspace``, ``/layers``,
``/platform``, ``/cnb/buildpacks``), fresh ``/proc``, ``/tmp`` and a home, and
then ``chroot`` as the unprivileged ``cnb`` user with a clean environment. The
namespace dies with the process, so no mount outlives a step. The network is
the host's: dependency installs reach PyPI and the npm registry.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from taxiway.errors import TaxiwayError

UID = 1000
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: Build-time only: make Node and Deno use that bundle too.
TRUST_ENV = {"NODE_EXTRA_CA_CERTS": HOST_CA_BUNDLE, "DENO_TLS_CA_STORE": "system,mozilla", "SSL_CERT_FILE": HOST_CA_BUNDLE}
GID = 1000


@dataclass
class Sandbox:
    """The build image root plus host folders to bind at fixed paths inside it."""

    rootfs: Path
    binds: dict[str, Path] = field(default_factory=dict)  # inside path -> host path
    ro_binds: dict[str, Path] = field(default_factory=dict)

    def script(self, mnt: str) -> str:
        q = shlex.quote
        lines = [
            "set -e",
            f"mount --bind {q(str(self.rootfs))} {q(mnt)}",
            f"mount -o remount,bind,ro {q(mnt)}",
            f"mount -t proc proc {q(mnt)}/proc",
            f"mount --rbind /dev {q(mnt)}/dev",
            f"mount -t tmpfs -o mode=1777 tmpfs {q(mnt)}/tmp",
            f"mount -t tmpfs -o mode=0755,uid={UID},gid={GID} tmpfs {q(mnt)}/home/cnb",
        ]
        if os.path.exists("/etc/resolv.conf"):
            lines.append(f"mount --bind /etc/resolv.conf {q(mnt)}/etc/resolv.conf")
        # Builds trust what the host trusts (a site's TLS-intercepting proxy CA, for instance).
        ca = HOST_CA_BUNDLE
        if os.path.isfile(ca) and os.path.isfile(str(self.rootfs) + ca):
            lines.append(f"mount --bind {ca} {q(mnt + ca)}")
        for inside, host in self.binds.items():
            lines.append(f"mount --bind {q(str(host))} {q(mnt + inside)}")
        for inside, host in self.ro_binds.items():
            lines.append(f"mount --bind {q(str(host))} {q(mnt + inside)}")
            lines.append(f"mount -o remount,bind,ro {q(mnt + inside)}")
        return "\n".join(lines)

    def run(self, argv: list[str], env: dict[str, str], cwd: str = "/workspace", log: Path | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in the sandbox; output (stdout+stderr) goes to ``log`` or is captured."""
        with tempfile.TemporaryDirectory(prefix="taxiway-mnt-") as mnt:
            envargs = [f"{k}={v}" for k, v in sorted(env.items())]
            inner = ["chroot", f"--userspec={UID}:{GID}", "--groups=" + str(GID), mnt, "/usr/bin/env", "-i",
                     *envargs, "/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
            script = self.script(mnt) + "\nexec " + shlex.join(inner)
            cmd = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script]
            try:
                if log is not None:
                    with open(log, "ab") as f:
                        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
                return subprocess.run(cmd, capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired as e:
                raise TaxiwayError(f"{argv[0]} ran longer than {timeout:.0f}s", "look at the build log") from e


def check_root() -> None:
    """Builds need mount namespaces and chroot: root (or CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        raise TaxiwayError("taxiway build needs root to run buildpacks in the build image (mount namespace + chroot)",
                           "run it with sudo")

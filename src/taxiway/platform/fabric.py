"""The private network's plumbing on one host: the fabric network namespace and machines' veths.

    host netns (untouched)          fabric netns ($TAXIWAY_HOME/platform/net/fabric)
      DNS, egress proxy, API ---->  lo: fdaa::3 (their sockets, made by listen_socket)
                                    tw1: fe80::1 ---- veth ---- eth0: fdaa:0:1:1::1  machine A
                                    tw2: fe80::1 ---- veth ---- eth0: fdaa:0:2:1::2  machine B

The fabric is a network namespace the platform makes for itself and keeps as a bind-mounted
nsfs file under ``$TAXIWAY_HOME/platform/net/`` (as ``ip netns add`` does under /run/netns,
which we never touch): it outlives every process, so a ``kill -9`` of the control plane never
cuts a machine off. It routes between machines (one /128 route per veth) and holds the
platform's service address; ip6tables inside it decide who reaches whom (see
:func:`base_rules` and :func:`machine_rules`). Each machine has its own persistent netns file
too (``net/machines/<platform id>``), plugged before the machine's first process runs: the
namespace runtime's PID 1 joins it (``MachineConfig.net`` = that path).

Commands (``ip``, ``ip6tables-restore``) run INSIDE these namespaces through ``nsenter``;
nothing here changes the host's own network namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from taxiway.errors import TaxiwayError
from taxiway.platform import network as N

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_NS_GET_NSTYPE = 0xB703  # ioctl: the type of the namespace an nsfs fd refers to
NO_FABRIC_FIX = "start the platform with `taxiway up` (it makes the fabric)"
_NDP = ("neighbour-solicitation", "neighbour-advertisement", "router-solicitation")


# -- the rules (pure) ------------------------------------------------------------------------------


def base_rules() -> str:
    """The fabric's ip6tables ruleset (ip6tables-restore format), installed once at :meth:`Fabric.ensure`.

    - raw PREROUTING: whatever comes in from a machine's veth (``tw*``/``th*``) goes through
      ``TW-SRC``, which accepts only that machine's own source address (per-machine rules,
      :func:`machine_rules`) and drops the rest: a forged source never reaches routing, so the
      source address is the machine's identity for DNS and egress;
    - INPUT (to the fabric itself): only fdaa::3 udp/tcp 53, tcp 3128, tcp 4280 and neighbour
      discovery; anything else is refused (TCP reset, ICMPv6 administratively prohibited), so a
      machine's connect fails at once instead of hanging;
    - FORWARD (machine to machine): ``TW-FWD`` accepts a packet from machine X only towards X's
      org /48; anything else is refused.
    """
    svc = f"{N.SERVICE_ADDRESS}/128"
    lines = ["*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":TW-SRC - [0:0]",
             # every rule below is stateless (both directions of an allowed flow match on their own),
             # so no connection tracking: it costs ~10% of throughput per forwarded packet
             "-A PREROUTING -j CT --notrack", "-A OUTPUT -j CT --notrack",
             "-A PREROUTING -i tw+ -j TW-SRC", "-A PREROUTING -i th+ -j TW-SRC", "-A TW-SRC -j DROP", "COMMIT",
             "*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]", ":TW-FWD - [0:0]",
             "-A INPUT -i lo -j ACCEPT"]
    lines += [f"-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in _NDP]
    lines.append(f"-A INPUT -d {svc} -p ipv6-icmp -m icmp6 --icmpv6-type echo-request -j ACCEPT")
    lines += [f"-A INPUT -d {svc} -p {proto} -m {proto} --dport {port} -j ACCEPT" for port, proto in N.SERVICE_PORTS]
    for chain in ("INPUT", "FORWARD"):
        if chain == "FORWARD":
            lines.append("-A FORWARD -j TW-FWD")
        lines += [f"-A {chain} -p tcp -j REJECT --reject-with tcp-reset",
                  f"-A {chain} -j REJECT --reject-with icmp6-adm-prohibited"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


BASE_RULES_V4 = "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT DROP [0:0]\n-A OUTPUT -o lo -j ACCEPT\n" \
                "-A INPUT -i lo -j ACCEPT\nCOMMIT\n"  # the fabric speaks no IPv4 at all


def machine_rules(key: str, veth: str, address: str, org: int, op: str = "-I") -> str:
    """One machine's rules (``op`` -I to add, -D to remove), tagged with its key."""
    tag = f'-m comment --comment "tw:{key}"'
    return "\n".join([
        "*raw",
        f"{op} TW-SRC -i {veth} -s {address}/128 {tag} -j ACCEPT",
        f"{op} TW-SRC -i {veth} -s fe80::/10 -p ipv6-icmp {tag} -j ACCEPT",
        "COMMIT", "*filter",
        f"{op} TW-FWD -i {veth} -s {address}/128 -d {N.org_prefix(org)} {tag} -j ACCEPT",
        "COMMIT"]) + "\n"


# -- namespaces ------------------------------------------------------------------------------------


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
    else:
        from taxiway.machines import linux

        linux.setns(fd, CLONE_NEWNET)


def is_netns(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a network namespace file (a bind mount of an nsfs inode)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def run_in(path: str | os.PathLike[str], fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a fresh thread that joined network namespace ``path`` (setns is per thread);
    sockets it makes stay in that namespace for good."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            _setns(fd)
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = e

    try:
        t = threading.Thread(target=body, name="taxiway-netns", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in out:
        raise out["error"]
    return out["value"]


def _nsenter(path: Path, argv: list[str], stdin: str | None = None) -> str:
    r = subprocess.run(["nsenter", f"--net={path}", *argv], input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise TaxiwayError(f"private network: {argv[0]} failed in {path.name}: "
                           f"{(r.stderr or r.stdout).strip()[:400]}",
                           "check that iproute2 and iptables are installed and that taxiway runs as root")
    return r.stdout


def _sysctl_script(items: dict[str, str]) -> str:
    return "".join(f"echo {v} > /proc/sys/net/{k}\n" for k, v in items.items())


def _new_netns(path: Path) -> None:
    """A new, empty network namespace kept alive by a bind mount on ``path``."""
    if is_netns(path):
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.touch(mode=0o600)
    r = subprocess.run(["unshare", f"--net={path}", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        with contextlib.suppress(OSError):
            path.unlink()
        raise TaxiwayError(f"cannot make a network namespace at {path}: {r.stderr.strip()[:300]}",
                           "taxiway's platform runs as root with util-linux's unshare")


def _drop_netns(path: Path) -> None:
    from taxiway.machines import linux

    with contextlib.suppress(OSError):
        linux.umount(str(path), linux.MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# -- the fabric ------------------------------------------------------------------------------------


class Fabric:
    """One host's fabric: ``root/fabric`` (its netns file), ``root/machines/<key>`` (machines')."""

    def __init__(self, root: Path, host: int = N.DEFAULT_HOST) -> None:
        self.root = Path(root)
        self.host = host
        self.path = self.root / "fabric"
        self.machines = self.root / "machines"

    @classmethod
    def for_home(cls, home: Path | str | None = None) -> Fabric:
        """The fabric of the platform at ``home`` ($TAXIWAY_HOME when None)."""
        if home is None:
            from taxiway.paths import home as taxiway_home

            home = taxiway_home()
        return cls(Path(home) / "platform" / "net")

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.machines.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def exists(self) -> bool:
        return is_netns(self.path)

    def ensure(self) -> None:
        """Make the fabric if it is not there (idempotent): fdaa::3, forwarding, the rules."""
        with self._locked():
            if self.exists():
                return
            _new_netns(self.path)
            try:
                _nsenter(self.path, ["sh", "-ec", _sysctl_script({
                    "ipv6/conf/all/forwarding": "1", "ipv6/conf/default/accept_dad": "0",
                    "ipv6/conf/default/accept_ra": "0", "ipv6/conf/default/autoconf": "0",
                    "ipv6/conf/default/addr_gen_mode": "1"})
                    + f"ip link set lo up\nip addr add {N.SERVICE_ADDRESS}/128 dev lo\n"])
                _nsenter(self.path, ["ip6tables-restore"], base_rules())
                _nsenter(self.path, ["iptables-restore"], BASE_RULES_V4)
            except BaseException:
                _drop_netns(self.path)
                raise

    def teardown(self) -> None:
        """Remove the fabric and every machine netns file (machines still in them lose their network)."""
        with self._locked():
            for p in self.machines.iterdir():
                if p.suffix != ".json":
                    _drop_netns(p)
                else:
                    p.unlink(missing_ok=True)
            _drop_netns(self.path)

    def plugged(self) -> list[str]:
        """Keys of the machines that have a netns file here."""
        if not self.machines.is_dir():
            return []
        return sorted(p.name for p in self.machines.iterdir() if p.suffix != ".json" and not p.name.startswith("."))

    def machine_path(self, key: str) -> Path:
        return self.machines / key

    def info(self, key: str) -> dict[str, Any] | None:
        """What :meth:`plug` recorded for ``key``: {"org", "host", "field", "address", "veth"}."""
        try:
            return json.loads((self.machines / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def plug(self, key: str, org: int, field: int) -> Path:
        """The netns file of machine ``key``, plugged into the fabric at its address (idempotent).

        Safe to call again for a machine that already runs (adoption, restart): an intact
        plug is left alone; a broken one (the fabric was remade) is plugged again.
        """
        if "/" in key or key.startswith(".") or not key:
            raise ValueError(f"bad machine key {key!r}")
        address = str(N.machine_address(org, self.host, field))
        veth = N.veth_name(field)
        mpath = self.machines / key
        self.ensure()
        with self._locked():
            old = self.info(key)
            if old and (old.get("address") != address or old.get("veth") != veth):
                self._unplug_locked(key)
            if is_netns(mpath) and self._has_link(self.path, veth) and self._has_link(mpath, "eth0"):
                return mpath
            _new_netns(mpath)
            with contextlib.suppress(TaxiwayError):  # remains of an earlier plug (fabric remade)
                _nsenter(mpath, ["ip", "link", "del", "eth0"])
            with contextlib.suppress(TaxiwayError):
                _nsenter(self.path, ["ip", "link", "del", veth])
            _nsenter(self.path, ["sh", "-ec",
                                 f"ip link add {veth} type veth peer name eth0 netns {shlex.quote(str(mpath))}\n"
                                 f"ip addr add {N.GATEWAY}/64 dev {veth} nodad\n"
                                 f"ip link set {veth} up\n"
                                 f"ip route replace {address}/128 dev {veth}\n"])
            _nsenter(mpath, ["sh", "-ec", _sysctl_script({
                "ipv6/conf/eth0/accept_ra": "0", "ipv6/conf/eth0/autoconf": "0", "ipv6/conf/eth0/accept_dad": "0",
                "ipv6/conf/eth0/addr_gen_mode": "0"})
                + f"ip link set lo up\nip addr add {address}/128 dev eth0 nodad\nip link set eth0 up\n"
                  f"ip route add {N.GATEWAY} dev eth0\nip route add default via {N.GATEWAY} dev eth0\n"])
            with contextlib.suppress(TaxiwayError):  # rules of an earlier plug of the same veth
                _nsenter(self.path, ["ip6tables-restore", "--noflush"], machine_rules(key, veth, address, org, "-D"))
            _nsenter(self.path, ["ip6tables-restore", "--noflush"], machine_rules(key, veth, address, org))
            from taxiway.fsutil import atomic_write

            with atomic_write(self.machines / f"{key}.json", 0o600, binary=False, fsync=False) as f:
                json.dump({"org": org, "host": self.host, "field": field, "address": address, "veth": veth}, f)
        return mpath

    def unplug(self, key: str) -> None:
        """Unplug machine ``key`` and remove its netns file (nothing to do when it was never plugged)."""
        with self._locked():
            self._unplug_locked(key)

    def _unplug_locked(self, key: str) -> None:
        info = self.info(key)
        if info and self.exists():
            with contextlib.suppress(TaxiwayError):
                _nsenter(self.path, ["ip6tables-restore", "--noflush"],
                         machine_rules(key, info["veth"], info["address"], info["org"], "-D"))
            with contextlib.suppress(TaxiwayError):  # deleting one end removes the pair
                _nsenter(self.path, ["ip", "link", "del", info["veth"]])
        _drop_netns(self.machines / key)
        (self.machines / f"{key}.json").unlink(missing_ok=True)

    @staticmethod
    def _has_link(ns: Path, name: str) -> bool:
        if not is_netns(ns):
            return False
        try:
            run_in(ns, socket.if_nametoindex, name)
        except OSError:
            return False
        return True


def host_fabric(home: Path | str | None = None, wanted: bool = True) -> Fabric | None:
    """The fabric of the platform at ``home``, or None when the private network is off
    (``wanted`` False, env TAXIWAY_PRIVATE_NETWORK=0) or impossible (its tools are missing)."""
    import logging
    import shutil

    if not wanted or os.environ.get("TAXIWAY_PRIVATE_NETWORK", "1") == "0":
        return None
    missing = [t for t in ("ip", "ip6tables-restore", "iptables-restore", "nsenter", "unshare") if not shutil.which(t)]
    if missing:
        logging.getLogger("taxiway.fabric").warning(
            "no private network for machines: %s not installed (apt-get install iproute2 iptables)", ", ".join(missing))
        return None
    return Fabric.for_home(home)


def listen_socket(family: int, type: int, addr: str, port: int, *, fab: Fabric | None = None,  # noqa: A002
                  backlog: int = 128, reuse: bool = True) -> socket.socket:
    """A socket bound to ``addr``:``port`` INSIDE the fabric (e.g. fdaa::3 port 53).

    For the platform's services, which run in the host's netns (they reach the host's
    resolver and the outside) yet answer machines on the private network. A SOCK_STREAM socket
    is returned listening. Raises TaxiwayError when this host has no fabric.
    """
    fab = fab or Fabric.for_home()
    if not fab.exists():
        raise TaxiwayError(f"no private network fabric at {fab.path}", NO_FABRIC_FIX)

    def make() -> socket.socket:
        s = socket.socket(family, type)
        try:
            if reuse:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            if type == socket.SOCK_STREAM:
                s.listen(backlog)
        except BaseException:
            s.close()
            raise
        return s

    try:
        return run_in(fab.path, make)
    except OSError as e:
        raise TaxiwayError(f"cannot listen on [{addr}]:{port} in the private network: {e.strerror or e}",
                           "is another platform service already bound there?") from None


def netns_mounts(under: Path | str) -> list[str]:
    """Mount points of network namespace files below ``under`` (from /proc/self/mountinfo)."""
    root = os.path.realpath(under).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            point = head.split()[4].replace("\\040", " ")
            if tail.split()[:1] == ["nsfs"] and (point + "/").startswith(root):
                out.append(point)
    return out


def release_all(under: Path | str) -> int:
    """Unmount every network namespace file below ``under`` (tests' safety net, a purge); returns how many."""
    points = netns_mounts(under)
    for p in points:
        _drop_netns(Path(p))
    return len(points)


class Relay:
    """TCP connections accepted inside the fabric (e.g. fdaa::3:4280) relayed to a host loopback port.

    For a platform service that listens on loopback only (the Machines API): the accepting thread
    runs in the host's netns, while the listening socket (and so every accepted one) belongs to
    the fabric; each connection is copied both ways by :func:`taxiway.machines.ports.pipe`.

    Every machine of every org can open connections here, so they are bounded: at most
    ``max_connections`` at once, ``max_per_source`` from one address, and a connection idle for
    ``idle_timeout`` seconds is closed (each one holds two threads: unbounded, a machine opening
    connections in a loop made the host's supervisor run ~20,000 threads; red team, issue 17).
    """

    def __init__(self, listener: socket.socket, target: tuple[str, int], *, max_connections: int = 256,
                 max_per_source: int = 32, idle_timeout: float = 300.0) -> None:
        self.listener, self.target = listener, target
        self.max_connections, self.max_per_source, self.idle_timeout = max_connections, max_per_source, idle_timeout
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self.thread = threading.Thread(target=self._serve, name="taxiway-fabric-relay", daemon=True)

    def start(self) -> Relay:
        self.thread.start()
        return self

    def _admit(self, source: str) -> bool:
        with self._lock:
            if sum(self._open.values()) >= self.max_connections or self._open.get(source, 0) >= self.max_per_source:
                return False
            self._open[source] = self._open.get(source, 0) + 1
            return True

    def _release(self, source: str) -> None:
        with self._lock:
            left = self._open.get(source, 1) - 1
            if left > 0:
                self._open[source] = left
            else:
                self._open.pop(source, None)

    def _serve(self) -> None:
        while True:
            try:
                client, peer = self.listener.accept()
            except OSError:
                return  # closed
            source = str(peer[0])
            if not self._admit(source):
                client.close()  # over a limit: refused at once, nothing held
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                self._release(source)
                continue
            client.settimeout(self.idle_timeout)
            upstream.settimeout(self.idle_timeout)
            threading.Thread(target=self._pair, args=(client, upstream, source), daemon=True).start()

    def _pair(self, client: socket.socket, upstream: socket.socket, source: str) -> None:
        from taxiway.machines.ports import pipe

        back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        back.start()
        try:
            pipe(client, upstream)
            back.join()
        finally:
            client.close()
            upstream.close()
            self._release(source)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()


def relay(port: int, target: tuple[str, int], *, fab: Fabric | None = None) -> Relay:
    """Relay ``[fdaa::3]:port`` in the fabric to ``target`` (a host loopback address), started."""
    return Relay(listen_socket(socket.AF_INET6, socket.SOCK_STREAM, str(N.SERVICE_ADDRESS), port, fab=fab),
                 target).start()

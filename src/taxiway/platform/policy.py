"""What a tenant's machine may be: the platform's machine-config policy (pure; no I/O).

The Machines API takes a config from any org token, so it must never reach the
runtime's privileged knobs (capabilities, seccomp, host network, host bind
mounts, devices...). :func:`check_config` takes a MACHINES.config and returns
it normalised, or raises one :class:`InvalidInput` naming the field. The API
calls it before writing anything; the agent calls it again before creating a
machine (a record written straight into NATS gets no privileged machine
either). Image references are checked here too, without any DNS or network:
only the platform's registry (or, on a platform without one, the local store)
may be named.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from taxiway.errors import InvalidInput

GiB = 1 << 30
MAX_MEMORY = 64 * GiB           # a guest's memory, whatever the host has
MAX_ENV_BYTES = 64 * 1024       # keys + values of config.env
MAX_STORAGE = 1024 * GiB        # storage_size (the writable layer's ext4 file)
MAX_VOLUME_SIZE = 1024 * GiB    # a volume record's size
MAX_MACHINES_PER_APP = 1000
MAX_MACHINES_PER_ORG = 2000     # across all its apps (each machine holds an address, disk, maybe a veth)
MAX_APPS_PER_ORG = 200
MAX_PIDS = 1 << 22              # the kernel's pid_max ceiling
MAX_STOP_TIMEOUT = 3600.0
MIN_MEMORY = 6 * 1024 * 1024    # as taxiway.machines.config.MIN_MEMORY

# Every MACHINES.config key the platform documents (README, Platform section); anything else is refused.
# The ones in _FIXED are MachineConfig fields a tenant may only send at their hardened default.
_FIXED: dict[str, tuple[Any, ...]] = {
    "net": ("private",), "auto_remove": (False,), "tty": (False,), "interactive": (False,),
    "cap_add": ([],), "seccomp": (None,), "ports": ([],),
    # the private network: the agent sets net (the machine's netns file) and dns AFTER this check
    "dns": (None,), "private_ip": (None,),
}
ALLOWED_KEYS = frozenset({
    "image", "cmd", "entrypoint", "env", "workdir", "user", "hostname", "guest", "restart", "checks",
    "services", "metadata", "mounts", "volumes", "stop_signal", "stop_timeout", "isolation", "vm_accel",
    "cap_drop", "storage_size", *_FIXED,
})
_FIX_FIELD = "leave it out: tenants' machines get the platform's hardened defaults"

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_CAP = re.compile(r"^(CAP_)?[A-Z_]{2,32}$")
_SIGNAL = re.compile(r"^(SIG)?[A-Z0-9+-]{1,16}$|^[0-9]{1,2}$")
_RESERVED = ("/", "/proc", "/sys", "/dev")


@dataclass(frozen=True)
class Limits:
    """Quotas a config is checked against (the host's size where it is smaller)."""

    memory: int = MAX_MEMORY
    cpus: float = 64.0
    env_bytes: int = MAX_ENV_BYTES
    storage: int = MAX_STORAGE


def host_limits() -> Limits:
    """:class:`Limits` capped by this host's memory and CPUs (reads sysconf: not pure, but cheap)."""
    import os

    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        mem = MAX_MEMORY
    return Limits(memory=min(MAX_MEMORY, mem), cpus=float(os.cpu_count() or 1))


def _bad(field: str, what: str, fix: str) -> InvalidInput:
    return InvalidInput(f"config.{field} {what}", fix)


# -- image references ----------------------------------------------------------------------------------

def image_source(ref: str, registry: str | None) -> str:
    """Where ``ref`` may come from: "registry" (the platform's, ``registry`` = its host:port) or "local"
    (the host's store, only on a platform without a registry). Anything else raises InvalidInput.

    Purely textual: no name is resolved, nothing is contacted, so a tenant can't make the platform
    reach an address of its choosing."""
    from taxiway.oci.reference import Reference

    if not isinstance(ref, str) or not ref.strip() or "\x00" in ref or len(ref) > 512:
        raise _bad("image", "is required (a string)", "send {\"config\": {\"image\": \"<registry>/<name>:<tag>\"}}")
    try:
        parsed = Reference.parse(ref)
    except InvalidInput as e:
        raise _bad("image", f"{ref[:200]!r} is not an image reference ({e.message})", e.hint or "fix it") from None
    host = parsed.registry
    if registry and host in _same_registry(registry):
        return "registry"
    if not registry and host == "localhost":
        return "local"
    where = f"the platform's registry {registry}" if registry else "this host's store (localhost/...)"
    fix = (f"push the image to {registry} (taxiway deploy does) and use {registry}/<name>:<tag>" if registry
           else "load or build the image on this host as localhost/<name>:<tag>")
    raise _bad("image", f"{ref[:200]!r} is not on {where}; other registries are never contacted", fix)


def _same_registry(registry: str) -> tuple[str, ...]:
    host, _, port = registry.rpartition(":")
    if host in ("127.0.0.1", "localhost") and port:
        return (f"127.0.0.1:{port}", f"localhost:{port}")
    return (registry,)


# -- names --------------------------------------------------------------------------------------------

def check_machine_name(name: Any) -> str:
    """A machine name: a DNS label (lowercase letters, digits, '-', 1-63 characters)."""
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        raise InvalidInput(f"invalid machine name {str(name)[:80]!r}",
                           "use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit")
    return name


def check_machine_count(existing: int) -> None:
    """Refuse a new machine when the app already has :data:`MAX_MACHINES_PER_APP`."""
    if existing >= MAX_MACHINES_PER_APP:
        raise InvalidInput(f"the app already has {existing} machines (at most {MAX_MACHINES_PER_APP})",
                           "destroy machines you no longer need")


def check_org_machine_count(existing: int, limit: int = MAX_MACHINES_PER_ORG) -> None:
    """Refuse a new machine when the org's apps already have ``limit`` machines together."""
    if existing >= limit:
        raise InvalidInput(f"the org already has {existing} machines across its apps (at most {limit})",
                           "destroy machines you no longer need, or ask the platform's admin for a higher limit")


def check_app_count(existing: int, limit: int = MAX_APPS_PER_ORG) -> None:
    """Refuse a new app when the org already has ``limit`` apps."""
    if existing >= limit:
        raise InvalidInput(f"the org already has {existing} apps (at most {limit})",
                           "destroy apps you no longer need, or ask the platform's admin for a higher limit")


def check_volume_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_VOLUME_SIZE:
        raise InvalidInput(f"volume size {size!r} is out of range", f"use at most {MAX_VOLUME_SIZE >> 30}gb")
    return size


# -- the config ---------------------------------------------------------------------------------------

def check_config(config: Any, *, volumes: Mapping[str, Mapping[str, Any]] | None = None,
                 registry: str | None = None, limits: Limits | None = None) -> dict[str, Any]:
    """The config normalised (volume names resolved to ids, Fly's guest.memory_mb to bytes), or InvalidInput.

    ``volumes``: the app's VOLUMES records by id (the only volumes it may mount); ``registry``: the
    platform registry's host:port (None: images come from the local store only)."""
    limits = limits or Limits()
    if not isinstance(config, dict):
        raise InvalidInput("'config' must be an object", "send {\"config\": {\"image\": \"...\"}}")
    for key in config:
        if key not in ALLOWED_KEYS:
            raise _bad(_shown(key), "is not a machine config field the platform takes",
                       "see the README's Platform section for what a machine config may contain")
    out = dict(config)
    for key, allowed in _FIXED.items():
        if key in out and out[key] not in allowed and not (out[key] is None and key != "seccomp"):
            raise _bad(key, f"= {str(out[key])[:60]!r} is not allowed", _FIX_FIELD)
        out.pop(key, None)  # the runtime's defaults are the hardened values
    image_source(out.get("image"), registry)
    for key in ("cmd", "entrypoint"):
        if out.get(key) is not None:
            v = out[key]
            if not isinstance(v, list) or not all(isinstance(a, str) and "\x00" not in a for a in v) or len(v) > 4096:
                raise _bad(key, "must be a list of strings", f"send e.g. \"{key}\": [\"/app/server\"]")
    for key in ("workdir", "user", "hostname", "stop_signal"):
        v = out.get(key)
        if v is not None and (not isinstance(v, str) or "\x00" in v or len(v) > 256):
            raise _bad(key, "must be a string", f"fix config.{key}")
    if out.get("hostname") is not None and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?",
                                                            out["hostname"]):
        raise _bad("hostname", f"{out['hostname'][:80]!r} is not a hostname", "use letters, digits, '-' and '.'")
    if out.get("stop_signal") is not None and not _SIGNAL.match(out["stop_signal"]):
        raise _bad("stop_signal", f"{out['stop_signal']!r} is not a signal", "use e.g. SIGTERM or SIGINT")
    if "stop_timeout" in out:
        t = out["stop_timeout"]
        if not _number(t) or not 0 <= t <= MAX_STOP_TIMEOUT:
            raise _bad("stop_timeout", f"= {t!r} is out of range", f"use 0 to {MAX_STOP_TIMEOUT:.0f} seconds")
    if out.get("isolation", "namespace") not in ("namespace", "vm"):
        raise _bad("isolation", f"= {str(out['isolation'])[:40]!r} is not allowed", "use namespace or vm")
    if out.get("vm_accel", "auto") not in ("auto", "kvm", "tcg"):
        raise _bad("vm_accel", f"= {str(out['vm_accel'])[:40]!r} is not allowed", "use auto, kvm or tcg")
    if "cap_drop" in out:
        v = out["cap_drop"]
        if not isinstance(v, list) or not all(isinstance(c, str) and (_CAP.match(c.upper()) or c.upper() == "ALL")
                                              for c in v):
            raise _bad("cap_drop", "must be a list of capability names", "send e.g. [\"NET_RAW\"]")
    for key, typ in (("services", list), ("checks", dict), ("metadata", dict), ("volumes", list)):
        if key in out and out[key] is not None and not isinstance(out[key], typ):
            raise _bad(key, f"must be a{'n object' if typ is dict else ' list'}", f"fix config.{key}")
    if out.get("checks") is not None:
        out["checks"] = {_check_name(n): _check(f"checks.{_shown(n)}", c) for n, c in out["checks"].items()}
    if out.get("services") is not None:
        out["services"] = [_service_checks(i, s) for i, s in enumerate(out["services"])]
    if out.get("storage_size") is not None:
        s = out["storage_size"]
        if not isinstance(s, int) or isinstance(s, bool) or not 8 << 20 <= s <= limits.storage:
            raise _bad("storage_size", f"= {s!r} is out of range", f"use 8 MiB to {limits.storage >> 30} GiB (bytes)")
    out["env"] = _env(out.get("env"), limits)
    if "guest" in out:
        out["guest"] = _guest(out["guest"], limits)
    if "restart" in out:
        out["restart"] = _restart(out["restart"])
    out["mounts"] = _mounts(out.get("mounts"), volumes or {})
    for v in out.get("volumes") or []:  # the deployer's by-name requests; it writes "mounts" from them
        if not isinstance(v, dict) or set(v) - {"name", "path"} or not isinstance(v.get("name"), str):
            raise _bad("volumes", "entries must be {\"name\", \"path\"}", "use [[mounts]] in taxiway.toml")
        _path("volumes", v.get("path"))
    return out


# A check's keys: appconfig's normalised shape (+ Fly's tls_skip_verify). The agent always dials
# 127.0.0.1:<the machine's host port>; these only shape the request it sends there.
CHECK_KEYS = frozenset({"type", "port", "path", "method", "headers", "interval", "timeout", "grace_period",
                        "protocol", "tls_skip_verify"})
_CHECK_PATH = re.compile(r"^/(?!/)[\x21-\x7e]*$")   # one leading '/', visible ASCII only (no space, CR, LF, controls)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$")  # RFC 9110 token
_DURATION = re.compile(r"^\d{1,9}(\.\d{1,9})?(ms|s|m|h)?$")
_CTL = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or _CTL.search(name):
        raise _bad("checks", f"name {str(name)[:60]!r} is not a check name", "use letters, digits, '-' and '_'")
    return name


def _service_checks(i: int, service: Any) -> Any:
    """A service with its checks validated (the rest of a service is the deployer's/edge's business)."""
    if not isinstance(service, dict):
        raise _bad(f"services[{i}]", "must be an object", "send {\"internal_port\": 8080, ...}")
    if service.get("checks") is None:
        return service
    if not isinstance(service["checks"], list):
        raise _bad(f"services[{i}].checks", "must be a list", "send [{\"type\": \"tcp\"}]")
    return {**service, "checks": [_check(f"services[{i}].checks[{j}]", c) for j, c in enumerate(service["checks"])]}


def _check(field: str, c: Any) -> dict[str, Any]:
    """One health check, only its documented keys with valid values (the agent sends it to the machine's own port)."""
    if not isinstance(c, dict):
        raise _bad(field, "must be an object", "send {\"type\": \"http\", \"port\": 8080, \"path\": \"/\"}")
    for k in c:
        if k not in CHECK_KEYS:
            raise _bad(f"{field}.{_shown(k)}", "is not a check field (checks always dial the machine itself)",
                       "use " + ", ".join(sorted(CHECK_KEYS)))
    if c.get("type") is not None and c["type"] not in ("http", "tcp"):
        raise _bad(f"{field}.type", f"= {str(c['type'])[:40]!r} is not a check type", "use http or tcp")
    port = c.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        raise _bad(f"{field}.port", f"= {str(port)[:40]!r} is not a port", "use the machine's internal port, 1-65535")
    path = c.get("path")
    if path is not None and (not isinstance(path, str) or len(path) > 2048 or not _CHECK_PATH.match(path)):
        raise _bad(f"{field}.path", f"{str(path)[:80]!r} must start with a single '/' and hold no spaces or "
                   "control characters", "use e.g. /healthz (percent-encode anything else)")
    method = c.get("method")
    if method is not None and (not isinstance(method, str) or not _TOKEN.match(method)):
        raise _bad(f"{field}.method", f"{str(method)[:40]!r} is not an HTTP method", "use e.g. GET or HEAD")
    if c.get("protocol") is not None and c["protocol"] not in ("http", "https"):
        raise _bad(f"{field}.protocol", f"= {str(c['protocol'])[:40]!r} is not allowed", "use http or https")
    if c.get("tls_skip_verify") is not None and not isinstance(c["tls_skip_verify"], bool):
        raise _bad(f"{field}.tls_skip_verify", "must be true or false", "fix it")
    for key in ("interval", "timeout", "grace_period"):
        v = c.get(key)
        if v is not None and not ((_number(v) and 0 <= v <= 86400)
                                  or (isinstance(v, str) and _DURATION.match(v))):
            raise _bad(f"{field}.{key}", f"= {str(v)[:40]!r} is not a duration", "use seconds, e.g. 10 (or \"10s\")")
    headers = c.get("headers")
    if headers is not None:
        if not isinstance(headers, dict) or len(headers) > 64:
            raise _bad(f"{field}.headers", "must be an object of at most 64 headers", "send {\"Name\": \"value\"}")
        for k, v in headers.items():
            if not isinstance(k, str) or not _TOKEN.match(k):
                raise _bad(f"{field}.headers", f"name {str(k)[:60]!r} is not a header name", "use a token like X-Check")
            vals = v if isinstance(v, list) else [v]  # Fly's shape: a list of values
            if not all(isinstance(x, str) and len(x) <= 4096 and not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", x)
                       for x in vals):
                raise _bad(f"{field}.headers.{k}", "must be a string without CR, LF or control characters",
                           "send one line of text")
    return dict(c)


def _shown(key: Any) -> str:
    """A key as it may appear in a one-line error: itself if plain, else its repr."""
    k = str(key)[:60]
    return k if k.isprintable() and k.strip() == k and k else repr(k)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _env(env: Any, limits: Limits) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise _bad("env", "must be an object of strings", "send {\"env\": {\"NAME\": \"value\"}}")
    total = 0
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k or "\x00" in k:
            raise _bad("env", f"name {str(k)[:60]!r} is not a valid variable name", "no '=' or NUL, not empty")
        if not isinstance(v, str) or "\x00" in v:
            raise _bad(f"env.{_shown(k)}", "must be a string without NUL", "send strings only")
        total += len(k.encode()) + len(v.encode()) + 2
        if total > limits.env_bytes:
            raise _bad("env", f"is larger than {limits.env_bytes >> 10} KiB", "put large data in a volume or the image")
    return dict(env)


def _guest(guest: Any, limits: Limits) -> dict[str, Any]:
    if not isinstance(guest, dict):
        raise _bad("guest", "must be an object", "send {\"guest\": {\"memory_mb\": 256, \"cpus\": 1}}")
    extra = set(guest) - {"memory", "memory_mb", "cpus", "pids", "cpu_kind"}
    if extra:
        raise _bad(f"guest.{sorted(extra)[0][:40]}", "is not a guest field", "use memory_mb (or memory), cpus, pids")
    out: dict[str, Any] = {}
    mem = guest.get("memory")
    if guest.get("memory_mb") is not None:
        if not isinstance(guest["memory_mb"], int) or isinstance(guest["memory_mb"], bool):
            raise _bad("guest.memory_mb", "must be an integer", "send e.g. 256")
        mem = guest["memory_mb"] << 20
    if mem is not None:
        if not isinstance(mem, int) or isinstance(mem, bool) or not MIN_MEMORY <= mem <= limits.memory:
            raise _bad("guest.memory", f"= {mem!r} bytes is out of range",
                       f"use {MIN_MEMORY >> 20} MiB to {limits.memory >> 20} MiB")
        out["memory"] = mem
    cpus = guest.get("cpus")
    if cpus is not None:
        if not _number(cpus) or not 0 < cpus <= limits.cpus:
            raise _bad("guest.cpus", f"= {cpus!r} is out of range", f"use more than 0 and at most {limits.cpus:g}")
        out["cpus"] = cpus
    pids = guest.get("pids")
    if pids is not None:
        if not isinstance(pids, int) or isinstance(pids, bool) or not 1 <= pids <= MAX_PIDS:
            raise _bad("guest.pids", f"= {pids!r} is out of range", f"use 1 to {MAX_PIDS}")
        out["pids"] = pids
    return out


def _restart(r: Any) -> dict[str, Any]:
    if not isinstance(r, dict) or set(r) - {"policy", "max_retries"}:
        raise _bad("restart", "must be {\"policy\", \"max_retries\"}", "send e.g. {\"policy\": \"on-failure\"}")
    policy = r.get("policy", "no")
    if policy not in ("no", "always", "on-failure"):
        raise _bad("restart.policy", f"= {str(policy)[:40]!r} is not a policy", "use no, always or on-failure")
    n = r.get("max_retries", 0)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 1_000_000:
        raise _bad("restart.max_retries", f"= {n!r} is out of range", "use 0 (unlimited) to 1000000")
    return {"policy": policy, "max_retries": n}


def _path(field: str, p: Any) -> str:
    import posixpath

    if not isinstance(p, str) or not p.startswith("/") or "\x00" in p or len(p) > 1024 \
            or posixpath.normpath(p) != p.rstrip("/") or ".." in p.split("/"):
        raise _bad(field, f"path {str(p)[:80]!r} must be a clean absolute path", "use e.g. /data")
    if p in _RESERVED or p.startswith(("/proc/", "/sys/", "/dev/")):
        raise _bad(field, f"path {p} is reserved for the machine's own filesystems", "mount it elsewhere, e.g. /data")
    return p


def _mounts(mounts: Any, volumes: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Only the app's own volumes, as {"volume": id, "path", "readonly"?}; never a host path."""
    if mounts is None:
        return []
    if not isinstance(mounts, list):
        raise _bad("mounts", "must be a list", "send [{\"volume\": \"vol_...\", \"path\": \"/data\"}]")
    out = []
    for m in mounts:
        if not isinstance(m, dict):
            raise _bad("mounts", "entries must be objects", "send {\"volume\": \"vol_...\", \"path\": \"/data\"}")
        if "source" in m or "target" in m or set(m) - {"volume", "name", "path", "readonly"}:
            raise _bad("mounts", "may name only the app's volumes ({\"volume\": id, \"path\"}), never a host path",
                       "create a volume (POST /v1/apps/<app>/volumes) and mount it by id")
        vid = m.get("volume")
        if vid is None and isinstance(m.get("name"), str):  # by name: the app's volume of that name
            named = sorted(k for k, v in volumes.items() if v.get("name") == m["name"])
            vid = named[0] if named else m["name"]
        if not isinstance(vid, str) or vid not in volumes:
            raise _bad("mounts", f"volume {str(vid)[:80]!r} is not a volume of this app",
                       "use the id of one of its volumes (GET /v1/apps/<app>/volumes)")
        if not isinstance(m.get("readonly", False), bool):
            raise _bad("mounts", "readonly must be true or false", "fix config.mounts")
        if any(x["volume"] == vid for x in out):  # its file is locked by the first mount
            raise _bad("mounts", f"volume {vid} is mounted twice", "mount each volume once")
        out.append({"volume": vid, "path": _path("mounts", m.get("path")),
                    **({"readonly": True} if m.get("readonly") else {})})
    return out

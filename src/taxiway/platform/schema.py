"""Names and shapes every platform module agrees on (pure: no I/O, no nats import).

State lives in NATS JetStream (see DESIGN.md, "The platform"):

- **KV buckets** hold desired state, written only by the API (and, for observed
  state, by each host's agent in ``STATUS``). Every write that depends on what was
  read uses the entry's revision (compare-and-set), so two writers never lose an
  update.
- **Streams** carry events and logs.
- **Agents** take commands by request/reply on ``agent.<host>.<verb>``.

Records are plain JSON dicts; the shapes are documented beside each key function.
"""

from __future__ import annotations

import re
import secrets as _secrets

# -- buckets (JetStream KV) ----------------------------------------------------------

ORGS = "tw_orgs"            # key <org>                      -> {"name", "created_at"}
TOKENS = "tw_tokens"        # key <token id>                 -> {"id", "org", "scope", "app", "hash", "created_at", "name"}
APPS = "tw_apps"            # key <app>                      -> {"name", "org", "created_at", "network", "config"}
MACHINES = "tw_machines"    # key <app>.<machine id>         -> desired machine (see machine_record)
STATUS = "tw_status"        # key <app>.<machine id>         -> observed machine (see status_record), agent-written
RELEASES = "tw_releases"    # key <app>.<version 8 digits>   -> {"app", "version", "image", "config", "status", ...}
SECRETS = "tw_secrets"      # key <app>.<NAME>               -> {"name", "sealed" (base64), "digest", "updated_at"}
VOLUMES = "tw_volumes"      # key <app>.<volume id>          -> {"id", "app", "name", "size", "host", "machine"}
LEASES = "tw_leases"        # key <app>.<machine id>         -> {"nonce", "expires_at", "description"}
DEPLOYS = "tw_deploys"      # key <app>                      -> the deploy in progress (plan + step reached)
CERTS = "tw_certs"          # key <hostname>                 -> {"hostname", "app", "org", "acme", "created_at"} (custom hostnames, the edge's TLS)

NETWORKS = "tw_networks"    # key org.<org> -> {"org", "network": n}; net.<n> -> the same (private network numbers, platform.orgnet)

BUCKETS = (ORGS, TOKENS, APPS, MACHINES, STATUS, RELEASES, SECRETS, VOLUMES, LEASES, DEPLOYS, CERTS, NETWORKS)

# -- streams -------------------------------------------------------------------------

EVENTS_STREAM = "TW_EVENTS"   # subjects events.<app>.<machine id>: {"type", "status", "at", "machine", ...}
LOGS_STREAM = "TW_LOGS"       # subjects logs.<app>.<region>.<machine id>: {"at", "stream", "line", "machine"}


def events_subject(app: str, machine: str = "*") -> str:
    return f"events.{app}.{machine}"


def logs_subject(app: str, region: str = "*", machine: str = "*") -> str:
    return f"logs.{app}.{region}.{machine}"


# -- agents (request/reply) ------------------------------------------------------------

AGENT_VERBS = ("create", "start", "stop", "restart", "destroy", "signal", "exec", "list", "ping", "purge")


def agent_subject(host: str, verb: str) -> str:
    """Commands to one host's agent. Request and reply are JSON; a reply is
    ``{"ok": true, ...}`` or ``{"ok": false, "error": "what", "fix": "how"}``."""
    if verb not in AGENT_VERBS:
        raise ValueError(f"unknown agent verb {verb!r}")
    return f"agent.{host}.{verb}"


# -- keys ------------------------------------------------------------------------------

def machine_key(app: str, machine: str) -> str:
    return f"{app}.{machine}"


def release_key(app: str, version: int) -> str:
    return f"{app}.{version:08d}"


def secret_key(app: str, name: str) -> str:
    return f"{app}.{name}"


def volume_key(app: str, volume: str) -> str:
    return f"{app}.{volume}"


# -- machine states (Fly's Machines API) ------------------------------------------------

STATES = ("created", "starting", "started", "stopping", "stopped", "replacing", "destroying", "destroyed", "failed")
WAITABLE = ("started", "stopped", "destroyed", "suspended")  # what /wait?state= accepts (suspended: never here)
DESIRED = ("started", "stopped", "destroyed")

# A machine record (MACHINES bucket), written by the API:
#   {"id", "name", "app", "org", "region", "host", "process_group", "release" (int or None),
#    "config": {...MachineConfig JSON..., plus "services": [...], "checks": {...}, "metadata": {...}},
#    "desired": "started" | "stopped" | "destroyed", "instance_id", "created_at", "updated_at"}
# A status record (STATUS bucket), written by the agent of the machine's host:
#   {"id", "app", "host", "state" (one of STATES), "instance_id", "pid", "exit_code",
#    "ports": {"<internal port>": <host port on 127.0.0.1>}, "checks": {"<name>": {"status":
#    "passing"|"warning"|"critical", "output", "updated_at"}}, "private_ip": "fdaa:..." (its address on
#    the org's private network, platform.network; absent when the host has none), "updated_at"}

# -- scopes -------------------------------------------------------------------------------

SCOPES = ("admin", "deploy", "read")  # admin: the whole org; deploy: one app; read: GETs of the org


# -- names ----------------------------------------------------------------------------------

_APP = re.compile(r"^[a-z][a-z0-9-]{0,61}[a-z0-9]$|^[a-z]$")
_ORG = _APP
_SECRET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_MACHINE_ID = re.compile(r"^[0-9a-f]{14}$")
_PROCESS = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def valid_app_name(name: str) -> bool:
    """A DNS label (the app's name becomes <app>.internal and a route): lowercase, digits, '-'."""
    return bool(_APP.match(name)) and "--" not in name


def valid_org_name(name: str) -> bool:
    return bool(_ORG.match(name))


def valid_secret_name(name: str) -> bool:
    """An environment variable name, as the machine will see it."""
    return bool(_SECRET.match(name))


def valid_machine_id(mid: str) -> bool:
    return bool(_MACHINE_ID.match(mid))


def valid_process_group(name: str) -> bool:
    return bool(_PROCESS.match(name))


def new_machine_id() -> str:
    """14 hex digits, as Fly's machine IDs."""
    return _secrets.token_hex(7)


# -- defaults -----------------------------------------------------------------------------

DEFAULT_ORG = "personal"
DEFAULT_REGION = "local"
DEFAULT_HOST = "local"
DEFAULT_PROCESS = "app"

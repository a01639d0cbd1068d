"""taxiway.toml: an app's configuration, with fly.toml's keys where they mean the same (pure).

    cfg, ignored = parse(text, "taxiway.toml")      # validated, JSON-able, normalised
    cfg = validate(cfg)                              # the same check on JSON (what the API receives)
    machine_configs(cfg, image, release=3)           # {process group: MACHINES.config}

The normalised config uses the same keys as the file (durations become seconds,
sizes megabytes), so ``validate(validate(x)) == validate(x)`` and the JSON can be
written back as TOML. Keys Fly knows but taxiway does not use (``swap_size_mb``,
``[metrics]``, ``[[statics]]``...) are ignored and listed, so a Fly user adopts a
fly.toml as it is; any other key is an error, because it is most likely a typo.

tomllib reports no positions for keys, so :func:`locate` finds a key's line by
scanning the text (table headers, arrays of tables, dotted keys); every error
names the file, the line and the key.
"""

from __future__ import annotations

import math
import re
import shlex
import tomllib
from collections.abc import Callable
from typing import Any

from taxiway.errors import InvalidInput
from taxiway.platform import schema

FILENAME = "taxiway.toml"
FLY_FILENAME = "fly.toml"
STRATEGIES = ("rolling", "bluegreen", "canary", "immediate")
SIGNALS = ("SIGINT", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGSTOP", "SIGHUP")
CHECK_TYPES = ("http", "tcp")
AUTOSTOP = ("off", "stop", "suspend")
RESTART_POLICIES = ("no", "always", "on-failure")
EGRESS_MODES = ("enforce", "report", "open")  # Smokescreen's actions, strictest first
DEFAULT_MAX_UNAVAILABLE = 0.33  # Fly's default: a third of a group at a time
DEFAULT_WAIT_TIMEOUT = 300.0    # how long a new machine may take to pass its checks (Fly: 5m)

Path_ = tuple[Any, ...]  # a key's path in the document: ("http_service", "checks", 0, "path")


class ConfigError(InvalidInput):
    """A bad key in taxiway.toml: names the file, the line and the key."""

    def __init__(self, filename: str, line: int | None, key: str, problem: str, fix: str) -> None:
        where = f"{filename} line {line}" if line else filename
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}", fix)
        self.filename, self.line, self.key = filename, line, key


# -- finding a key's line -----------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _string_end(s: str, i: int) -> int | None:
    """Index just past the string that opens at ``s[i]``; None if a multi-line string runs on.

    Basic strings honour backslash escapes (``"\\"["`` is one string); literal ones have none.
    """
    q = s[i]
    if s.startswith(q * 3, i):
        return _multi_end(s, i + 3, q * 3)
    j = i + 1
    while j < len(s):
        if q == '"' and s[j] == "\\":
            j += 2
        elif s[j] == q:
            return j + 1
        else:
            j += 1
    return len(s)  # unterminated: tomllib reports that itself


def _multi_end(s: str, j: int, delim: str) -> int | None:
    """Index just past the closing ``delim`` at or after ``j``; None if it is not on this line."""
    while j < len(s):
        if delim[0] == '"' and s[j] == "\\":
            j += 2
        elif s.startswith(delim, j):
            j += 3
            for _ in range(2):  # up to two quotes may sit right before the delimiter: """a"""""
                if j < len(s) and s[j] == delim[0]:
                    j += 1
            return j
        else:
            j += 1
    return None


def _split_key(s: str) -> list[str] | None:
    """``a."b.c".d`` -> ["a", "b.c", "d"]; None if it is not a key."""
    parts: list[str] = []
    i, s = 0, s.strip()
    while i < len(s):
        while i < len(s) and s[i] in " \t":
            i += 1
        if i < len(s) and s[i] in "\"'":
            j = _string_end(s, i)
            if j is None or j - i < 2 or s[j - 1] != s[i] or s.startswith(s[i] * 3, i):
                return None
            try:  # let tomllib undo the escapes so the path matches the parsed key
                parts.append(tomllib.loads(f"k = {s[i:j]}")["k"])
            except tomllib.TOMLDecodeError:
                return None
            i = j
        else:
            m = _BARE.match(s, i)
            if not m:
                return None
            parts.append(m.group(0))
            i = m.end()
        while i < len(s) and s[i] in " \t":
            i += 1
        if i < len(s):
            if s[i] != ".":
                return None
            i += 1
    return parts or None


def _key_part(line: str) -> str | None:
    """The text before the first ``=`` outside quotes, or None."""
    i = 0
    while i < len(line):
        c = line[i]
        if c in "\"'":
            j = _string_end(line, i)
            if j is None:
                return None
            i = j
            continue
        if c == "=":
            return line[:i]
        if c == "#":
            return None
        i += 1
    return None


def _header_end(line: str) -> int:
    """Index of the ``]`` closing a table header (quotes skipped), or -1."""
    i = 1
    while i < len(line):
        c = line[i]
        if c in "\"'":
            j = _string_end(line, i)
            if j is None:
                return -1
            i = j
            continue
        if c == "]":
            return i
        i += 1
    return -1


def _depth(s: str) -> tuple[int, str | None]:
    """Open brackets minus closed ones outside strings and comments (multi-line arrays),
    and the delimiter of a multi-line string left open at the end of the line, if any."""
    d, i = 0, 0
    while i < len(s):
        c = s[i]
        if c in "\"'":
            j = _string_end(s, i)
            if j is None:
                return d, c * 3
            i = j
            continue
        if c == "#":
            break
        if c in "[{":
            d += 1
        elif c in "]}":
            d -= 1
        i += 1
    return d, None


def locate(text: str) -> dict[Path_, int]:
    """Map each key path (array items by index) to the line (1-based) where it is set."""
    where: dict[Path_, int] = {}
    arrays: dict[Path_, int] = {}
    current: Path_ = ()
    depth = 0
    multi: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if multi:  # inside a multi-line string: nothing here is a key or a header
            end = _multi_end(line, 0, multi)
            if end is None:
                continue
            d, multi = _depth(line[end:])  # the rest of the line may still close an array
            depth += d
            continue
        if depth > 0:
            d, multi = _depth(line)
            depth += d
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            aot = line.startswith("[[")
            end = _header_end(line[1:]) + 1 if aot else _header_end(line)
            parts = _split_key(line[2 if aot else 1:end]) if end > 0 else None
            if not parts:
                continue
            path: Path_ = ()
            for i, p in enumerate(parts):
                path += (p,)
                last = i == len(parts) - 1
                if last and aot:
                    arrays[path] = arrays.get(path, 0) + 1
                where.setdefault(path, n)  # [a.b] defines a too, if nothing did before
                if path in arrays:
                    path += (arrays[path] - 1,)
            current = path
            where.setdefault(path, n)
            continue
        kp = _key_part(line)
        parts = _split_key(kp) if kp is not None else None
        if not parts:
            continue
        path = current
        for p in parts:
            path += (p,)
            where.setdefault(path, n)
        depth, multi = _depth(line[len(kp) + 1:])
    return where


def _dotted(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# -- the validator ---------------------------------------------------------------------------

class _Checker:
    """Validates one document; ``fail`` raises a ConfigError at the key's line."""

    def __init__(self, filename: str, text: str | None) -> None:
        self.filename = filename
        self.lines = locate(text) if text else {}
        self.ignored: list[str] = []

    def fail(self, path: Path_, problem: str, fix: str) -> None:
        line = None
        for i in range(len(path), 0, -1):  # the key, else its nearest parent that has a line
            line = self.lines.get(tuple(path[:i]))
            if line:
                break
        raise ConfigError(self.filename, line, _dotted(path), problem, fix)

    # -- scalar kinds --

    def table(self, v: Any, path: Path_) -> dict[str, Any]:
        if not isinstance(v, dict):
            self.fail(path, "must be a table", f"write it as [{_dotted(path)}]")
        return v

    def array(self, v: Any, path: Path_, of_tables: bool = False) -> list[Any]:
        if isinstance(v, dict) and of_tables:
            return [v]  # Fly accepts [mounts] as well as [[mounts]]
        if not isinstance(v, list):
            self.fail(path, "must be an array" + (" of tables" if of_tables else ""),
                      f"write it as [[{_dotted(path)}]]" if of_tables else "write it as [ ... ]")
        return v

    def string(self, v: Any, path: Path_, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        if not isinstance(v, str) or (pattern is not None and not pattern.match(v)):
            self.fail(path, f"must be {what or 'a string'}" + (f", not {v!r}" if not isinstance(v, dict | list) else ""),
                      f"set {path[-1]} = \"...\"" if not what else f"use {what}")
        return v

    def boolean(self, v: Any, path: Path_) -> bool:
        if not isinstance(v, bool):
            self.fail(path, f"must be true or false, not {v!r}", f"set {path[-1]} = true or false")
        return v

    def integer(self, v: Any, path: Path_, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.fail(path, f"must be a whole number from {lo} to {hi}, not {v!r}", f"set {path[-1]} = {lo}")
        return v

    def port(self, v: Any, path: Path_) -> int:
        return self.integer(v, path, 1, 65535)

    def choice(self, v: Any, path: Path_, choices: tuple[str, ...]) -> str:
        if v not in choices:
            self.fail(path, f"must be one of {', '.join(choices)}, not {v!r}", f"set {path[-1]} = \"{choices[0]}\"")
        return v

    def duration(self, v: Any, path: Path_) -> float:
        """``"10s"``, ``"1m30s"``, ``"500ms"``, or a number of seconds -> seconds."""
        secs = parse_duration(v)
        if secs is None:
            self.fail(path, f"must be a duration like \"10s\", \"1m\" or \"500ms\", not {v!r}", f"set {path[-1]} = \"10s\"")
        return secs  # type: ignore[return-value]

    def memory_mb(self, v: Any, path: Path_) -> int:
        mb = parse_memory_mb(v)
        if mb is None:
            self.fail(path, f"must be a size like \"512mb\", \"1gb\" or a number of megabytes, not {v!r}",
                      f"set {path[-1]} = \"512mb\"")
        return mb  # type: ignore[return-value]

    def keys(self, d: dict[str, Any], path: Path_, known: dict[str, Callable[[Any, Path_], Any]],
             fly_only: tuple[str, ...] = ()) -> dict[str, Any]:
        """Check each key of ``d``: known ones through their checker, Fly-only ones listed as ignored."""
        out: dict[str, Any] = {}
        for k, v in d.items():
            p = (*path, k)
            if v is None:  # JSON's way of saying "not set" (TOML has no null)
                continue
            if k in known:
                out[k] = known[k](v, p)
            elif k in fly_only:
                self.ignored.append(_dotted(p))
            else:
                self.fail(p, "unknown key", f"remove it, or see the keys {FILENAME} takes (README, Platform)")
        return out


_DUR = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")


def parse_duration(v: Any) -> float | None:
    """Seconds from a Go-style duration string or a number; None if it is neither."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v) if v >= 0 and math.isfinite(v) else None
    if not isinstance(v, str) or not v.strip():
        return None
    s, total, pos = v.strip(), 0.0, 0
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    for m in _DUR.finditer(s):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * unit[m.group(2)]
        pos = m.end()
    return total if pos == len(s) else None


_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gb|g|mb|m|gib|mib)?\s*$", re.I)


def parse_memory_mb(v: Any) -> int | None:
    """Megabytes from ``512``, ``"512mb"``, ``"1gb"``; at least 64 (Fly's smallest is 256)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        mb = v
    elif isinstance(v, str) and (m := _MEM.match(v)):
        n = float(m.group(1))
        mb = int(n * 1024) if (m.group(2) or "mb").lower().startswith("g") else int(n)
    else:
        return None
    return mb if 64 <= mb <= 1 << 20 else None


_REGION = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_SIGNAL = re.compile(r"^SIG[A-Z0-9]+$")
_ENVNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ABSPATH = re.compile(r"^/[^\0]*$")
_VOLNAME = re.compile(r"^[a-z0-9_]{1,30}$")


# Keys fly.toml has that taxiway reads but does not act on (listed to the user, never an error).
FLY_ONLY_TOP = ("swap_size_mb", "console_command", "experimental", "statics", "metrics", "files",
                "host_dedication_id", "build_target")
FLY_ONLY_BUILD = ("dockerfile", "ignorefile", "build-target", "settings")
FLY_ONLY_HTTP = ("http_options", "tls_options", "machine_checks")
FLY_ONLY_SERVICE = ("script_checks", "machine_checks")
FLY_ONLY_CHECK = ("tls_skip_verify", "tls_server_name", "kind")
FLY_ONLY_VM = ("cpu_kind", "size", "gpu_kind", "gpus", "kernel_args", "persist_rootfs", "host_dedication_id")
FLY_ONLY_DEPLOY = ("release_command_vm", "release_command_timeout_stop", "min_healthy")
FLY_ONLY_PORT = ("tls_options", "http_options", "proxy_proto_options", "start_port", "end_port")


def validate(doc: dict[str, Any], filename: str = FILENAME, text: str | None = None
             ) -> dict[str, Any]:
    """The normalised config of a parsed TOML (or JSON) document; raises ConfigError."""
    return _validate(doc, filename, text)[0]


def parse(text: str, filename: str = FILENAME) -> tuple[dict[str, Any], list[str]]:
    """Parse and validate a taxiway.toml or fly.toml: ``(config, ignored keys)``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+)", str(e))
        raise ConfigError(filename, int(m.group(1)) if m else None, "",
                          f"is not valid TOML ({str(e).split(' (at')[0]})", "fix the syntax at that line") from None
    return _validate(doc, filename, text)


def load(path: Any) -> tuple[dict[str, Any], list[str]]:
    """Read and parse a config file; a missing or unreadable file is one clear error."""
    from pathlib import Path

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"{p} does not exist", "run 'taxiway launch' to write one") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read {p}: {e}", "check the file") from None
    return parse(text, str(p))


def _validate(doc: dict[str, Any], filename: str, text: str | None) -> tuple[dict[str, Any], list[str]]:
    c = _Checker(filename, text)
    if not isinstance(doc, dict):
        c.fail((), "must be a table of keys", "see the README for taxiway.toml")

    def app(v: Any, p: Path_) -> str:
        if not isinstance(v, str) or not schema.valid_app_name(v):
            c.fail(p, f"{v!r} is not a valid app name", "use lowercase letters, digits and '-', starting with a letter")
        return v

    def env(v: Any, p: Path_) -> dict[str, str]:
        out = {}
        for k, x in c.table(v, p).items():
            if not _ENVNAME.match(k):
                c.fail((*p, k), "is not an environment variable name", "use letters, digits and '_'")
            if isinstance(x, bool):
                x = "true" if x else "false"
            if not isinstance(x, str | int | float):
                c.fail((*p, k), f"must be a string, not {type(x).__name__}", f"write {k} = \"...\"")
            out[k] = str(x)
        return out

    def processes_list(v: Any, p: Path_) -> list[str]:
        out = []
        for i, x in enumerate(c.array(v, p)):
            if not isinstance(x, str) or not schema.valid_process_group(x):
                c.fail((*p, i), f"{x!r} is not a process group name", "use lowercase letters, digits, '-' and '_'")
            out.append(x)
        return out

    def check(v: Any, p: Path_, kind: str | None = None, need_port: bool = False) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "type": lambda x, q: c.choice(x, q, CHECK_TYPES),
            "port": c.port,
            "path": lambda x, q: c.string(x, q, re.compile(r"^/"), "a path starting with /"),
            "method": lambda x, q: c.string(x, q, re.compile(r"^[A-Za-z]{1,16}$"), "an HTTP method like GET").upper(),
            "protocol": lambda x, q: c.choice(x, q, ("http", "https")),
            "interval": c.duration, "timeout": c.duration, "grace_period": c.duration,
            "headers": lambda x, q: {str(k): str(y) for k, y in c.table(x, q).items()},
            "processes": processes_list,
        }, FLY_ONLY_CHECK)
        ctype = kind or got.get("type") or ("http" if "path" in got else "tcp")
        if kind and got.get("type", kind) != kind:
            c.fail((*p, "type"), f"must be {kind!r} here", f"remove type, or move the check to [checks] with type = \"{got['type']}\"")
        if need_port and "port" not in got:
            c.fail(p, "needs a port", "add port = 8080 (the port the app listens on inside)")
        out = {"type": ctype, "interval": got.get("interval", 15.0), "timeout": got.get("timeout", 2.0),
               "grace_period": got.get("grace_period", 1.0)}
        if "port" in got:
            out["port"] = got["port"]
        if ctype == "http":
            out.update(path=got.get("path", "/"), method=got.get("method", "GET"), protocol=got.get("protocol", "http"),
                       headers=got.get("headers", {}))
        elif "path" in got:
            c.fail((*p, "path"), "a tcp check has no path", "remove path, or set type = \"http\"")
        if out["timeout"] <= 0 or out["interval"] <= 0:
            c.fail(p, "interval and timeout must be more than 0", "set interval = \"15s\" and timeout = \"2s\"")
        if "processes" in got:
            out["processes"] = got["processes"]
        return out

    def concurrency(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "type": lambda x, q: c.choice(x, q, ("connections", "requests")),
            "soft_limit": lambda x, q: c.integer(x, q, 1, 1_000_000),
            "hard_limit": lambda x, q: c.integer(x, q, 1, 1_000_000),
        })
        out = {"type": got.get("type", "requests"), "soft_limit": got.get("soft_limit"),
               "hard_limit": got.get("hard_limit")}
        if out["soft_limit"] and out["hard_limit"] and out["soft_limit"] > out["hard_limit"]:
            c.fail((*p, "soft_limit"), "is above hard_limit", "make soft_limit at most hard_limit")
        return out

    def autostop(v: Any, p: Path_) -> str:
        if isinstance(v, bool):  # Fly's older form: true = "stop", false = "off"
            return "stop" if v else "off"
        return c.choice(v, p, AUTOSTOP)

    service_common: dict[str, Callable[[Any, Path_], Any]] = {
        "internal_port": c.port,
        "auto_stop_machines": autostop,
        "auto_start_machines": c.boolean,
        "min_machines_running": lambda x, q: c.integer(x, q, 0, 1000),
        "concurrency": concurrency,
        "processes": processes_list,
    }

    def http_service(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            **service_common, "force_https": c.boolean,
            "checks": lambda x, q: [check(y, (*q, i), "http") for i, y in enumerate(c.array(x, q, of_tables=True))],
        }, FLY_ONLY_HTTP)
        if "internal_port" not in got:
            c.fail(p, "needs internal_port", "add internal_port = 8080 (the port the app listens on)")
        return {"internal_port": got["internal_port"], "force_https": got.get("force_https", False),
                "auto_stop_machines": got.get("auto_stop_machines", "off"),
                "auto_start_machines": got.get("auto_start_machines", True),
                "min_machines_running": got.get("min_machines_running", 0),
                "concurrency": got.get("concurrency"), "checks": got.get("checks", []),
                "processes": got.get("processes", [])}

    def port_entry(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "port": c.port,
            "handlers": lambda x, q: [c.choice(h, (*q, i), ("http", "tls", "proxy_proto", "pg_tls", "edge_http"))
                                      for i, h in enumerate(c.array(x, q))],
            "force_https": c.boolean,
        }, FLY_ONLY_PORT)
        if "port" not in got:
            c.fail(p, "needs port", "add port = 80")
        return {"port": got["port"], "handlers": got.get("handlers", []), "force_https": got.get("force_https", False)}

    def service(v: Any, p: Path_) -> dict[str, Any]:
        def checks_of(kind: str) -> Callable[[Any, Path_], list[dict[str, Any]]]:
            return lambda x, q: [check(y, (*q, i), kind) for i, y in enumerate(c.array(x, q, of_tables=True))]

        got = c.keys(c.table(v, p), p, {
            **service_common,
            "protocol": lambda x, q: c.choice(x, q, ("tcp", "udp")),
            "ports": lambda x, q: [port_entry(y, (*q, i)) for i, y in enumerate(c.array(x, q, of_tables=True))],
            "tcp_checks": checks_of("tcp"), "http_checks": checks_of("http"),
            "checks": lambda x, q: [check(y, (*q, i)) for i, y in enumerate(c.array(x, q, of_tables=True))],
        }, FLY_ONLY_SERVICE)
        if "internal_port" not in got:
            c.fail(p, "needs internal_port", "add internal_port = 8080")
        return {"internal_port": got["internal_port"], "protocol": got.get("protocol", "tcp"),
                "ports": got.get("ports", []),
                "auto_stop_machines": got.get("auto_stop_machines", "off"),
                "auto_start_machines": got.get("auto_start_machines", True),
                "min_machines_running": got.get("min_machines_running", 0),
                "concurrency": got.get("concurrency"),
                "checks": got.get("checks", []) + got.get("tcp_checks", []) + got.get("http_checks", []),
                "processes": got.get("processes", [])}

    def checks_table(v: Any, p: Path_) -> dict[str, Any]:
        out = {}
        for name, x in c.table(v, p).items():
            if not re.match(r"^[A-Za-z0-9_-]{1,63}$", name):
                c.fail((*p, name), "is not a check name", "use letters, digits, '-' and '_'")
            out[name] = check(x, (*p, name), need_port=True)
        return out

    def processes(v: Any, p: Path_) -> dict[str, str]:
        out = {}
        for name, cmd in c.table(v, p).items():
            if not schema.valid_process_group(name):
                c.fail((*p, name), "is not a process group name", "use lowercase letters, digits, '-' and '_'")
            if isinstance(cmd, list):  # Fly accepts an argv list too
                if not cmd or not all(isinstance(a, str) for a in cmd):
                    c.fail((*p, name), "must be a command", f"write {name} = \"the command\"")
                cmd = shlex.join(cmd)
            if not isinstance(cmd, str) or not cmd.strip():
                c.fail((*p, name), "must be a command string", f"write {name} = \"the command\"")
            out[name] = cmd
        return out

    def mount(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "source": lambda x, q: c.string(x, q, _VOLNAME, "a volume name (lowercase, digits, '_', at most 30)"),
            "destination": lambda x, q: c.string(x, q, _ABSPATH, "an absolute path"),
            "processes": processes_list,
            "initial_size": lambda x, q: c.string(x, q) if isinstance(x, str) else str(c.integer(x, q, 1, 1 << 20)),
        }, ("auto_extend_size_threshold", "auto_extend_size_increment", "auto_extend_size_limit",
            "snapshot_retention", "scheduled_snapshots"))
        for k in ("source", "destination"):
            if k not in got:
                c.fail(p, f"needs {k}", "add source = \"data\" and destination = \"/data\"")
        from taxiway.machines.config import reserved_target

        if reserved_target(got["destination"]):
            c.fail((*p, "destination"), f"{got['destination']} is where the runtime mounts its own", "mount it elsewhere, e.g. /data")
        return {"source": got["source"], "destination": got["destination"], "processes": got.get("processes", []),
                **({"initial_size": got["initial_size"]} if "initial_size" in got else {})}

    def max_unavailable(v: Any, p: Path_) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not (0 < v < 1 or (v >= 1 and float(v).is_integer())):
            c.fail(p, f"must be a fraction between 0 and 1 or a whole number of machines, not {v!r}", "set max_unavailable = 0.33 or 1")
        return v

    def deploy(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "strategy": lambda x, q: c.choice(x, q, STRATEGIES),
            "release_command": lambda x, q: c.string(x, q, re.compile(r"\S"), "a command"),
            "max_unavailable": max_unavailable,
            "wait_timeout": c.duration, "release_command_timeout": c.duration,
        }, FLY_ONLY_DEPLOY)
        return {"strategy": got.get("strategy", "rolling"), "release_command": got.get("release_command"),
                "max_unavailable": got.get("max_unavailable", DEFAULT_MAX_UNAVAILABLE),
                "wait_timeout": got.get("wait_timeout", DEFAULT_WAIT_TIMEOUT),
                "release_command_timeout": got.get("release_command_timeout", 300.0)}

    def vm(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "memory": c.memory_mb, "memory_mb": c.memory_mb,
            "cpus": lambda x, q: c.integer(x, q, 1, 256) if not isinstance(x, float) else _cpus(c, x, q),
            "processes": processes_list,
        }, FLY_ONLY_VM)
        return {"memory": got.get("memory", got.get("memory_mb", 256)), "cpus": got.get("cpus", 1),
                "processes": got.get("processes", [])}

    def restart(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "policy": lambda x, q: c.choice(x, q, RESTART_POLICIES),
            "retries": lambda x, q: c.integer(x, q, 0, 1000),
            "processes": processes_list,
        })
        return {"policy": got.get("policy", "on-failure"), "retries": got.get("retries", 10),
                "processes": got.get("processes", [])}

    def domains(v: Any, p: Path_) -> list[str]:
        from taxiway.egress.acl import AclError, validate_glob

        out = []
        for i, x in enumerate(c.array(v, p)):
            try:
                validate_glob(str(p[-1]), x)
            except AclError as e:
                c.fail((*p, i), f"{x!r} is not a domain or *.domain glob ({e.message.split(': ', 1)[-1].removeprefix(f'{x}: ')})",
                       'write a name like "api.example.com" or "*.example.com" (Punycode for non-ASCII)')
            out.append(x)
        return out

    def egress(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "allowed_domains": domains, "blocked_domains": domains,
            "mode": lambda x, q: c.choice(x, q, EGRESS_MODES),
        })
        # Listing allowed domains means "only these" unless said otherwise; without a list
        # every public name stays allowed (blocked_domains alone trims the default).
        mode = got.get("mode", "enforce" if "allowed_domains" in got else "open")
        return {"allowed_domains": got.get("allowed_domains", []), "blocked_domains": got.get("blocked_domains", []),
                "mode": mode}

    def build(v: Any, p: Path_) -> dict[str, Any]:
        got = c.keys(c.table(v, p), p, {
            "builder": lambda x, q: c.string(x, q),
            "buildpacks": lambda x, q: [c.string(y, (*q, i)) for i, y in enumerate(c.array(x, q))],
            "image": lambda x, q: c.string(x, q, re.compile(r"^\S+$"), "an image reference"),
            "args": env,
        }, FLY_ONLY_BUILD)
        return {"builder": got.get("builder"), "buildpacks": got.get("buildpacks", []), "image": got.get("image"),
                "args": got.get("args", {})}

    got = c.keys(doc, (), {
        "app": app,
        "primary_region": lambda x, q: c.string(x, q, _REGION, "a region name (lowercase letters, digits, '-')"),
        "kill_signal": lambda x, q: c.string(x, q, _SIGNAL, "a signal name like SIGINT"),
        "kill_timeout": c.duration,
        "build": build, "env": env, "http_service": http_service,
        "services": lambda x, q: [service(y, (*q, i)) for i, y in enumerate(c.array(x, q, of_tables=True))],
        "checks": checks_table, "processes": processes,
        "mounts": lambda x, q: [mount(y, (*q, i)) for i, y in enumerate(c.array(x, q, of_tables=True))],
        "deploy": deploy,
        "vm": lambda x, q: [vm(y, (*q, i)) for i, y in enumerate(c.array(x, q, of_tables=True))],
        "restart": lambda x, q: [restart(y, (*q, i)) for i, y in enumerate(c.array(x, q, of_tables=True))],
        "egress": egress,
    }, FLY_ONLY_TOP)
    cfg = {
        "app": got.get("app"),
        "primary_region": got.get("primary_region", schema.DEFAULT_REGION),
        "kill_signal": got.get("kill_signal", "SIGINT"),
        "kill_timeout": got.get("kill_timeout", 5.0),
        "build": got.get("build", build({}, ("build",))),
        "env": got.get("env", {}),
        "http_service": got.get("http_service"),
        "services": got.get("services", []),
        "checks": got.get("checks", {}),
        "processes": got.get("processes", {}),
        "mounts": got.get("mounts", []),
        "deploy": got.get("deploy", deploy({}, ("deploy",))),
        "vm": got.get("vm", []),
        "restart": got.get("restart", []),
        "egress": got.get("egress"),  # None: the platform's default policy (see platform.egresspolicy)
    }
    if cfg["kill_timeout"] > 300:
        c.fail(("kill_timeout",), "must be at most 300 seconds", "set kill_timeout = \"30s\"")
    groups = process_groups(cfg)
    for path, names in _group_refs(cfg):
        for n in names:
            if n not in groups:
                c.fail(path, f"names process group {n!r}, which [processes] does not define",
                       f"define it in [processes] or use one of {', '.join(groups)}")
    seen: dict[tuple[str, str], Path_] = {}
    for i, m in enumerate(cfg["mounts"]):
        for g in m["processes"] or groups:
            if (g, m["destination"]) in seen:
                c.fail(("mounts", i, "destination"), f"{m['destination']} is mounted twice for process group {g}",
                       "give each mount its own destination")
            seen[(g, m["destination"])] = ("mounts", i)
    return cfg, c.ignored


def _cpus(c: _Checker, x: float, q: Path_) -> float:
    if not 0 < x <= 256:
        c.fail(q, f"must be more than 0 and at most 256, not {x!r}", "set cpus = 1")
    return x


def _group_refs(cfg: dict[str, Any]) -> list[tuple[Path_, list[str]]]:
    refs: list[tuple[Path_, list[str]]] = []
    if cfg["http_service"]:
        refs.append((("http_service", "processes"), cfg["http_service"]["processes"]))
    for kind in ("services", "mounts", "vm", "restart"):
        for i, x in enumerate(cfg[kind]):
            refs.append(((kind, i, "processes"), x["processes"]))
    for name, ch in cfg["checks"].items():
        refs.append((("checks", name, "processes"), ch.get("processes", [])))
    return refs


# -- machine configs ------------------------------------------------------------------------

def process_groups(cfg: dict[str, Any]) -> list[str]:
    """The app's process groups: [processes]' names, or the one default group."""
    return list(cfg["processes"]) or [schema.DEFAULT_PROCESS]


def _for(group: str, item: dict[str, Any]) -> bool:
    return not item.get("processes") or group in item["processes"]


def _service(s: dict[str, Any], http: bool) -> dict[str, Any]:
    ports = s.get("ports") or []
    if http and not ports:  # what Fly makes of [http_service]: 80 (http) and 443 (tls + http)
        ports = [{"port": 80, "handlers": ["http"], "force_https": s.get("force_https", False)},
                 {"port": 443, "handlers": ["tls", "http"], "force_https": False}]
    checks = [{k: v for k, v in ch.items() if k != "processes"} for ch in s["checks"]]
    for ch in checks:
        ch.setdefault("port", s["internal_port"])
    return {"internal_port": s["internal_port"], "protocol": s.get("protocol", "tcp"), "ports": ports,
            "concurrency": s.get("concurrency"), "checks": checks,
            "autostop": s.get("auto_stop_machines", "off"), "autostart": s.get("auto_start_machines", True),
            "min_machines_running": s.get("min_machines_running", 0)}


def machine_configs(cfg: dict[str, Any], image: str, release: int | None = None,
                    env: dict[str, str] | None = None, deploy_id: str | None = None) -> dict[str, dict[str, Any]]:
    """One MACHINES.config per process group (see the contract): MachineConfig JSON + services, checks, metadata."""
    from taxiway.machines.config import Guest, MachineConfig, Restart

    out = {}
    for g in process_groups(cfg):
        vm = next((v for v in cfg["vm"] if _for(g, v)), {"memory": 256, "cpus": 1})
        rs = next((r for r in cfg["restart"] if _for(g, r)), {"policy": "on-failure", "retries": 10})
        cmd = cfg["processes"].get(g)
        mc = MachineConfig(
            image=image, env={**cfg["env"], **(env or {})},
            entrypoint=["/bin/sh", "-c", cmd] if cmd else None, cmd=None,
            guest=Guest(memory=vm["memory"] << 20, cpus=vm["cpus"]),
            restart=Restart(policy=rs["policy"], max_retries=rs["retries"] if rs["policy"] == "on-failure" else 0),
            stop_signal=cfg["kill_signal"], stop_timeout=float(cfg["kill_timeout"]),
        ).to_json()
        services = []
        if cfg["http_service"] and _for(g, cfg["http_service"]):
            services.append(_service(cfg["http_service"], http=True))
        services += [_service(s, http=False) for s in cfg["services"] if _for(g, s)]
        checks = {n: {k: v for k, v in ch.items() if k != "processes"} for n, ch in cfg["checks"].items() if _for(g, ch)}
        # Volumes by name (the agent finds or makes the host folder); "mounts" stays MachineConfig's host paths.
        mounts = [{"name": m["source"], "path": m["destination"]} for m in cfg["mounts"] if _for(g, m)]
        mc.update(services=services, checks=checks, volumes=mounts,
                  metadata={"release": release, "process_group": g, **({"deploy": deploy_id} if deploy_id else {})})
        if services:  # PORT as the buildpacks' launchers and Fly's images expect it
            mc["env"].setdefault("PORT", str(services[0]["internal_port"]))
        out[g] = mc
    return out


def check_count(machine_config: dict[str, Any]) -> int:
    """How many checks a machine of this config runs (top-level and its services')."""
    return len(machine_config.get("checks") or {}) + sum(len(s.get("checks") or []) for s in machine_config.get("services") or [])


def http_port(machine_config: dict[str, Any]) -> int | None:
    """The internal port of the machine's http service (the edge's backend), if it has one."""
    for s in machine_config.get("services") or []:
        if any("http" in p.get("handlers", []) for p in s.get("ports", [])):
            return s["internal_port"]
    return None


# -- writing ------------------------------------------------------------------------------

def to_toml(cfg: dict[str, Any]) -> str:
    """The normalised config as TOML (what launch writes); empty parts are left out."""
    import tomli_w

    doc: dict[str, Any] = {}
    for k, v in cfg.items():
        if v is None or v == [] or v == {}:
            continue
        if isinstance(v, dict):
            v = {a: b for a, b in v.items() if b is not None and b != [] and b != {}}
            if k == "http_service":
                v = {a: b for a, b in v.items() if a not in ("concurrency",) or b}
        doc[k] = v
    return tomli_w.dumps(_drop_none(doc))


def _drop_none(v: Any) -> Any:
    """Leave out unset keys: None (TOML has no null) and empty tables and arrays (the defaults)."""
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None and x != {} and x != []}
    if isinstance(v, list):
        return [_drop_none(x) for x in v]
    return v

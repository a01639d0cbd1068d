"""The platform API's HTTP client (httpx): what the CLI (and deploys) use, never the state directly.

    c = Client.from_config()          # TAXIWAY_API_URL / TAXIWAY_API_TOKEN, else $TAXIWAY_CONFIG/platform.json
    c.apps(); c.machines("web"); c.machine_action("web", mid, "stop")

Every API error becomes a :class:`ClientError` (a TaxiwayError) carrying the
API's one line and fix, so the CLI prints ``error: what; fix`` and exits non-zero.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taxiway.errors import InvalidInput, NotFound, TaxiwayError

CONFIG_FILE = "platform.json"


class ClientError(TaxiwayError):
    """An error answered by the API (``status``) or the API not answering (``status`` 0)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0) -> None:
        super().__init__(message, hint, exit_code=2 if status == 400 else 1)
        self.status = status


class ClientNotFound(ClientError, NotFound):
    """A 404 from the API."""


class ClientInvalid(ClientError, InvalidInput):
    """A 400 from the API."""


def config_path() -> Path:
    from taxiway.paths import config_dir

    return config_dir() / CONFIG_FILE


def load_config() -> dict[str, str]:
    """``{"api_url", "token"}`` from the environment or platform.json (env wins, key by key)."""
    data: dict[str, str] = {}
    env_url, env_token = os.environ.get("TAXIWAY_API_URL"), os.environ.get("TAXIWAY_API_TOKEN")
    if not (env_url and env_token):
        path = config_path()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as e:
            raise ClientError(f"cannot read {path} ({e})", "run 'taxiway up' to write it again") from None
    url = env_url or data.get("api_url")
    token = env_token or data.get("token")
    if not url or not token:
        raise ClientError("no platform API configured",
                           "start one with 'taxiway up', or set TAXIWAY_API_URL and TAXIWAY_API_TOKEN")
    return {"api_url": url.rstrip("/"), "token": token}


class Client:
    """A thin synchronous client: one method per API call, JSON in and out."""

    def __init__(self, url: str, token: str, timeout: float = 330.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        # trust_env=False: the API is on loopback; a proxy from the environment must never see the token.
        # verify only for https: plain http needs no TLS context, and loading the CA bundle for one
        # costs ~0.2 s of every CLI call (measured under `taxiway deploy`).
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=timeout, trust_env=False, verify=self.url.startswith("https://"))

    @classmethod
    def from_config(cls) -> Client:
        cfg = load_config()
        return cls(cfg["api_url"], cfg["token"])

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one request path ---------------------------------------------------------------------

    def request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> Any:
        """The decoded JSON answer; ClientError for an error answer or no answer."""
        import httpx

        try:
            r = self.http.request(method, path, json=json_body, params=params, headers=headers)
        except httpx.TimeoutException:
            raise ClientError(f"the platform API at {self.url} did not answer {method} {path} in time",
                              "check 'taxiway platform status' and the API's log") from None
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the platform API at {self.url} ({type(e).__name__})",
                              "start it with 'taxiway up'") from None
        return self._decode(r, method, path)

    def _decode(self, r: Any, method: str, path: str) -> Any:
        if r.status_code < 400:
            if "ndjson" in r.headers.get("content-type", ""):
                return [json.loads(line) for line in r.text.splitlines() if line.strip()]
            if not r.content:
                return None
            return r.json()
        try:
            body = r.json()
        except ValueError:
            body = {}
        msg = body.get("error") if isinstance(body, dict) else None
        fix = body.get("fix") if isinstance(body, dict) else None
        if not msg:
            msg = f"the platform API answered {r.status_code} to {method} {path}"
        cls = ClientNotFound if r.status_code == 404 else ClientInvalid if r.status_code == 400 else ClientError
        raise cls(msg, fix, r.status_code)

    # -- apps -----------------------------------------------------------------------------------------

    def apps(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/apps")["apps"]

    def app(self, app: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/apps/{app}")

    def create_app(self, app: str) -> dict[str, Any]:
        return self.request("POST", "/v1/apps", json_body={"app_name": app})

    def destroy_app(self, app: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/apps/{app}")

    # -- machines ---------------------------------------------------------------------------------------

    def machines(self, app: str, include_deleted: bool = False, **filters: str) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v}
        if include_deleted:
            params["include_deleted"] = "1"
        return self.request("GET", f"/v1/apps/{app}/machines", params=params)

    def machine(self, app: str, mid: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/apps/{app}/machines/{mid}")

    def create_machine(self, app: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return self.request("POST", f"/v1/apps/{app}/machines", json_body={"config": config, **extra})

    def update_machine(self, app: str, mid: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return self.request("POST", f"/v1/apps/{app}/machines/{mid}", json_body={"config": config, **extra})

    def machine_action(self, app: str, mid: str, verb: str, body: dict[str, Any] | None = None,
                       nonce: str | None = None) -> dict[str, Any]:
        """start, stop, restart, signal, cordon, uncordon (POST .../{id}/<verb>)."""
        headers = {"fly-machine-lease-nonce": nonce} if nonce else None
        return self.request("POST", f"/v1/apps/{app}/machines/{mid}/{verb}", json_body=body or {}, headers=headers)

    def destroy_machine(self, app: str, mid: str, force: bool = False) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/apps/{app}/machines/{mid}", params={"force": "true"} if force else None)

    def exec(self, app: str, mid: str, command: list[str], timeout: float = 60) -> dict[str, Any]:
        return self.request("POST", f"/v1/apps/{app}/machines/{mid}/exec",
                            json_body={"command": command, "timeout": timeout})

    def wait(self, app: str, mid: str, state: str = "started", timeout: float = 60,
             instance_id: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"state": state, "timeout": timeout}
        if instance_id:
            params["instance_id"] = instance_id
        return self.request("GET", f"/v1/apps/{app}/machines/{mid}/wait", params=params)

    def events(self, app: str, mid: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/apps/{app}/machines/{mid}/events")

    # -- releases, secrets, volumes, logs, registry ---------------------------------------------------------

    def releases(self, app: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/apps/{app}/releases")

    def release(self, app: str, version: int, wait: float = 0, after: Any = None) -> dict[str, Any]:
        """A release; with ``wait`` and ``after`` (the updated_at of the copy one has), the API
        answers when the record changes, at most ``wait`` seconds later."""
        params = {"wait": wait, "after": str(after)} if wait and after is not None else None
        return self.request("GET", f"/v1/apps/{app}/releases/{version}", params=params)

    def create_release(self, app: str, image: str, config: dict[str, Any], strategy: str | None = None,
                       description: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"image": image, "config": config, "description": description}
        if strategy:
            body["strategy"] = strategy
        return self.request("POST", f"/v1/apps/{app}/releases", json_body=body)

    def secrets(self, app: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/apps/{app}/secrets")

    def set_secrets(self, app: str, values: dict[str, str], stage: bool = False) -> dict[str, Any]:
        return self.request("POST", f"/v1/apps/{app}/secrets", json_body={"values": values, "stage": stage})

    def unset_secret(self, app: str, name: str, stage: bool = False) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/apps/{app}/secrets/{name}", params={"stage": "1"} if stage else None)

    def volumes(self, app: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/apps/{app}/volumes")

    def create_volume(self, app: str, name: str, size: str = "1gb", region: str | None = None) -> dict[str, Any]:
        body = {"name": name, "size": size, **({"region": region} if region else {})}
        return self.request("POST", f"/v1/apps/{app}/volumes", json_body=body)

    def destroy_volume(self, app: str, vid: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/apps/{app}/volumes/{vid}")

    def registry_token(self, app: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/apps/{app}/registry_token")

    def logs(self, app: str, machine: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if machine:
            params["machine"] = machine
        return self.request("GET", f"/v1/apps/{app}/logs", params=params)

    def follow_logs(self, app: str, machine: str | None = None) -> Iterator[dict[str, Any]]:
        """Log lines as they come (ndjson stream), until the caller stops iterating."""
        import httpx

        params = {"follow": "1", **({"machine": machine} if machine else {})}
        try:
            with self.http.stream("GET", f"/v1/apps/{app}/logs", params=params,
                                  timeout=httpx.Timeout(30, read=None)) as r:
                if r.status_code >= 400:
                    r.read()
                    self._decode(r, "GET", f"/v1/apps/{app}/logs")
                for line in r.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as e:
            raise ClientError(f"lost the platform API at {self.url} ({type(e).__name__})",
                              "is it still running? ('taxiway up')") from None

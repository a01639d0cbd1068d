"""Run the registry on uvicorn (uvloop + httptools), optionally with TLS and several workers."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from taxiway.errors import InvalidInput
from taxiway.listen import DEFAULT_HOST, Listen, parse_listen
from taxiway.registry.storage import MAX_UPLOAD_BYTES, MAX_UPLOAD_SESSIONS, FilesystemStorage


def serve(root: Path, listen: str | Listen = f"{DEFAULT_HOST}:5000", *, tls_cert: str | None = None, tls_key: str | None = None,
          auth: bool = True, delete: bool = True, workers: int = 1, realm: str | None = None,
          service: str = "taxiway", max_upload_sessions: int = MAX_UPLOAD_SESSIONS,
          max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
    """Serve until interrupted. Expired upload sessions and a crash's leftovers are removed first;
    resumable sessions are kept."""
    import uvicorn

    from taxiway.registry.app import load_key

    host, port = parse_listen(listen) if isinstance(listen, str) else listen
    if bool(tls_cert) != bool(tls_key):
        raise InvalidInput("--tls-cert and --tls-key go together", "pass both, or neither for plain HTTP")
    root = Path(root)
    storage = FilesystemStorage(root)
    storage.clean_uploads(storage.upload_max_age)
    load_key(root)
    os.environ["TAXIWAY_REGISTRY_CONFIG"] = orjson.dumps(
        {"root": str(root), "auth": auth, "delete": delete, "realm": realm, "service": service,
         "max_upload_sessions": max_upload_sessions, "max_upload_bytes": max_upload_bytes}).decode()
    uvicorn.run("taxiway.registry.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                loop="uvloop", http="httptools", ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                log_level="warning", access_log=False, server_header=False, date_header=False,
                timeout_keep_alive=30)

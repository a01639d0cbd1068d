"""The distribution-spec error codes, as one exception type handlers raise."""

from __future__ import annotations

import errno
from typing import Any

# code -> (HTTP status, message), as the distribution spec lists them.
CODES: dict[str, tuple[int, str]] = {
    "BLOB_UNKNOWN": (404, "blob unknown to registry"),
    "BLOB_UPLOAD_INVALID": (400, "blob upload invalid"),
    "BLOB_UPLOAD_UNKNOWN": (404, "blob upload unknown to registry"),
    "DIGEST_INVALID": (400, "provided digest did not match uploaded content"),
    "MANIFEST_BLOB_UNKNOWN": (404, "manifest references a manifest or blob unknown to registry"),
    "MANIFEST_INVALID": (400, "manifest invalid"),
    "MANIFEST_UNKNOWN": (404, "manifest unknown to registry"),
    "NAME_INVALID": (400, "invalid repository name"),
    "NAME_UNKNOWN": (404, "repository name not known to registry"),
    "SIZE_INVALID": (400, "provided length did not match content length"),
    "UNAUTHORIZED": (401, "authentication required"),
    "DENIED": (403, "requested access to the resource is denied"),
    "UNSUPPORTED": (405, "the operation is unsupported"),
    "TOOMANYREQUESTS": (429, "too many requests"),
    "TAG_INVALID": (400, "manifest tag did not match URI"),
    "RANGE_INVALID": (416, "invalid content range"),
    "STORAGE_FULL": (507, "the registry's storage is full"),
    # distribution's errcode.ErrorCodeUnknown: any other server-side failure
    "UNKNOWN": (500, "unknown error"),
}


class DistributionError(Exception):
    """What the server answers as ``{"errors": [{"code", "message", "detail"}]}`` (a distribution-spec error code).

    Server side only: the registry *client* raises :class:`taxiway.oci.client.RegistryError`
    (a :class:`taxiway.errors.TaxiwayError` a user sees) when a registry answers one of these.
    """

    def __init__(self, code: str, message: str | None = None, detail: Any = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        default_status, default_message = CODES[code]
        super().__init__(message or default_message)
        self.code = code
        self.message = message or default_message
        self.detail = detail
        self.status = status or default_status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return {"errors": [err]}


# The codes a request's target answers when what it names vanished under it (a concurrent delete).
GONE: dict[str, str] = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN", "upload": "BLOB_UPLOAD_UNKNOWN",
                        "tags": "NAME_UNKNOWN", "referrers": "MANIFEST_UNKNOWN"}


def storage_error(e: OSError, kind: str | None = None) -> DistributionError:
    """The error an OSError from storage answers: only ENOSPC/EDQUOT are STORAGE_FULL (507).

    A FileNotFoundError means something was deleted concurrently: the thing ``kind``
    names is unknown (404), as if the delete had happened first.
    """
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DistributionError("STORAGE_FULL", detail="no space left on the registry's disk")
    if isinstance(e, FileNotFoundError) and kind in GONE:
        return DistributionError(GONE[kind], detail="removed by a concurrent request")
    return DistributionError("UNKNOWN", message="storage error", detail=e.strerror)

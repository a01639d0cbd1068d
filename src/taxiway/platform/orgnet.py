"""Org network numbers (the ``OOOO:OOOO`` of :mod:`taxiway.platform.network`), kept in NATS KV.

Bucket ``tw_networks``: ``org.<org>`` -> {"org", "network": n, "created_at"} and ``net.<n>``
-> the same record (the reverse lookup the DNS server and egress proxy make from a source
address), ``next`` -> {"next": n} (the counter). Numbers are handed out on first need with
compare-and-set writes and never reused, so an address never changes owner. The default org
"personal" is always 1.
"""

from __future__ import annotations

import time
from typing import Any

from taxiway.platform import network as N
from taxiway.platform import schema


async def org_network(state: Any, org: str) -> int:
    """The network number of ``org``, allocated if it has none yet (safe when raced)."""
    from taxiway.platform.state import Conflict

    got = await state.get(schema.NETWORKS, f"org.{org}")
    if got:
        return int(got[0]["network"])
    if org == schema.DEFAULT_ORG:
        n = N.DEFAULT_ORG_NETWORK
    else:
        def bump(old: dict[str, Any] | None) -> dict[str, Any]:
            return {"next": max(int((old or {}).get("next", 2)), 2) + 1}

        n = int((await state.update(schema.NETWORKS, "next", bump))["next"]) - 1
        if n > N.MAX_ORG:
            raise RuntimeError("no org network numbers left")
    rec = {"org": org, "network": n, "created_at": time.time()}
    try:
        await state.put(schema.NETWORKS, f"org.{org}", rec, revision=0)
    except Conflict:  # another agent allocated it first: theirs stands (our number stays unused)
        got = await state.get(schema.NETWORKS, f"org.{org}")
        return int(got[0]["network"])
    await state.put(schema.NETWORKS, f"net.{n}", rec)
    return n


async def org_name(state: Any, network: int) -> str | None:
    """The org that owns network number ``network`` (None: nobody)."""
    got = await state.get(schema.NETWORKS, f"net.{network}")
    return got[0]["org"] if got else None

"""The agent writes health-check results only for machines in its record: a result that arrives
after a machine's destroy (the app purged meanwhile) must not bring its STATUS back. Real nats-server."""

from __future__ import annotations

import pytest

from taxiway.platform import schema
from taxiway.platform.agent import Agent

pytestmark = pytest.mark.anyio


async def test_check_results_of_a_machine_no_longer_in_the_record_are_dropped(state, platform_home):
    agent = Agent(state, home=platform_home)
    try:
        row = {"id": "0123456789abcd", "app": "web", "region": "local", "local_id": None, "instance_id": "i1",
               "ports": {}, "restarts": 0, "acted_rev": 0, "log_inode": None, "log_offset": 0, "events_offset": 0}
        result = {"alive": {"status": "critical", "output": "connect failed", "updated_at": 1.0}}
        key = schema.machine_key("web", row["id"])

        agent.rec.put(row)
        await agent._write_checks(row, result)  # a machine of the record: written
        assert (await state.get(schema.STATUS, key))[0]["checks"] == result

        agent.rec.delete(row["id"])  # destroyed; the API then purges its STATUS
        await state.purge(schema.STATUS, key)
        agent.status.pop(row["id"], None)
        await agent._write_checks(row, {"alive": {**result["alive"], "updated_at": 2.0}})  # a late result
        assert await state.get(schema.STATUS, key) is None
    finally:
        await agent.spare.close()
        agent.rec.close()

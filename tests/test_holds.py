"""The restore's holds (storage/holds.py) against real Postgres: only a read-back of Stripe from
early enough, begun after the hold was (last) put on, takes one off."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg

from storage import holds


def test_a_hold_put_on_again_during_a_read_back_is_not_taken_off_by_it(shard_database):
    async def scenario() -> None:
        conn = await asyncpg.connect(shard_database)
        try:
            await conn.execute("DELETE FROM service_holds")
            bound = await holds.hold(conn, holds.CHARGES, "a restore")
            # From too late an instant: kept, and the instant it needs is said.
            started = await holds.now(conn)
            assert await holds.release(conn, holds.CHARGES, bound + timedelta(seconds=1), started) == (False, bound)
            # A read-back begins; meanwhile another failover puts the hold on again.
            await asyncio.sleep(0.01)
            started = await holds.now(conn)
            await asyncio.sleep(0.01)
            assert await holds.hold(conn, holds.CHARGES, "a failover") == bound  # the earlier bound stays
            assert await holds.release(conn, holds.CHARGES, bound, started) == (False, None)
            assert await holds.held(conn, holds.CHARGES) == "a restore"
            # A read-back begun after it takes it off.
            assert await holds.release(conn, holds.CHARGES, bound, await holds.now(conn)) == (True, None)
            assert await holds.held(conn, holds.CHARGES) is None
        finally:
            await conn.close()

    asyncio.run(scenario())

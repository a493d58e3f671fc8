"""The meter's per-org rows on Postgres (billing-rules 2.12): a cutover moved earlier than one set
ahead bills the hours between them, which the one ahead had consumed unsent (review finding)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from storage import enforcement, meter_events
from storage.times import us_to_dt
from tests.helpers import migrated_database

HOUR_US = 3_600_000_000
T0 = 1_796_000_400 * 1_000_000 // HOUR_US * HOUR_US  # a whole hour


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    yield from migrated_database(tmp_path_factory.mktemp("enforcement"), "enforcement")


def test_a_cutover_moved_earlier_bills_the_hours_the_later_one_had_consumed(database_url):
    async def run() -> dict:
        conn = await asyncpg.connect(database_url)
        try:
            await enforcement.write(conn, "org_m", enforcement.Row(False, T0 + 48 * HOUR_US))  # cut over Friday
            for n, (hour, status) in enumerate(((T0, "shadow"), (T0 + 30 * HOUR_US, "shadow"),
                                                (T0 + 31 * HOUR_US, "consumed"))):
                await conn.execute("INSERT INTO meter_events (identifier, org_id, meter, hour, value, status)"
                                   " VALUES ($1, 'org_m', 'usage', $2, $3, $4)", f"ev_{n}", us_to_dt(hour),
                                   100 + n, status)
            await conn.execute("UPDATE meter_events SET value = 0 WHERE identifier = 'ev_2'")  # retired: no value
            await meter_events.release_shadow(conn, None)  # the hours before Friday: consumed
            await enforcement.write(conn, "org_m", enforcement.Row(False, T0 + 24 * HOUR_US))  # now Tuesday
            await meter_events.release_shadow(conn, None)
            rows = await conn.fetch("SELECT identifier, status FROM meter_events WHERE org_id = 'org_m'")
            return {r["identifier"]: r["status"] for r in rows}
        finally:
            await conn.close()

    assert asyncio.run(run()) == {"ev_0": "consumed", "ev_1": "pending", "ev_2": "consumed"}

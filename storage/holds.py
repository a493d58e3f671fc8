"""Holds on the service, by name (table service_holds, migration 0015).

`charges`: auto-recharge sends no new charge to Stripe while it is held; `meters`: the meter
roll-up makes and sends no meter event. A restore (or a failover that lost commits) puts both
on; reading Stripe's events back since the restore point takes `charges` off
(serve_app/stripe_reconcile.py), reading its meter back takes `meters` off
(actors/meter_reconcile.py).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

CHARGES = "charges"
METERS = "meters"
AFTER_A_RESTORE = (CHARGES, METERS)


# Stripe retries a delivery for up to 3 days, and keeps events 30 days: what the restored
# database lacks may have been created up to 3 days before the last event it recorded.
_READ_BACK_FROM = ("COALESCE((SELECT max(received_at) FROM inbound_webhooks WHERE source = 'stripe')"
                   " - interval '3 days', now() - interval '30 days')")


async def hold(conn: asyncpg.Connection, name: str, reason: str) -> datetime:
    """Put the hold on (a hold already on keeps its first reason, time and bound); returns the
    instant from which Stripe must be read back to take it off."""
    await conn.execute("INSERT INTO service_holds (name, reason, read_back_from)"
                       f" VALUES ($1, $2, {_READ_BACK_FROM}) ON CONFLICT (name) DO NOTHING", name, reason)
    return await conn.fetchval("SELECT read_back_from FROM service_holds WHERE name = $1", name)


async def release(conn: asyncpg.Connection, name: str, read_back_from: datetime) -> tuple[bool, datetime | None]:
    """Take the hold off if Stripe was read back from early enough: (taken off, the instant it
    needs when it was not)."""
    gone = await conn.fetchval(
        "WITH gone AS (DELETE FROM service_holds WHERE name = $1"
        " AND (read_back_from IS NULL OR $2 <= read_back_from) RETURNING 1) SELECT count(*) > 0 FROM gone",
        name, read_back_from)
    if gone:
        return True, None
    return False, await conn.fetchval("SELECT read_back_from FROM service_holds WHERE name = $1", name)


async def held(conn: asyncpg.Connection, name: str) -> str | None:
    """The hold's reason, if it is on."""
    return await conn.fetchval("SELECT reason FROM service_holds WHERE name = $1", name)

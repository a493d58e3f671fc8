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
    """Put the hold on; returns the instant from which Stripe must be read back to take it off.
    A hold already on keeps its first reason and the earlier bound, and counts as put on now: a
    read-back that began before (and so may miss what was lost since) does not take it off."""
    return await conn.fetchval(
        "INSERT INTO service_holds (name, reason, read_back_from)"
        f" VALUES ($1, $2, {_READ_BACK_FROM}) ON CONFLICT (name) DO UPDATE SET since = now(),"
        " read_back_from = LEAST(service_holds.read_back_from, EXCLUDED.read_back_from)"
        " RETURNING read_back_from", name, reason)


async def now(conn: asyncpg.Connection) -> datetime:
    """The database's clock, which places holds: a read-back starts by reading it."""
    return await conn.fetchval("SELECT now()")


async def release(conn: asyncpg.Connection, name: str, read_back_from: datetime,
                  read_started: datetime) -> tuple[bool, datetime | None]:
    """Take the hold off if Stripe was read back from early enough, by a read-back that began
    after the hold was (last) put on: (taken off, the instant to read back from when that is what
    it lacked). Not taken off, with None, when the hold came after the read-back began: read again."""
    row = await conn.fetchrow(
        "WITH gone AS (DELETE FROM service_holds WHERE name = $1 AND since <= $3"
        " AND (read_back_from IS NULL OR $2 <= read_back_from) RETURNING 1)"
        " SELECT (SELECT count(*) > 0 FROM gone) AS gone,"
        " (SELECT read_back_from FROM service_holds WHERE name = $1 AND $2 > read_back_from) AS needed",
        name, read_back_from, read_started)
    return row["gone"], row["needed"]


async def held(conn: asyncpg.Connection, name: str) -> str | None:
    """The hold's reason, if it is on."""
    return await conn.fetchval("SELECT reason FROM service_holds WHERE name = $1", name)

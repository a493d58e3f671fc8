"""Holds on the service, by name (table service_holds, migration 0015).

`charges`: auto-recharge sends no new charge to Stripe while it is held. A restore (or a
failover that lost commits) puts it on; reading Stripe's events back since the restore point
takes it off (serve_app/stripe_reconcile.py).
"""

from __future__ import annotations

import asyncpg

CHARGES = "charges"


async def hold(conn: asyncpg.Connection, name: str, reason: str) -> None:
    """Put the hold on (a hold already on keeps its first reason and time)."""
    await conn.execute("INSERT INTO service_holds (name, reason) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                       name, reason)


async def release(conn: asyncpg.Connection, name: str) -> bool:
    """Take the hold off; whether it was on."""
    return await conn.fetchval("WITH gone AS (DELETE FROM service_holds WHERE name = $1 RETURNING 1)"
                               " SELECT count(*) > 0 FROM gone", name)


async def held(conn: asyncpg.Connection, name: str) -> str | None:
    """The hold's reason, if it is on."""
    return await conn.fetchval("SELECT reason FROM service_holds WHERE name = $1", name)

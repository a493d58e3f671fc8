"""org_due: when time alone next changes each org (written by the group commit), for the sweep."""

from __future__ import annotations

import asyncpg

from storage.times import us_to_dt


async def due_orgs(conn: asyncpg.Connection, now_us: int, limit: int, skip: list[str]) -> list[str]:
    rows = await conn.fetch("SELECT org_id FROM org_due WHERE due_at <= $1 AND org_id <> ALL($3::text[])"
                            " ORDER BY due_at LIMIT $2", us_to_dt(now_us), limit, skip)
    return [r["org_id"] for r in rows]


async def still_due(conn: asyncpg.Connection, org_ids: list[str], now_us: int) -> list[str]:
    rows = await conn.fetch("SELECT org_id FROM org_due WHERE org_id = ANY($1::text[]) AND due_at <= $2",
                            org_ids, us_to_dt(now_us))
    return [r["org_id"] for r in rows]


async def forget(conn: asyncpg.Connection, org_ids: list[str]) -> None:
    await conn.execute("DELETE FROM org_due WHERE org_id = ANY($1::text[])", org_ids)

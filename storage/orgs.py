"""Organizations as rows: existence and contact details (their state lives in the journal)."""

from __future__ import annotations

import asyncpg


async def exists(conn: asyncpg.Connection, org_id: str) -> bool:
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM orgs WHERE org_id = $1)", org_id)

"""Advisory locks that keep a periodic job to one runner at a time."""

from __future__ import annotations

import asyncpg


async def try_transaction_lock(conn: asyncpg.Connection, key: int) -> bool:
    """Take lock `key` for the open transaction, or return False at once if another holds it."""
    return await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", key)

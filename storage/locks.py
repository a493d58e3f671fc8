"""Advisory locks that keep a periodic job to one runner at a time.

A job's lock is held by its connection's session, not a transaction: a job calls Stripe and
webhook receivers, and a transaction open across those calls would hold back vacuum (and
every row it touched) for as long as the slowest receiver. The job's statements each commit
on their own while the session keeps the lock; a connection that dies lets it go with it.
"""

from __future__ import annotations

import asyncpg


async def try_session_lock(conn: asyncpg.Connection, key: int) -> bool:
    """Take lock `key` for this connection's session, or return False at once if another holds it."""
    assert not conn.is_in_transaction(), "a job's lock is its session's: no transaction may be open"
    return await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)


async def release_session_lock(conn: asyncpg.Connection, key: int) -> None:
    """Give lock `key` back. (A pooled connection also gives every lock back when the pool
    takes it back: asyncpg resets it with pg_advisory_unlock_all.)"""
    released = await conn.fetchval("SELECT pg_advisory_unlock($1)", key)
    assert released, f"advisory lock {key} was not held by this session"

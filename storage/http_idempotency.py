"""Idempotency-Key records: a key is claimed before its request runs, then holds the first
response. Scoped per caller, so one org cannot see or collide with another's keys."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

IN_PROGRESS = 0  # the status of a claim whose request has not answered yet


@dataclass(frozen=True, slots=True)
class Record:
    request_hash: str
    status: int  # IN_PROGRESS, or the HTTP status of the first response
    body: bytes


async def claim(conn: asyncpg.Connection, scope: str, key: str, request_hash: str) -> Record | None:
    """Claim the key for this request. None: claimed, run it. Otherwise the record already there."""
    inserted = await conn.fetchval(
        "INSERT INTO http_idempotency (scope, key, request_hash, status, body) VALUES ($1, $2, $3, $4, '')"
        " ON CONFLICT DO NOTHING RETURNING 1", scope, key, request_hash, IN_PROGRESS)
    if inserted:
        return None
    row = await conn.fetchrow(
        "SELECT request_hash, status, body FROM http_idempotency WHERE scope = $1 AND key = $2", scope, key)
    if row is None:  # released between the two statements: claim again
        return await claim(conn, scope, key, request_hash)
    return Record(row["request_hash"], row["status"], bytes(row["body"]))


async def complete(conn: asyncpg.Connection, scope: str, key: str, status: int, body: bytes) -> None:
    assert status != IN_PROGRESS
    await conn.execute("UPDATE http_idempotency SET status = $3, body = $4 WHERE scope = $1 AND key = $2"
                       " AND status = $5", scope, key, status, body, IN_PROGRESS)


async def release(conn: asyncpg.Connection, scope: str, key: str) -> None:
    """Give the key back (the request failed and changed nothing durable): a retry may run it."""
    await conn.execute("DELETE FROM http_idempotency WHERE scope = $1 AND key = $2 AND status = $3",
                       scope, key, IN_PROGRESS)

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


async def claim(conn: asyncpg.Connection, scope: str, key: str, request_hash: str,
                abandoned_after_s: int) -> Record | None:
    """Claim the key for this request. None: claimed, run it. Otherwise the record already there.

    A claim older than `abandoned_after_s` that never got its answer (its process died
    mid-request) is taken over by the same request again, so a key is never stuck.
    """
    inserted = await conn.fetchval(
        "INSERT INTO http_idempotency (scope, key, request_hash, status, body) VALUES ($1, $2, $3, $4, '')"
        " ON CONFLICT DO NOTHING RETURNING 1", scope, key, request_hash, IN_PROGRESS)
    if inserted:
        return None
    taken_over = await conn.fetchval(
        "UPDATE http_idempotency SET created_at = now() WHERE scope = $1 AND key = $2 AND request_hash = $3"
        " AND status = $4 AND created_at < now() - make_interval(secs => $5) RETURNING 1",
        scope, key, request_hash, IN_PROGRESS, abandoned_after_s)
    if taken_over:
        return None
    row = await conn.fetchrow(
        "SELECT request_hash, status, body FROM http_idempotency WHERE scope = $1 AND key = $2", scope, key)
    if row is None:  # released between the two statements: claim again
        return await claim(conn, scope, key, request_hash, abandoned_after_s)
    return Record(row["request_hash"], row["status"], bytes(row["body"]))


async def complete(conn: asyncpg.Connection, scope: str, key: str, status: int, body: bytes) -> None:
    assert status != IN_PROGRESS
    await conn.execute("UPDATE http_idempotency SET status = $3, body = $4 WHERE scope = $1 AND key = $2"
                       " AND status = $5", scope, key, status, body, IN_PROGRESS)


async def release(conn: asyncpg.Connection, scope: str, key: str) -> None:
    """Give the key back (the request failed and changed nothing durable): a retry may run it."""
    await conn.execute("DELETE FROM http_idempotency WHERE scope = $1 AND key = $2 AND status = $3",
                       scope, key, IN_PROGRESS)

"""Inbound webhook deliveries already applied, with their first answer (per source and id)."""

from __future__ import annotations

import asyncpg
import msgspec


async def first_answer(conn: asyncpg.Connection, source: str, event_id: str) -> tuple[int, dict] | None:
    row = await conn.fetchrow(
        "SELECT status, response FROM inbound_webhooks WHERE source = $1 AND event_id = $2", source, event_id)
    return None if row is None else (row["status"], msgspec.json.decode(row["response"]))


async def remember(conn: asyncpg.Connection, source: str, event_id: str, event_type: str, status: int,
                   answer: dict) -> None:
    await conn.execute(
        "INSERT INTO inbound_webhooks (source, event_id, event_type, status, response)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        source, event_id, event_type, status, msgspec.json.encode(answer))

"""Inbound webhook deliveries already answered, with their first answer (per source and id),
and what became of each: applied, ignored or a dead letter, with why."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import msgspec

from storage.times import dt_to_us, optional_dt

OUTCOMES = ("applied", "ignored", "dead_letter")


@dataclass(frozen=True, slots=True)
class InboundEvent:
    source: str
    event_id: str
    event_type: str
    status: int
    outcome: str
    reason: str | None
    received_us: int


async def first_answer(conn: asyncpg.Connection, source: str, event_id: str) -> tuple[int, dict] | None:
    row = await conn.fetchrow(
        "SELECT status, response FROM inbound_webhooks WHERE source = $1 AND event_id = $2", source, event_id)
    return None if row is None else (row["status"], msgspec.json.decode(row["response"]))


async def remember(conn: asyncpg.Connection, source: str, event_id: str, event_type: str, status: int,
                   answer: dict, outcome: str = "applied", reason: str | None = None) -> None:
    assert outcome in OUTCOMES, outcome
    await conn.execute(
        "INSERT INTO inbound_webhooks (source, event_id, event_type, status, response, outcome, reason)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        source, event_id, event_type, status, msgspec.json.encode(answer), outcome, reason)


async def unapplied_page(conn: asyncpg.Connection, source: str, outcomes: tuple[str, ...],
                         after: tuple[int, str] | None, limit: int) -> list[InboundEvent]:
    """Events of one source with one of `outcomes` (never 'applied'), newest first, after the
    (received_us, event_id) position given; limit + 1 of them at most, so the caller knows
    whether there are more."""
    assert outcomes and "applied" not in outcomes and set(outcomes) <= set(OUTCOMES), outcomes
    rows = await conn.fetch(
        "SELECT source, event_id, event_type, status, outcome, reason, received_at FROM inbound_webhooks"
        " WHERE outcome <> 'applied' AND source = $1 AND outcome = ANY($2::text[])"
        " AND ($3::timestamptz IS NULL OR (received_at, event_id) < ($3, $4))"
        " ORDER BY received_at DESC, event_id DESC LIMIT $5",
        source, list(outcomes), optional_dt(after[0]) if after else None, after[1] if after else "", limit + 1)
    return [InboundEvent(r["source"], r["event_id"], r["event_type"], r["status"], r["outcome"], r["reason"],
                         dt_to_us(r["received_at"])) for r in rows]
